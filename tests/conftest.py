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


def write_ip_adapter(unet, directory, seed=0, image_embed_dim=32, name="ip-adapter.safetensors"):
    """An IP-Adapter with random weights for `unet`, written as the original IP-Adapter files are (image_proj.* and
    ip_adapter.{id}.to_k_ip/to_v_ip.*, one pair per cross-attention processor, ids 1, 3, 5, ...), for
    pipe.load_ip_adapter(directory, subfolder="", weight_name=name, image_encoder_folder=None)."""
    from pathlib import Path

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    cross = cfg.cross_attention_dim
    tensors = {
        "image_proj.proj.weight": torch.randn(4 * cross, image_embed_dim, generator=g) * 0.2,
        "image_proj.proj.bias": torch.randn(4 * cross, generator=g) * 0.1,
        "image_proj.norm.weight": 1 + 0.1 * torch.randn(cross, generator=g),
        "image_proj.norm.bias": 0.1 * torch.randn(cross, generator=g),
    }
    key_id = 1
    for name_ in unet.attn_processors:
        if name_.endswith("attn1.processor"):
            continue
        block = name_.split(".")[0]
        if block == "mid_block":
            hidden = cfg.block_out_channels[-1]
        elif block == "up_blocks":
            hidden = list(reversed(cfg.block_out_channels))[int(name_.split(".")[1])]
        else:
            hidden = cfg.block_out_channels[int(name_.split(".")[1])]
        for kind in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{key_id}.{kind}.weight"] = torch.randn(hidden, cross, generator=g) / cross ** 0.5
        key_id += 2
    Path(directory).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(directory) / name))
    return name


def ip_embeds(pipe, images=1, seed=1, image_embed_dim=32, adapters=1):
    """ip_adapter_image_embeds as a pipeline takes them with guidance: per adapter (2, images, dim), negative first."""
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.zeros(1, images, image_embed_dim), torch.randn(1, images, image_embed_dim, generator=g)])
            for _ in range(adapters)]


def write_image_encoder(directory, image_embed_dim=32, seed=0):
    """A tiny CLIP vision encoder with projection (random weights) in directory/image_encoder, where
    pipe.load_ip_adapter(directory, ..., image_encoder_folder="image_encoder") reads it."""
    from pathlib import Path

    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=image_embed_dim, num_channels=3)
    CLIPVisionModelWithProjection(config).eval().save_pretrained(str(Path(directory) / "image_encoder"))
