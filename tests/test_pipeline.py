import numpy as np
import pytest
import torch
from PIL import Image

import dcaccel
from dcaccel import DeepCacheConfig

from conftest import run_latents


def _init_image(seed=1):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _mask_image():
    m = np.zeros((32, 32), dtype=np.uint8)
    m[8:24, 8:24] = 255
    return Image.fromarray(m)


def _scheduler(pipe, name):
    import diffusers

    cls = {"ddim": diffusers.DDIMScheduler, "dpm": diffusers.DPMSolverMultistepScheduler,
           "pndm": diffusers.PNDMScheduler}[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def _reference(pipe, interval, branch, **kwargs):
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return run_latents(pipe, **kwargs)
    finally:
        helper.disable()


def _ours(pipe, config, **kwargs):
    dcaccel.enable(pipe, config)
    try:
        return run_latents(pipe, **kwargs)
    finally:
        dcaccel.disable(pipe)


@pytest.mark.parametrize("arch", ["tiny", "tiny-xl"])
def test_interval_one_is_the_plain_pipeline_and_caching_changes_it(tiny_pipe, arch):
    pipe = tiny_pipe(arch)
    _scheduler(pipe, "ddim")
    base = run_latents(pipe)
    torch.testing.assert_close(_ours(pipe, DeepCacheConfig(interval=1, branch=0)), base, rtol=0, atol=0)
    cached = _ours(pipe, DeepCacheConfig(interval=3, branch=0))
    assert (cached - base).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["tiny", "tiny-xl"])
