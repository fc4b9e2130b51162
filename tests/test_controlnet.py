"""ControlNet with DeepCache: the ControlNet cut at the U-Net's branch. On tiny SD and SDXL U-Nets with tiny
ControlNets whose output convolutions are random (not zero), so that every residual matters."""

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import dcaccel
from dcaccel import DeepCacheConfig
from dcaccel.families.controlnet import ControlledUNet, ControlNetGraph, controlnets_of, split_controlled


@functools.lru_cache(maxsize=None)
def _pipe(arch="tiny", task="text2img", controlnets=1):
    import diffusers

    from dcaccel.models import build_pipeline

    pipe = build_pipeline(arch, task, seed=0, controlnets=controlnets)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


@pytest.fixture
def cn_pipe():
    made = []

    def make(arch="tiny", task="text2img", controlnets=1):
        made.append(_pipe(arch, task, controlnets))
        return made[-1]

    yield make
    for pipe in made:
        if dcaccel.is_enabled(pipe):
            dcaccel.disable(pipe)


def _image(seed=1, size=32):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _mask():
    m = np.zeros((32, 32), dtype=np.uint8)
    m[8:24, 8:24] = 255
    return Image.fromarray(m)


def run(pipe, steps=6, seed=0, controlnets=1, task="text2img", **kw):
    kw.setdefault("prompt", "a red circle")
    control = [_image(5 + k) for k in range(controlnets)]
    if task == "text2img":
        kw.update(image=control if controlnets > 1 else control[0])
    else:
        kw.update(image=_image(), control_image=control if controlnets > 1 else control[0])
        if task == "inpaint":
            kw["mask_image"] = _mask()
    return pipe(num_inference_steps=steps, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **kw).images


def _ours(pipe, config, **kw):
    dcaccel.enable(pipe, config)
    try:
        return run(pipe, **kw), dcaccel.last_stats(pipe)
    finally:
        dcaccel.disable(pipe)


# -- the cut ControlNet ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["tiny", "tiny-xl"])
def test_cut_controlnet_gives_the_residuals_the_shallow_unet_reads(cn_pipe, arch):
    """The cut ControlNet's residuals equal the whole ControlNet's, bit for bit, for every layer the shallow
    graph reads; and the shallow U-Net reads exactly those."""
    pipe = cn_pipe(arch)
    cn = controlnets_of(pipe.controlnet)[0]
    model = ControlledUNet(pipe.unet, [cn])
    g = torch.Generator().manual_seed(0)
    b, h = 2, 16
    sample = torch.randn(b, 4, h, h, generator=g)
    ehs = torch.randn(b, 7, pipe.unet.config.cross_attention_dim, generator=g)
    cond = torch.rand(b, 3, 32, 32, generator=g)
    extra = {}
    if cn.config.addition_embed_type == "text_time":
        pooled = cn.config.projection_class_embeddings_input_dim - 6 * cn.config.addition_time_embed_dim
        extra = {"text_embeds": torch.randn(b, pooled, generator=g),
                 "time_ids": torch.tensor([[32.0, 32.0, 0, 0, 32.0, 32.0]]).repeat(b, 1)}
    t = torch.full((b,), 601.0)
    n_blocks = len(pipe.unet.down_blocks)
    with torch.no_grad():
        scales = torch.linspace(0.5, 1.5, len(cn.controlnet_down_blocks) + 1)
        whole, _ = ControlNetGraph(cn, n_blocks, 0, full=True)(sample, t, ehs, cond, scales, **extra)
        # and diffusers' own ControlNet forward gives the same residuals
        ref, _ = cn(sample, t, ehs, cond, conditioning_scale=1.0, added_cond_kwargs=extra or None, return_dict=False)
        ones, _ = ControlNetGraph(cn, n_blocks, 0, full=True)(sample, t, ehs, cond, torch.ones_like(scales), **extra)
        for a, r in zip(ones, ref):
            torch.testing.assert_close(a, r, rtol=0, atol=0)
        for branch in range(3 * n_blocks):
            full, shallow = split_controlled(model, branch)
            cut = shallow.controlnets[0]
            got, mid = cut(sample, t, ehs, cond, scales, **extra)
            assert mid is None and len(got) == cut.count == shallow.unet.num_residuals
            for a, r in zip(got, whole):
                torch.testing.assert_close(a, r, rtol=0, atol=0)


