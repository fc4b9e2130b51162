"""Diffusers features a Stable Diffusion user switches on, with DeepCache: at interval 1 an enabled pipeline is the
plain one (bit for bit on eager, within the backend's tolerance elsewhere), with caching it matches the reference
DeepCacheSDHelper where that supports the feature, and what cannot be honoured is refused before anything runs."""

import functools
import json

import pytest
import torch

import dcaccel
from dcaccel import DeepCacheConfig
from dcaccel.errors import EngineError

from conftest import run_latents

FREEU = {"s1": 0.9, "s2": 0.2, "b1": 1.2, "b2": 1.4}  # diffusers' test values


def _ddim(pipe):
    import diffusers

    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


@pytest.fixture
def freeu_off():
    """Pipelines given to this fixture get FreeU switched off again after the test (they are shared)."""
    pipes = []
    yield pipes.append
    for pipe in pipes:
        if dcaccel.is_enabled(pipe):
            dcaccel.disable(pipe)
        pipe.disable_freeu()


# -- FreeU ------------------------------------------------------------------------------------------------------------


def test_freeu_filter_without_fft_equals_diffusers():
    from diffusers.utils.torch_utils import fourier_filter

    from dcaccel.graphs.ops import fourier_filter_matmul

    g = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 8, 8), (1, 2, 7, 5), (1, 1, 1, 4), (2, 4, 16, 12)]:
        x = torch.randn(shape, generator=g)
        torch.testing.assert_close(fourier_filter_matmul(x, 0.3), fourier_filter(x, 1, 0.3), rtol=0, atol=2e-6)
        assert not torch.equal(fourier_filter_matmul(x, 0.3), x)


@pytest.mark.parametrize("arch", ["tiny", "tiny-xl"])
def test_freeu_at_interval_one_is_the_plain_pipeline(tiny_pipe, freeu_off, arch):
    """Both up blocks of the tiny U-Nets are under FreeU (as in diffusers' test dummies), so both graphs apply it;
    switched on before enable or after it, the images are the plain pipeline's with FreeU, bit for bit."""
    pipe = _ddim(tiny_pipe(arch))
    freeu_off(pipe)
    plain = run_latents(pipe)
    pipe.enable_freeu(**FREEU)
    plain_freeu = run_latents(pipe)
    assert (plain_freeu - plain).abs().max() > 1e-3  # FreeU changes the image

    dcaccel.enable(pipe, DeepCacheConfig(interval=1))
    torch.testing.assert_close(run_latents(pipe), plain_freeu, rtol=0, atol=0)
    pipe.disable_freeu()                      # switched off on an enabled pipeline: the graphs follow
    torch.testing.assert_close(run_latents(pipe), plain, rtol=0, atol=0)
    pipe.enable_freeu(**FREEU)                # and on again
    torch.testing.assert_close(run_latents(pipe), plain_freeu, rtol=0, atol=0)
    dcaccel.disable(pipe)


@pytest.mark.parametrize("arch,branch", [("tiny", 0), ("tiny", 4), ("tiny-xl", 2)])
def test_freeu_with_caching_matches_reference(tiny_pipe, freeu_off, arch, branch):
    from DeepCache import DeepCacheSDHelper

    pipe = _ddim(tiny_pipe(arch))
    freeu_off(pipe)
    pipe.enable_freeu(**FREEU)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    helper.enable()
    try:
        ref = run_latents(pipe, steps=8)
    finally:
        helper.disable()
    dcaccel.enable(pipe, DeepCacheConfig(interval=3, branch=branch))
    ours = run_latents(pipe, steps=8)
    assert dcaccel.last_stats(pipe).shallow_steps
    dcaccel.disable(pipe)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    pipe.disable_freeu()
    assert (run_latents(pipe, steps=8) - ref).abs().max() > 1e-3


def test_freeu_settings_are_checked(tiny_pipe, freeu_off):
    pipe = tiny_pipe("tiny")
    freeu_off(pipe)
    pipe.unet.up_blocks[0].s1, pipe.unet.up_blocks[0].s2 = 0.9, 0.2
    pipe.unet.up_blocks[0].b1, pipe.unet.up_blocks[0].b2 = 1.2, 1.4   # one block only: not what enable_freeu does
    with pytest.raises(ValueError, match="differ between this U-Net's up blocks"):
        dcaccel.enable(pipe, DeepCacheConfig(interval=1))
    assert not dcaccel.is_enabled(pipe)