@pytest.mark.parametrize("sched", ["ddim", "dpm"])
@pytest.mark.parametrize("branch", [0, 2, 4, 8])
def test_matches_reference_deepcache(tiny_pipe, arch, sched, branch):
    pipe = tiny_pipe(arch)
    _scheduler(pipe, sched)
    ref = _reference(pipe, 3, branch, steps=8)
    ours = _ours(pipe, DeepCacheConfig(interval=3, branch=branch), steps=8)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpaint_match_reference(tiny_pipe, task):
    pipe = tiny_pipe("tiny", task)
    _scheduler(pipe, "ddim")
    kw = {"image": _init_image(), "strength": 0.7, "steps": 10}
    if task == "inpaint":
        kw["mask_image"] = _mask_image()
    ref = _reference(pipe, 2, 1, **kw)
    ours = _ours(pipe, DeepCacheConfig(interval=2, branch=1), **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_sdxl_img2img_runs(tiny_pipe):
    pipe = tiny_pipe("tiny-xl", "img2img")
    out = _ours(pipe, DeepCacheConfig(interval=2, branch=3), image=_init_image(), strength=0.6, steps=6)
    assert torch.isfinite(out).all()


def test_consecutive_calls_each_equal_a_fresh_run(tiny_pipe):
    pipe = tiny_pipe("tiny", "img2img")
    _scheduler(pipe, "ddim")
    cfg = DeepCacheConfig(interval=3, branch=0)
    calls = [dict(steps=10, strength=0.9), dict(steps=7, strength=0.5), dict(steps=12, strength=0.75)]
    fresh = [_ours(pipe, cfg, image=_init_image(), **kw) for kw in calls]
    dcaccel.enable(pipe, cfg)
    in_a_row = [run_latents(pipe, image=_init_image(), **kw) for kw in calls]
    steps = [dcaccel.last_stats(pipe)]
    dcaccel.disable(pipe)
    for a, b in zip(fresh, in_a_row):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # strength 0.75 of 12 steps evaluates 9 times: full at 0, 3, 6
    assert steps[0].full_steps == [0, 3, 6] and steps[0].shallow_steps == [1, 2, 4, 5, 7, 8]


def test_reference_keeps_state_between_calls_and_we_do_not(tiny_pipe):
    """The documented defect: the reference's second img2img call with another strength differs from a fresh run."""
    from DeepCache import DeepCacheSDHelper

    pipe = tiny_pipe("tiny", "img2img")
    _scheduler(pipe, "ddim")
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    run_latents(pipe, image=_init_image(), steps=10, strength=0.9)
    second = run_latents(pipe, image=_init_image(), steps=10, strength=0.5)
    helper.disable()
    fresh = _reference(pipe, 3, 0, image=_init_image(), steps=10, strength=0.5)
    assert (second - fresh).abs().max() > 1e-4


@pytest.mark.parametrize("kwargs", [dict(guidance_scale=1.0), dict(num_images_per_prompt=2),
                                    dict(prompt=["a", "b"], guidance_scale=5.0)])
def test_batching_and_guidance_variants(tiny_pipe, kwargs):
    pipe = tiny_pipe("tiny")
    _scheduler(pipe, "ddim")
    ref = _reference(pipe, 2, 0, **kwargs)
    ours = _ours(pipe, DeepCacheConfig(interval=2, branch=0), **kwargs)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_pndm_repeated_timesteps_counted_by_position(tiny_pipe):
    """PNDM evaluates one timestep twice; we count evaluations, the reference looks the step up by value."""
    pipe = tiny_pipe("tiny")
    import diffusers

    pipe.scheduler = diffusers.PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    dcaccel.enable(pipe, DeepCacheConfig(interval=2, branch=0))
    out = run_latents(pipe, steps=6)
    stats = dcaccel.last_stats(pipe)
    dcaccel.disable(pipe)
    n = len(stats.full_steps) + len(stats.shallow_steps)
    timesteps = pipe.scheduler.timesteps.tolist()
    assert len(set(timesteps)) < len(timesteps) == n, "PNDM repeats a timestep"
    assert stats.full_steps == list(range(0, n, 2))
    assert torch.isfinite(out).all()
    interval_one = _ours(pipe, DeepCacheConfig(interval=1), steps=6)
    torch.testing.assert_close(interval_one, run_latents(pipe, steps=6), rtol=0, atol=0)


def test_feature_buffer_is_one_memory_across_steps(tiny_pipe):
    pipe = tiny_pipe("tiny")
    dcaccel.enable(pipe, DeepCacheConfig(interval=2, branch=3))
    runner = pipe.unet.runner
    ptrs = []
    original = runner.run_full

    def spy(inputs):
        out = original(inputs)
        ptrs.append(runner.feature.data_ptr())
        return out

    runner.run_full = spy
    run_latents(pipe, steps=8)
    run_latents(pipe, steps=8)
    assert len(ptrs) == 8 and len(set(ptrs)) == 1
    assert runner.cache_buffers.allocations == 1


def test_enable_disable_pairs(tiny_pipe):
    pipe = tiny_pipe("tiny")
    unet, cls, config = pipe.unet, type(pipe), dict(pipe.config)
    base = run_latents(pipe)
    dcaccel.enable(pipe, DeepCacheConfig(interval=2))
    assert dcaccel.is_enabled(pipe) and isinstance(pipe, cls)
    assert pipe.unet.config is unet.config and pipe.unet.dtype == unet.dtype
    with pytest.raises(RuntimeError, match="already enabled"):
        dcaccel.enable(pipe, DeepCacheConfig())
    dcaccel.disable(pipe)
    assert pipe.unet is unet and type(pipe) is cls and dict(pipe.config) == config
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
    torch.testing.assert_close(run_latents(pipe), base, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="not enabled"):
        dcaccel.disable(pipe)


def test_bad_inputs(tiny_pipe):
    import diffusers

    pipe = tiny_pipe("tiny")
    with pytest.raises(ValueError, match=r"branch must be in 0\.\.11 .*got 12"):
        dcaccel.enable(pipe, DeepCacheConfig(branch=12))
    with pytest.raises(ValueError, match="unknown backend 'trt'; choose from"):
        dcaccel.enable(pipe, DeepCacheConfig(), backend="trt")
    with pytest.raises(TypeError, match="config must be a dcaccel.DeepCacheConfig"):
        dcaccel.enable(pipe, {"interval": 3})
    assert not dcaccel.is_enabled(pipe), "a failed enable leaves the pipeline as it was"
    other = diffusers.DDPMPipeline(unet=diffusers.UNet2DModel(
        block_out_channels=(8, 8), norm_num_groups=8, sample_size=8, down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2), scheduler=diffusers.DDPMScheduler())
    with pytest.raises(TypeError, match="unsupported pipeline DDPMPipeline; dcaccel supports"):
        dcaccel.enable(other)
    dcaccel.enable(pipe, DeepCacheConfig(schedule="explicit", full_steps=[0, 9]))
    with pytest.raises(ValueError, match=r"full_steps \[9\] out of range for 6"):
        run_latents(pipe, steps=6)
    with pytest.raises(ValueError, match="cross_attention_kwargs"):
        run_latents(pipe, steps=2, cross_attention_kwargs={"scale": 0.5})


def test_nonuniform_schedule_in_a_pipeline(tiny_pipe):
    pipe = tiny_pipe("tiny")
    cfg = DeepCacheConfig(interval=3, schedule="nonuniform", center=4)
    dcaccel.enable(pipe, cfg)
    run_latents(pipe, steps=12)
    assert dcaccel.last_stats(pipe).full_steps == dcaccel.full_steps(cfg, 12)


# -- pipelines made from an enabled one ----------------------------------------------------------------------------

def _plain_img2img(pipe, **kw):
    import diffusers

    plain = diffusers.StableDiffusionImg2ImgPipeline(**{**pipe.components, "unet": pipe.unet})
    plain.set_progress_bar_config(disable=True)
    return run_latents(plain, image=_init_image(), **kw)


@pytest.mark.parametrize("derive", ["components", "from_pipe"])
def test_pipelines_derived_from_an_enabled_one_are_plain(tiny_pipe, derive):
    """A pipeline made from an enabled one gets the original U-Net: every call equals the plain pipeline's, before
    and after disable (it never shares the step loop, whose counting it would not reset)."""
    import diffusers

    pipe = tiny_pipe("tiny")
    _scheduler(pipe, "ddim")
    calls = [dict(steps=6, strength=0.9), dict(steps=5, strength=0.6)]
    expected = [_plain_img2img(pipe, **kw) for kw in calls]
    dcaccel.enable(pipe, DeepCacheConfig(interval=3, branch=0))
    if derive == "components":
        derived = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    else:
        derived = diffusers.AutoPipelineForImage2Image.from_pipe(pipe)
    derived.set_progress_bar_config(disable=True)
    assert derived.unet is dcaccel.enabled_state(pipe).denoiser
    for kw, want in zip(calls, expected):
        torch.testing.assert_close(run_latents(derived, image=_init_image(), **kw), want, rtol=0, atol=0)
    run_latents(pipe)  # the enabled pipeline still works, and the derived one is unaffected by it
    dcaccel.disable(pipe)
    torch.testing.assert_close(run_latents(derived, image=_init_image(), **calls[0]), expected[0], rtol=0, atol=0)


def test_the_step_loop_runs_only_inside_its_own_pipeline(tiny_pipe):
    """A pipeline given the enabled pipeline's `unet` (the step loop) explicitly gets a clear error while it is
    enabled, and runs the plain U-Net after disable: never DeepCache counted by someone else's calls."""
    import diffusers

    pipe = tiny_pipe("tiny")
    _scheduler(pipe, "ddim")
    expected = _plain_img2img(pipe, steps=6)
    dcaccel.enable(pipe, DeepCacheConfig(interval=3, branch=0))
    other = diffusers.StableDiffusionImg2ImgPipeline(**{**pipe.components, "unet": pipe.unet})
    other.set_progress_bar_config(disable=True)
    with pytest.raises(RuntimeError, match="DeepCache step loop of another pipeline"):
        run_latents(other, image=_init_image(), steps=6)
    with pytest.raises(RuntimeError, match="step loop of another pipeline"):
        dcaccel.enable(other)
    dcaccel.disable(pipe)
    torch.testing.assert_close(run_latents(other, image=_init_image(), steps=6), expected, rtol=0, atol=0)


# -- threads, weights, saving -------------------------------------------------------------------------------------

def test_calls_from_two_threads_are_serialised(tiny_pipe):
    """Two threads calling one enabled pipeline at once each get what a call alone gives: the second waits."""
    import threading
    import time

    pipe = tiny_pipe("tiny")
    _scheduler(pipe, "ddim")
    dcaccel.enable(pipe, DeepCacheConfig(interval=3, branch=0))
    alone = {seed: run_latents(pipe, seed=seed, steps=6) for seed in (1, 2)}
    runner = dcaccel.enabled_state(pipe).runner
    slow_full, slow_shallow = runner.run_full, runner.run_shallow

    def slowly(run):
        def wrapped(inputs):
            time.sleep(0.01)  # let the other thread in, if anything would
            return run(inputs)
        return wrapped

    runner.run_full, runner.run_shallow = slowly(slow_full), slowly(slow_shallow)
    got, errors = {}, []

    def call(seed):
        try:
            got[seed] = run_latents(pipe, seed=seed, steps=6)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=call, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for seed in (1, 2):
        torch.testing.assert_close(got[seed], alone[seed], rtol=0, atol=0)


def test_a_call_from_inside_a_call_is_refused(tiny_pipe):
    pipe = tiny_pipe("tiny")
    dcaccel.enable(pipe, DeepCacheConfig(interval=2))

    def inner(p, step, t, kwargs):
        p(prompt="x", num_inference_steps=2, height=32, width=32)
        return kwargs

    with pytest.raises(RuntimeError, match="already running a call in this thread"):
        pipe(prompt="x", num_inference_steps=2, height=32, width=32, callback_on_step_end=inner)
    run_latents(pipe)  # and the pipeline works afterwards


def test_weights_seen_through_the_step_loop_are_the_unets(tiny_pipe, tmp_path):
    import diffusers

    pipe = tiny_pipe("tiny")
    unet = pipe.unet
    dcaccel.enable(pipe, DeepCacheConfig(interval=2))
    assert list(pipe.unet.state_dict()) == list(unet.state_dict())
    assert [n for n, _ in pipe.unet.named_parameters()] == [n for n, _ in unet.named_parameters()]
    pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "unet" / "config.json").is_file()
    loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "saved" / "unet")
    for (n, a), (_, b) in zip(loaded.state_dict().items(), unet.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert dcaccel.is_enabled(pipe) and pipe.unet is not unet
    with pytest.raises(RuntimeError, match=r"disable\(pipe\) before replacing pipe.unet"):
        pipe.unet = loaded
    dcaccel.disable(pipe)
    assert pipe.unet is unet


def test_load_state_dict_through_the_step_loop_changes_the_unet(tiny_pipe):
    pipe = tiny_pipe("tiny")
    unet = pipe.unet
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    dcaccel.enable(pipe, DeepCacheConfig(interval=2))
    try:
        changed = {k: v * 1.01 if v.is_floating_point() else v for k, v in original.items()}
        pipe.unet.load_state_dict(changed)
        torch.testing.assert_close(unet.conv_out.weight, changed["conv_out.weight"], rtol=0, atol=0)
    finally:
        unet.load_state_dict(original)
        dcaccel.disable(pipe)