# -- pipelines ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["tiny", "tiny-xl"])
def test_interval_one_is_the_plain_controlnet_pipeline(cn_pipe, arch):
    pipe = cn_pipe(arch)
    base = run(pipe)
    ours, _ = _ours(pipe, DeepCacheConfig(interval=1, branch=1))
    torch.testing.assert_close(ours, base, rtol=0, atol=0)


@pytest.mark.parametrize("arch, branch", [("tiny", 0), ("tiny", 2), ("tiny", 4), ("tiny-xl", 1), ("tiny-xl", 3)])
def test_cut_equals_the_whole_controlnet_on_every_step(cn_pipe, arch, branch):
    pipe = cn_pipe(arch)
    cut, stats = _ours(pipe, DeepCacheConfig(interval=3, branch=branch))
    whole, _ = _ours(pipe, DeepCacheConfig(interval=3, branch=branch, cut_controlnet=False))
    torch.testing.assert_close(cut, whole, rtol=0, atol=0)
    assert stats.full_steps == [0, 3]
    assert (cut - run(pipe)).abs().max() > 1e-3  # DeepCache did change something


@pytest.mark.parametrize("arch, branch", [("tiny", 0), ("tiny", 3), ("tiny-xl", 2)])
def test_matches_reference_helper_on_the_controlnet_pipeline(cn_pipe, arch, branch):
    """DeepCacheSDHelper on a ControlNet pipeline runs the whole ControlNet every step; we cut it and get the
    same latents."""
    from DeepCache import DeepCacheSDHelper

    pipe = cn_pipe(arch)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    helper.enable()
    try:
        ref = run(pipe)
    finally:
        helper.disable()
    ours, _ = _ours(pipe, DeepCacheConfig(interval=3, branch=branch))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(guess_mode=True), dict(control_guidance_start=0.3, control_guidance_end=0.7),
                                pytest.param(dict(controlnet_conditioning_scale=0.6), marks=pytest.mark.slow),
                                pytest.param(dict(guidance_scale=1.0), marks=pytest.mark.slow)])
def test_guess_mode_guidance_window_scale_and_no_guidance(cn_pipe, kw):
    pipe = cn_pipe("tiny")
    cut, _ = _ours(pipe, DeepCacheConfig(interval=2, branch=1), steps=8, **kw)
    whole, _ = _ours(pipe, DeepCacheConfig(interval=2, branch=1, cut_controlnet=False), steps=8, **kw)
    torch.testing.assert_close(cut, whole, rtol=0, atol=0)
    base = run(pipe, steps=8, **kw)
    plain, _ = _ours(pipe, DeepCacheConfig(interval=1, branch=1), steps=8, **kw)
    torch.testing.assert_close(plain, base, rtol=0, atol=0)


@pytest.mark.slow  # kept out of the default run for its time (2026-12-08: the default run was 11.9 min)
@pytest.mark.parametrize("arch", ["tiny", "tiny-xl"])
def test_several_controlnets(cn_pipe, arch):
    pipe = cn_pipe(arch, controlnets=2)
    kw = dict(controlnets=2, controlnet_conditioning_scale=[0.7, 1.2])
    base = run(pipe, **kw)
    plain, _ = _ours(pipe, DeepCacheConfig(interval=1, branch=1), **kw)
    torch.testing.assert_close(plain, base, rtol=0, atol=0)
    cut, _ = _ours(pipe, DeepCacheConfig(interval=3, branch=1), **kw)
    whole, _ = _ours(pipe, DeepCacheConfig(interval=3, branch=1, cut_controlnet=False), **kw)
    torch.testing.assert_close(cut, whole, rtol=0, atol=0)
    # a window that stops one ControlNet half way: the graphs follow
    window = dict(control_guidance_start=[0.0, 0.0], control_guidance_end=[1.0, 0.5])
    cut, _ = _ours(pipe, DeepCacheConfig(interval=3, branch=1), **kw, **window)
    whole, _ = _ours(pipe, DeepCacheConfig(interval=3, branch=1, cut_controlnet=False), **kw, **window)
    torch.testing.assert_close(cut, whole, rtol=0, atol=0)
    plain, _ = _ours(pipe, DeepCacheConfig(interval=1, branch=1), **kw, **window)
    torch.testing.assert_close(plain, run(pipe, **kw, **window), rtol=0, atol=0)
    assert not torch.equal(plain, base)  # the window changed the result, and the graphs followed it
    # guess mode with several ControlNets (on SDXL too)
    guess = run(pipe, guess_mode=True, **kw)
    plain, _ = _ours(pipe, DeepCacheConfig(interval=1, branch=1), guess_mode=True, **kw)
    torch.testing.assert_close(plain, guess, rtol=0, atol=0)
    cut, _ = _ours(pipe, DeepCacheConfig(interval=3, branch=1), guess_mode=True, **kw)
    whole, _ = _ours(pipe, DeepCacheConfig(interval=3, branch=1, cut_controlnet=False), guess_mode=True, **kw)
    torch.testing.assert_close(cut, whole, rtol=0, atol=0)


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpaint_controlnet(cn_pipe, task):
    pipe = cn_pipe("tiny", task)
    base = run(pipe, task=task, strength=0.8)
    plain, _ = _ours(pipe, DeepCacheConfig(interval=1, branch=2), task=task, strength=0.8)
    torch.testing.assert_close(plain, base, rtol=0, atol=0)
    cut, _ = _ours(pipe, DeepCacheConfig(interval=2, branch=2), task=task, strength=0.8)
    whole, _ = _ours(pipe, DeepCacheConfig(interval=2, branch=2, cut_controlnet=False), task=task, strength=0.8)
    torch.testing.assert_close(cut, whole, rtol=0, atol=0)