@pytest.mark.slow  # kept out of the default run for its time (2026-12-07: the default run was 13 min)
def test_freeu_on_onnxruntime_equals_eager_and_a_change_is_refused(tiny_pipe, freeu_off, tmp_path):
    pytest.importorskip("onnxruntime")
    pipe = _ddim(tiny_pipe("tiny"))
    freeu_off(pipe)
    pipe.enable_freeu(**FREEU)
    dcaccel.enable(pipe, DeepCacheConfig(interval=3))
    eager = run_latents(pipe, steps=6)
    dcaccel.disable(pipe)

    dcaccel.enable(pipe, DeepCacheConfig(interval=3), backend="onnxruntime", height=32, width=32, batch_size=1)
    torch.testing.assert_close(run_latents(pipe, steps=6), eager, rtol=1e-4, atol=1e-4)
    pipe.disable_freeu()
    with pytest.raises(EngineError, match=r"settings changed after dcaccel.enable \(freeu"):
        run_latents(pipe, steps=6)
    pipe.enable_freeu(**FREEU)                # set back: runs again
    torch.testing.assert_close(run_latents(pipe, steps=6), eager, rtol=1e-4, atol=1e-4)
    dcaccel.disable(pipe)

    # An engine directory records FreeU: one built without it is refused for a pipeline with it, naming the field.
    from dcaccel.config import BuildConfig
    from dcaccel.engines import build_engines

    pipe.disable_freeu()
    directory, _ = build_engines(pipe, BuildConfig(height=32, width=32, batch_size=1, backend="onnxruntime"),
                                 out_dir=tmp_path, model_name="tiny")
    pipe.enable_freeu(**FREEU)
    with pytest.raises(EngineError, match="model_config.freeu"):
        dcaccel.enable(pipe, DeepCacheConfig(interval=3), backend="onnxruntime", engine_dir=directory)
    assert not dcaccel.is_enabled(pipe)


@pytest.mark.slow  # 45 s of compiling
def test_freeu_on_torch_compile_follows_a_change(tiny_pipe, freeu_off):
    pipe = _ddim(tiny_pipe("tiny"))
    freeu_off(pipe)
    plain = run_latents(pipe, steps=4)
    pipe.enable_freeu(**FREEU)
    plain_freeu = run_latents(pipe, steps=4)
    dcaccel.enable(pipe, DeepCacheConfig(interval=1), backend="torch_compile", height=32, width=32, batch_size=1,
                   freezing=False)
    torch.testing.assert_close(run_latents(pipe, steps=4), plain_freeu, rtol=2e-3, atol=2e-3)
    pipe.disable_freeu()                      # compiled again with FreeU off
    torch.testing.assert_close(run_latents(pipe, steps=4), plain, rtol=2e-3, atol=2e-3)
    dcaccel.disable(pipe)


# -- SDXL refiner, pipelines without a tokenizer ---------------------------------------------------------------------


def _refiner():
    """A tiny SDXL refiner: only text_encoder_2 / tokenizer_2, aesthetic-score conditioning (5 time ids)."""
    import diffusers

    from dcaccel.models import architecture_config, build_components

    comps = build_components("tiny-xl", seed=0)
    cfg = architecture_config("tiny-xl")
    pooled = cfg["text_encoder_2"]["projection_dim"]
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(**{
        **cfg["unet"], "cross_attention_dim": cfg["text_encoder_2"]["hidden_size"],
        "projection_class_embeddings_input_dim": pooled + 5 * cfg["unet"]["addition_time_embed_dim"]}).eval()
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=comps["vae"], text_encoder=None, text_encoder_2=comps["text_encoder_2"], tokenizer=None,
        tokenizer_2=comps["tokenizer_2"], unet=unet, scheduler=comps["scheduler"], requires_aesthetics_score=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _base_then_refiner(base, refiner, seed=0):
    latents = base(prompt="a red circle", num_inference_steps=10, denoising_end=0.7, output_type="latent",
                   height=32, width=32, generator=torch.Generator().manual_seed(seed)).images
    return refiner(prompt="a red circle", image=latents, num_inference_steps=10, denoising_start=0.7,
                   output_type="latent", generator=torch.Generator().manual_seed(seed + 1)).images


