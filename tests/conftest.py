import functools
import logging

import pytest
import torch

logging.getLogger("diffusers").setLevel(logging.ERROR)
torch.set_num_threads(2)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@functools.lru_cache(maxsize=None)
def _pipe(arch, task):
    from dcaccel.models import build_pipeline

    return build_pipeline(arch, task, seed=0)


@pytest.fixture
def tiny_pipe():
    """A factory for tiny pipelines (random weights), shared across tests; DeepCache is off on return."""
    import dcaccel

    made = []

    def make(arch="tiny", task="text2img"):
        import diffusers

        pipe = _pipe(arch, task)
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        made.append(pipe)
        return pipe

    yield make
    for pipe in made:
        if dcaccel.is_enabled(pipe):
            dcaccel.disable(pipe)


def unet_inputs(unet, batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, unet.config.in_channels, size, size, generator=g),
        "timestep": torch.full((batch,), 501.0),
        "encoder_hidden_states": torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g),
    }
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        inputs["text_embeds"] = torch.randn(batch, pooled, generator=g)
        inputs["time_ids"] = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(batch, 1)
    return inputs


def run_latents(pipe, steps=6, seed=0, **kwargs):
    kwargs.setdefault("prompt", "a red circle")
    kwargs.setdefault("height", 32)
    kwargs.setdefault("width", 32)
    return pipe(num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(seed),
                **kwargs).images