def test_disable_gives_the_controlnet_back(cn_pipe):
    pipe = cn_pipe("tiny")
    cn, cls = pipe.controlnet, type(pipe.controlnet)
    base = run(pipe)
    dcaccel.enable(pipe, DeepCacheConfig(interval=2))
    assert pipe.controlnet is cn and isinstance(pipe.controlnet, cls)
    dcaccel.disable(pipe)
    assert pipe.controlnet is cn and type(pipe.controlnet) is cls
    torch.testing.assert_close(run(pipe), base, rtol=0, atol=0)


def test_pipelines_made_from_components_run_the_controlnet_itself(cn_pipe):
    """pipe.components holds the original U-Net and the (shared) ControlNet: a pipeline made from them is a plain
    ControlNet pipeline, also while the first is enabled; replacing the enabled pipeline's ControlNet is refused."""
    pipe = cn_pipe("tiny")
    base = run(pipe)
    dcaccel.enable(pipe, DeepCacheConfig(interval=3, branch=1))
    try:
        derived = type(pipe).__mro__[1](**pipe.components)
        torch.testing.assert_close(run(derived), base, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="before replacing pipe.controlnet"):
            pipe.controlnet = pipe.controlnet
    finally:
        dcaccel.disable(pipe)


# -- bad input ---------------------------------------------------------------------------------------------------

def test_controlnet_of_another_architecture_is_refused(cn_pipe):
    import diffusers

    from dcaccel.models import build_controlnet

    pipe = cn_pipe("tiny")
    other = build_controlnet(_pipe("tiny-xl").unet, 2)
    wrong = diffusers.StableDiffusionControlNetPipeline(**{**pipe.components, "controlnet": other})
    with pytest.raises((ValueError, TypeError), match="controlnet 0 cannot be used with this U-Net: .*another "
                                                      "architecture"):
        dcaccel.enable(wrong, DeepCacheConfig())
    assert not dcaccel.is_enabled(wrong)


def test_mismatched_control_image_is_refused_clearly(cn_pipe):
    pipe = cn_pipe("tiny")
    dcaccel.enable(pipe, DeepCacheConfig(interval=2))
    cn = pipe.controlnet
    latents = torch.randn(2, 4, 16, 16)
    # diffusers' pipelines resize control images to the call's size; a custom step loop calling the ControlNet
    # inside the enabled pipeline's call (emulated by begin_call) can hand it another size
    pipe.unet.begin_call()
    try:
        with pytest.raises(ValueError, match=r"control image 0 is \(24, 24\) pixels; .*needs \(32, 32\)"):
            cn(latents, torch.tensor(1), encoder_hidden_states=torch.randn(2, 77, 32),
               controlnet_cond=torch.rand(2, 3, 24, 24))
    finally:
        pipe.unet.end_call()