def test_sdxl_base_and_refiner_with_deepcache_on_both(tiny_pipe):
    base, refiner = _ddim(tiny_pipe("tiny-xl")), _ddim(_refiner())
    plain = _base_then_refiner(base, refiner)
    for pipe in (base, refiner):
        dcaccel.enable(pipe, DeepCacheConfig(interval=1))
    try:
        torch.testing.assert_close(_base_then_refiner(base, refiner), plain, rtol=0, atol=0)
        assert dcaccel.last_stats(base).full_steps == list(range(7))
        assert dcaccel.last_stats(refiner).full_steps == list(range(3))
    finally:
        for pipe in (base, refiner):
            dcaccel.disable(pipe)
    for pipe in (base, refiner):
        dcaccel.enable(pipe, DeepCacheConfig(interval=2))
    try:
        cached = _base_then_refiner(base, refiner)
        assert dcaccel.last_stats(base).shallow_steps == [1, 3, 5]
        assert dcaccel.last_stats(refiner).shallow_steps == [1]
    finally:
        for pipe in (base, refiner):
            dcaccel.disable(pipe)
    assert (cached - plain).abs().max() > 1e-4


@pytest.mark.slow  # kept out of the default run for its time (2026-12-08: the default run was 11.9 min)
def test_refiner_engine_has_the_text_length_of_tokenizer_2(tmp_path):
    pytest.importorskip("onnxruntime")
    refiner = _ddim(_refiner())
    image = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    kwargs = dict(prompt="a red circle", image=image, num_inference_steps=6, strength=0.5, output_type="latent")
    plain = refiner(**kwargs, generator=torch.Generator().manual_seed(0)).images
    dcaccel.enable(refiner, DeepCacheConfig(interval=1), backend="onnxruntime", height=32, width=32, batch_size=1)
    try:
        ours = refiner(**kwargs, generator=torch.Generator().manual_seed(0)).images
    finally:
        dcaccel.disable(refiner)
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-4)


# -- LCM- and guidance-distilled U-Nets: timestep_cond is a graph input ---------------------------------------------


def _lcm_pipeline(cls_name="LatentConsistencyModelPipeline"):
    """The tiny SD architecture with a guidance-distilled U-Net (time_cond_proj_dim, as LCM-distilled SD 1.5 has)
    and LCMScheduler, in `cls_name`."""
    import diffusers

    from dcaccel.models import architecture_config, build_components

    comps = build_components("tiny", seed=0)
    cfg = architecture_config("tiny")
    torch.manual_seed(2)
    comps["unet"] = diffusers.UNet2DConditionModel(**{**cfg["unet"], "time_cond_proj_dim": 32}).eval()
    comps["scheduler"] = diffusers.LCMScheduler.from_config(comps["scheduler"].config)
    if cls_name.startswith("LatentConsistency"):
        comps.pop("requires_safety_checker")
    pipe = getattr(diffusers, cls_name)(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("cls_name", ["LatentConsistencyModelPipeline", "StableDiffusionPipeline"])
def test_guidance_distilled_unet(cls_name):
    from DeepCache import DeepCacheSDHelper

    pipe = _lcm_pipeline(cls_name)
    kwargs = dict(steps=6, guidance_scale=6.0)
    plain = run_latents(pipe, **kwargs)
    dcaccel.enable(pipe, DeepCacheConfig(interval=1))
    torch.testing.assert_close(run_latents(pipe, **kwargs), plain, rtol=0, atol=0)
    dcaccel.disable(pipe)
    # the guidance embedding really reaches both graphs: another guidance gives another image
    dcaccel.enable(pipe, DeepCacheConfig(interval=2, branch=1))
    ours = run_latents(pipe, **kwargs)
    assert dcaccel.last_stats(pipe).shallow_steps == [1, 3, 5]
    assert (run_latents(pipe, steps=6, guidance_scale=2.0) - ours).abs().max() > 1e-4
    dcaccel.disable(pipe)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=2, cache_branch_id=1)
    helper.enable()
    try:
        ref = run_latents(pipe, **kwargs)
    finally:
        helper.disable()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # kept out of the default run for its time (2026-12-08: the default run was 11.9 min)
def test_guidance_distilled_unet_on_onnxruntime():
    pytest.importorskip("onnxruntime")
    pipe = _lcm_pipeline()
    dcaccel.enable(pipe, DeepCacheConfig(interval=2))
    eager = run_latents(pipe, steps=4, guidance_scale=6.0)
    dcaccel.disable(pipe)
    dcaccel.enable(pipe, DeepCacheConfig(interval=2), backend="onnxruntime", height=32, width=32, batch_size=1,
                   cfg=False)  # LCM pipelines run no classifier-free guidance
    try:
        assert "timestep_cond" in dcaccel.enabled_state(pipe).info["specs"]["full"].input_names
        torch.testing.assert_close(run_latents(pipe, steps=4, guidance_scale=6.0), eager, rtol=1e-4, atol=1e-4)
    finally:
        dcaccel.disable(pipe)


# -- the pipeline features users reach for, at interval 1: the plain pipeline's output --------------------------------


def _embeds(pipe):
    with torch.no_grad():
        pos, neg = pipe.encode_prompt("a red circle", "cpu", 1, True, "")
    return {"prompt": None, "prompt_embeds": pos, "negative_prompt_embeds": neg}


def _callback_kwargs(seen):
    def callback(pipe, step, timestep, kwargs):
        seen.append(step)
        kwargs["latents"] = kwargs["latents"] * 0.999  # a callback that changes the latents changes both alike
        return kwargs
    return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]}


FEATURES = {
    "num_images_per_prompt": lambda pipe, seen: {"num_images_per_prompt": 2},
    "return_dict=False": lambda pipe, seen: {"return_dict": False},
    "output_type=np": lambda pipe, seen: {"output_type": "np"},
    "output_type=pt": lambda pipe, seen: {"output_type": "pt"},
    "guidance_rescale": lambda pipe, seen: {"guidance_rescale": 0.7},
    "clip_skip": lambda pipe, seen: {"clip_skip": 1},
    "timesteps=": lambda pipe, seen: {"timesteps": [999, 800, 600, 400, 200, 1], "num_inference_steps": None},
    "prompt_embeds": lambda pipe, seen: _embeds(pipe),
    "negative_prompt": lambda pipe, seen: {"negative_prompt": "a blue square"},
    "callback_on_step_end": lambda pipe, seen: _callback_kwargs(seen),
    "no guidance": lambda pipe, seen: {"guidance_scale": 1.0},
}


def _call(pipe, kwargs):
    call = {"prompt": "a red circle", "num_inference_steps": 6, "height": 32, "width": 32, "output_type": "latent",
            "generator": torch.Generator().manual_seed(0), **kwargs}
    if call["num_inference_steps"] is None:
        del call["num_inference_steps"]
    out = pipe(**call)
    return out[0] if isinstance(out, tuple) else out.images


def _features_at_interval_one(pipe, features: dict, feature: str) -> None:
    """`feature` on `pipe` plain and with DeepCache at interval 1: the same output and the same callbacks; where
    the plain pipeline fails, the enabled one fails the same way (an xfail naming it)."""
    import numpy as np

    seen_plain, seen_ours = [], []
    try:
        plain = _call(pipe, features[feature](pipe, seen_plain))
    except Exception as e:  # the plain pipeline fails (clip_skip with this diffusers and transformers): so must ours
        dcaccel.enable(pipe, DeepCacheConfig(interval=1))
        try:
            with pytest.raises(type(e)):
                _call(pipe, features[feature](pipe, seen_ours))
        finally:
            dcaccel.disable(pipe)
        pytest.xfail(f"the plain pipeline fails with {feature}, and so does the enabled one: {type(e).__name__}: {e}")
    dcaccel.enable(pipe, DeepCacheConfig(interval=1))
    try:
        ours = _call(pipe, features[feature](pipe, seen_ours))
        stats = dcaccel.last_stats(pipe)
        assert stats.full_steps == list(range(len(stats.full_steps))) and stats.full_steps
        assert not stats.shallow_steps
    finally:
        dcaccel.disable(pipe)
    assert seen_plain == seen_ours
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(plain))