# -- engines -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cn_engine(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from dcaccel.config import BuildConfig
    from dcaccel.engines import build_engines

    directory, _ = build_engines(_pipe("tiny", "text2img", 2), BuildConfig(height=32, width=32, branch=1,
                                                                              backend="onnxruntime"),
                                 out_dir=tmp_path_factory.mktemp("engines"), model_name="tiny-cn")
    return directory


def test_onnxruntime_engine_equals_eager(cn_pipe, cn_engine):
    from dcaccel.engines import Manifest

    data = Manifest.read(cn_engine).data
    assert data["family"] == "controlnet" and len(data["model_config"]["controlnets"]) == 2
    names = [t["name"] for t in data["specs"]["shallow"]["inputs"]]
    assert {"control_cond_0", "control_scales_1", "control_sample"} <= set(names)
    pipe = cn_pipe("tiny", controlnets=2)
    kw = dict(controlnets=2, controlnet_conditioning_scale=[0.7, 1.2])
    eager, _ = _ours(pipe, DeepCacheConfig(interval=3, branch=1), **kw)
    dcaccel.enable(pipe, DeepCacheConfig(interval=3, branch=1), backend="onnxruntime", engine_dir=cn_engine)
    try:
        got = run(pipe, **kw)
        with pytest.raises(ValueError, match="static shapes"):
            run(pipe, guess_mode=True, **kw)  # the engine was built without guess mode: other batch
    finally:
        dcaccel.disable(pipe)
    torch.testing.assert_close(got, eager, atol=2e-4, rtol=1e-3)
    # the ControlNets' weights are part of the engine: another ControlNet is refused
    other = _pipe("tiny", "text2img", 1)
    with pytest.raises(Exception, match="model_config.controlnets|weights_hash"):
        dcaccel.enable(other, DeepCacheConfig(interval=3, branch=1), backend="onnxruntime", engine_dir=cn_engine)



def _built_engine_equals_eager(cn_pipe, tmp_path, backend: str, branch: int):
    """Build the tiny ControlNet pipeline's engine in a directory, load it, compare a pipeline call with eager."""
    from dcaccel.config import BuildConfig
    from dcaccel.engines import build_engines

    pipe = cn_pipe("tiny")
    config = DeepCacheConfig(interval=3, branch=branch)
    eager, _ = _ours(pipe, config)
    directory, _ = build_engines(pipe, BuildConfig(height=32, width=32, branch=branch, backend=backend),
                                 out_dir=tmp_path, model_name="tiny-cn")
    dcaccel.enable(pipe, config, backend=backend, engine_dir=directory)
    try:
        got = run(pipe)
    finally:
        dcaccel.disable(pipe)
    torch.testing.assert_close(got, eager, atol=2e-4, rtol=1e-3)
    return directory


@pytest.mark.slow  # kept out of the default run for its time (2026-12-07: the default run was 13 min)
def test_onnxruntime_engine_of_a_controlnet_cut_that_reads_no_text(cn_pipe, tmp_path):
    """Cut at branch 0, the shallow ControlNet reads no text: the exporter drops that input, the export declares
    it again so that the engine takes the inputs its spec names (this engine once failed to load)."""
    pytest.importorskip("onnxruntime")
    import onnx

    directory = _built_engine_equals_eager(cn_pipe, tmp_path, "onnxruntime", branch=0)
    names = [i.name for i in onnx.load(str(directory / "shallow.onnx"), load_external_data=False).graph.input]
    assert "control_encoder_hidden_states" in names


@pytest.mark.slow
def test_torch_compile_engine_equals_eager(cn_pipe, tmp_path):
    """The fused ControlNet + U-Net graphs through torch.compile (built, then loaded from the directory)."""
    _built_engine_equals_eager(cn_pipe, tmp_path, "torch_compile", branch=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU and tensorrt")
def test_tensorrt_engine_equals_eager(cn_pipe, tmp_path):
    pytest.importorskip("tensorrt", reason="needs the tensorrt package (pip install 'dcaccel[gpu]')")
    pipe = cn_pipe("tiny")
    config = DeepCacheConfig(interval=3, branch=1)
    eager, _ = _ours(pipe, config)
    pipe.to("cuda")
    try:
        dcaccel.enable(pipe, config, backend="tensorrt", height=32, width=32)
        try:
            got = run(pipe).cpu()
        finally:
            dcaccel.disable(pipe)
    finally:
        pipe.to("cpu")
    torch.testing.assert_close(got, eager, atol=2e-3, rtol=1e-2)