@pytest.mark.parametrize("feature", list(FEATURES))
def test_pipeline_features_at_interval_one(tiny_pipe, feature):
    import diffusers

    pipe = tiny_pipe("tiny")
    if feature == "timesteps=":  # a scheduler that takes custom timesteps
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    _features_at_interval_one(pipe, FEATURES, feature)


SDXL_FEATURES = {
    "num_images_per_prompt": lambda pipe, seen: {"num_images_per_prompt": 2},
    "return_dict=False": lambda pipe, seen: {"return_dict": False},
    "output_type=np": lambda pipe, seen: {"output_type": "np"},
    "guidance_rescale": lambda pipe, seen: {"guidance_rescale": 0.7},
    "prompt_2 and negative_prompt_2": lambda pipe, seen: {"prompt_2": "a blue square", "negative_prompt": "green",
                                                          "negative_prompt_2": "a triangle"},
    "size conditioning": lambda pipe, seen: {"original_size": (64, 48), "target_size": (32, 32),
                                             "crops_coords_top_left": (4, 2), "negative_original_size": (16, 16),
                                             "negative_target_size": (32, 32)},
    "denoising_end": lambda pipe, seen: {"denoising_end": 0.5},
    "callback_on_step_end": lambda pipe, seen: _callback_kwargs(seen),
    "no guidance": lambda pipe, seen: {"guidance_scale": 1.0},
}


@pytest.mark.parametrize("feature", list(SDXL_FEATURES))
def test_sdxl_pipeline_features_at_interval_one(tiny_pipe, feature):
    _features_at_interval_one(tiny_pipe("tiny-xl"), SDXL_FEATURES, feature)


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_sdxl_img2img_and_inpaint_classes_at_interval_one(tiny_pipe, task):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    kwargs = {"image": image, "strength": 0.6, "aesthetic_score": 7.0, "negative_aesthetic_score": 2.0}
    if task == "inpaint":
        kwargs["mask_image"] = Image.fromarray(((rng.random((32, 32)) > 0.5) * 255).astype(np.uint8))
    pipe = tiny_pipe("tiny-xl", task)
    assert type(pipe).__name__ == {"img2img": "StableDiffusionXLImg2ImgPipeline",
                                   "inpaint": "StableDiffusionXLInpaintPipeline"}[task]
    _features_at_interval_one(pipe, {task: lambda pipe, seen: kwargs}, task)


@pytest.mark.parametrize("setup", ["attention_slicing", "vae_slicing", "vae_tiling", "to_float64_and_back"])
def test_pipeline_settings_at_interval_one(setup):
    """Settings that change the pipeline's modules, switched on before enable (the shared pipelines stay as they
    are: a fresh one here)."""
    from dcaccel.models import build_pipeline

    pipe = build_pipeline("tiny")
    if setup == "attention_slicing":
        pipe.enable_attention_slicing(1)
    elif setup == "vae_slicing":
        pipe.vae.enable_slicing()
    elif setup == "vae_tiling":
        pipe.vae.enable_tiling()
    else:
        pipe.to(torch.float64)
        pipe.to(torch.float32)
    kwargs = {"output_type": "np", "num_images_per_prompt": 2}
    plain = _call(pipe, kwargs)
    dcaccel.enable(pipe, DeepCacheConfig(interval=1))
    try:
        ours = _call(pipe, kwargs)
    finally:
        dcaccel.disable(pipe)
    torch.testing.assert_close(torch.as_tensor(ours), torch.as_tensor(plain), rtol=0, atol=0)


def test_diffusers_methods_that_change_the_unet_while_enabled():
    """fuse_qkv_projections and attention processors set through the pipeline while DeepCache is enabled reach
    the U-Net, and the next call follows them (interval 1: the plain pipeline's output)."""
    from diffusers.models.attention_processor import AttnProcessor

    from dcaccel.models import build_pipeline

    pipe = build_pipeline("tiny")
    kwargs = {"output_type": "latent"}
    dcaccel.enable(pipe, DeepCacheConfig(interval=1))
    try:
        before = _call(pipe, kwargs)
        pipe.fuse_qkv_projections()
        fused = _call(pipe, kwargs)
        pipe.unet.set_attn_processor(AttnProcessor())
        classic = _call(pipe, kwargs)
    finally:
        dcaccel.disable(pipe)
    assert any(getattr(m, "fused_projections", False) for m in pipe.unet.modules())  # it reached the U-Net
    plain = _call(pipe, kwargs)  # the plain pipeline with the same changes
    torch.testing.assert_close(classic, plain, rtol=0, atol=0)
    torch.testing.assert_close(fused, before, rtol=1e-5, atol=1e-5)  # fused projections: the same maths


def test_an_enabled_denoiser_is_still_its_class_to_diffusers(tmp_path):
    """isinstance(pipe.unet, UNet2DConditionModel) while enabled (diffusers' test_StableDiffusionMixin_component
    asserts it, and scripts branch on it); save_pretrained writes the plain pipeline, which loads and gives the
    enabled pipeline's image at interval 1; CPU offload is refused in either order, with the reason."""
    from diffusers import SD3Transformer2DModel, StableDiffusionPipeline, UNet2DConditionModel

    from dcaccel.models import build_pipeline
    from dcaccel.runtime import DeepCacheDenoiser

    pipe = build_pipeline("tiny")
    kwargs = {"output_type": "latent"}
    dcaccel.enable(pipe, DeepCacheConfig(interval=1))
    try:
        assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.unet, DeepCacheDenoiser)
        assert pipe.unet.__class__ is UNet2DConditionModel and type(pipe.unet) is DeepCacheDenoiser
        assert repr(pipe.unet).startswith("DeepCacheDenoiser(")
        ours = _call(pipe, kwargs)
        pipe.save_pretrained(tmp_path / "saved")
        with pytest.raises(ValueError, match="CPU offload .* is not supported with it"):
            pipe.enable_model_cpu_offload(device="cpu")
        with pytest.raises(ValueError, match="CPU offload .* is not supported with it"):
            pipe.enable_sequential_cpu_offload(device="cpu")
    finally:
        dcaccel.disable(pipe)
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(loaded.unet) is UNet2DConditionModel
    loaded.scheduler = pipe.scheduler
    torch.testing.assert_close(_call(loaded, kwargs), ours, rtol=0, atol=0)
    sd3 = _sd3()
    dcaccel.enable(sd3, DeepCacheConfig(interval=2))
    try:
        assert isinstance(sd3.transformer, SD3Transformer2DModel)
    finally:
        dcaccel.disable(sd3)
    pytest.importorskip("accelerate")
    loaded.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match=r"accelerate's offload hooks .*remove_all_hooks\(\)"):
        dcaccel.enable(loaded, DeepCacheConfig(interval=1))
    loaded.remove_all_hooks()
    dcaccel.enable(loaded, DeepCacheConfig(interval=1))
    dcaccel.disable(loaded)


SD3_FEATURES = {
    "num_images_per_prompt": lambda pipe, seen: {"num_images_per_prompt": 2},
    "return_dict=False": lambda pipe, seen: {"return_dict": False},
    "output_type=np": lambda pipe, seen: {"output_type": "np"},
    "negative_prompt": lambda pipe, seen: {"negative_prompt": "a blue square"},
    "callback_on_step_end": lambda pipe, seen: _callback_kwargs(seen),
    "sigmas=": lambda pipe, seen: {"sigmas": [1.0, 0.8, 0.6, 0.4, 0.2, 0.1]},
    "no guidance": lambda pipe, seen: {"guidance_scale": 1.0},
}


@functools.lru_cache(maxsize=None)
def _sd3():
    """tiny-sd3 with its own flow-matching scheduler (the shared tiny_pipe ones get DDIM)."""
    from dcaccel.models import build_pipeline

    return build_pipeline("tiny-sd3")


@pytest.mark.parametrize("feature", list(SD3_FEATURES))
def test_sd3_pipeline_features_at_interval_one(feature):
    _features_at_interval_one(_sd3(), SD3_FEATURES, feature)
