"""DeepCache on SD 3.x (the MMDiT family): the split, the pipelines, equality with cache-dit's static DBCache,
engines, bad inputs. On a tiny SD3 transformer with 4 joint blocks: 0-1 with dual attention, the last one
context_pre_only (no text output)."""

import functools
import os

import numpy as np
import pytest
import torch
from PIL import Image

import dcaccel
from dcaccel import DeepCacheConfig
from dcaccel.families.mmdit import graph_specs, split_transformer

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
N_BLOCKS = 4
CUTS = [(h, t) for h in range(N_BLOCKS) for t in range(N_BLOCKS - h)]


@functools.lru_cache(maxsize=None)
def _pipe(task="text2img"):
    from dcaccel.models import build_pipeline

    pipe = build_pipeline("tiny-sd3", task, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sd3():
    made = []

    def make(task="text2img"):
        made.append(_pipe(task))
        return made[-1]

    yield make
    for pipe in made:
        if dcaccel.is_enabled(pipe):
            dcaccel.disable(pipe)


def _inputs(transformer, batch=2, seed=0, text_len=333):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return {"hidden_states": torch.randn(batch, cfg.in_channels, 16, 16, generator=g),
            "timestep": torch.full((batch,), 700.0),
            "encoder_hidden_states": torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g)}


def _image(seed=1):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def run(pipe, steps=6, seed=0, **kwargs):
    kwargs.setdefault("prompt", "a red circle")
    if "image" not in kwargs or "mask_image" in kwargs:
        kwargs.setdefault("height", 32)
        kwargs.setdefault("width", 32)
    return pipe(num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(seed),
                **kwargs).images


def _ours(pipe, config, **kwargs):
    dcaccel.enable(pipe, config)
    try:
        return run(pipe, **kwargs), dcaccel.last_stats(pipe)
    finally:
        dcaccel.disable(pipe)


# -- the split ------------------------------------------------------------------------------------------------

def test_the_tiny_model_has_what_the_tests_need(sd3):
    blocks = sd3().transformer.transformer_blocks
    assert len(blocks) == N_BLOCKS and blocks[-1].context_pre_only and not blocks[0].context_pre_only
    assert [b.attn2 is not None for b in blocks] == [True, True, False, False]  # dual attention in 0 and 1


@pytest.mark.parametrize("head, tail", CUTS)
def test_every_cut_reproduces_the_transformer(sd3, head, tail):
    tr = sd3().transformer
    inputs = _inputs(tr)
    with torch.no_grad():
        ref = tr(**inputs).sample
        full, shallow = split_transformer(tr, head, tail)
        noise, feature = full(**inputs)
        torch.testing.assert_close(noise, ref, rtol=0, atol=0)  # bit for bit
        assert isinstance(feature, tuple) == (tail > 0)  # a text residual only when a tail block reads it
        # fed the feature of the same inputs, the shallow graph reproduces the full one (up to the rounding of
        # adding back the residual it was given: (h_mid - h_head) + h_head)
        torch.testing.assert_close(shallow(**inputs, feature=feature), noise, rtol=1e-5, atol=1e-5)


def test_cached_step_runs_only_head_and_tail_blocks(sd3):
    tr = sd3().transformer
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in
               enumerate(tr.transformer_blocks)]
    try:
        full, shallow = split_transformer(tr, 1, 1)
        inputs = _inputs(tr)
        with torch.no_grad():
            _, feature = full(**inputs)
            assert calls == [0, 1, 2, 3]
            calls.clear()
            shallow(**inputs, feature=feature)
        assert calls == [0, 3]
    finally:
        for h in handles:
            h.remove()


def test_specs_name_the_cache_tensors_and_their_shapes(sd3):
    from dcaccel.config import BuildConfig

    tr = sd3().transformer
    specs = graph_specs(tr, 1, 1, BuildConfig(height=32, width=32), vae_scale=2, text_len=333)
    assert specs["full"].cache == ("feature_image", "feature_text")
    shapes = specs["full"].shapes()
    assert shapes["feature_image"] == (2, 64, 16) and shapes["feature_text"] == (2, 333, 16)
    assert [t.name for t in specs["shallow"].inputs][-2:] == ["feature_image", "feature_text"]
    assert graph_specs(tr, 2, 0, BuildConfig(height=32, width=32), 2, 333)["full"].cache == ("feature_image",)
    with pytest.raises(ValueError, match=r"height must be a multiple of 16 \(VAE factor 8 x patch size 2\)"):
        graph_specs(tr, 1, 1, BuildConfig(height=40, width=32), 8, 333)


# -- pipelines -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["text2img", "img2img", "inpaint"])
def test_interval_one_is_the_plain_pipeline(sd3, task):
    pipe = sd3(task)
    kw = {} if task == "text2img" else {"image": _image(), "strength": 0.7}
    if task == "inpaint":
        kw["mask_image"] = Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8))
    base = run(pipe, **kw)
    ours, _ = _ours(pipe, DeepCacheConfig(interval=1, head_blocks=1, tail_blocks=1), **kw)
    torch.testing.assert_close(ours, base, rtol=0, atol=0)
    cached, stats = _ours(pipe, DeepCacheConfig(interval=3, head_blocks=1, tail_blocks=1), **kw)
    assert (cached - base).abs().max() > 1e-3
    assert stats.full_steps[:2] == [0, 3]


def _cache_dit(pipe, interval, head, tail, steps, **kwargs):
    import cache_dit
    from cache_dit import DBCacheConfig

    from dcaccel.schedule import full_step_mask

    n = int(steps * kwargs["strength"]) if "strength" in kwargs else steps
    mask = [int(f) for f in full_step_mask(DeepCacheConfig(interval=interval), n)]
    cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(
        Fn_compute_blocks=head, Bn_compute_blocks=tail, steps_computation_mask=mask,
        steps_computation_policy="static"))
    try:
        out = run(pipe, steps=steps, **kwargs)
        cached = cache_dit.summary(pipe, logging=False)[0].cached_steps
    finally:
        cache_dit.disable_cache(pipe)
    assert sorted(cached) == [i for i, m in enumerate(mask) if not m]
    return out


@pytest.mark.parametrize("interval, head, tail", [(2, 1, 0), (3, 1, 1), (3, 2, 1), (2, 1, 2), (4, 3, 0)])
@pytest.mark.parametrize("task", ["text2img", "img2img"])
def test_matches_cache_dit_static_dbcache(sd3, interval, head, tail, task):
    pytest.importorskip("cache_dit")
    pipe = sd3(task)
    kw = {} if task == "text2img" else {"image": _image(), "strength": 0.75}
    ref = _cache_dit(pipe, interval, head, tail, steps=8, **kw)
    ours, _ = _ours(pipe, DeepCacheConfig(interval=interval, head_blocks=head, tail_blocks=tail), steps=8, **kw)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_consecutive_calls_each_equal_a_fresh_run(sd3):
    pipe = sd3("img2img")
    cfg = DeepCacheConfig(interval=3, head_blocks=1, tail_blocks=1)
    calls = [dict(steps=10, strength=0.9), dict(steps=7, strength=0.5), dict(steps=12, strength=0.75)]
    fresh = [_ours(pipe, cfg, image=_image(), **kw)[0] for kw in calls]
    dcaccel.enable(pipe, cfg)
    in_a_row = [run(pipe, image=_image(), **kw) for kw in calls]
    dcaccel.disable(pipe)
    for a, b in zip(fresh, in_a_row):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [dict(guidance_scale=1.0), dict(num_images_per_prompt=2),
                                    dict(prompt=["a", "b"], negative_prompt=["c", "d"])])
def test_batches_and_guidance(sd3, kwargs):
    pipe = sd3()
    base = run(pipe, **kwargs)
    ours, _ = _ours(pipe, DeepCacheConfig(interval=1), **kwargs)
    torch.testing.assert_close(ours, base, rtol=0, atol=0)


def test_enable_disable_pairs(sd3):
    pipe = sd3()
    tr, cls, config = pipe.transformer, type(pipe), dict(pipe.config)
    base = run(pipe)
    dcaccel.enable(pipe, DeepCacheConfig(interval=2, head_blocks=0, tail_blocks=2))
    assert pipe.transformer.config is tr.config
    with pytest.raises(RuntimeError, match="already enabled"):
        dcaccel.enable(pipe, DeepCacheConfig())
    dcaccel.disable(pipe)
    assert pipe.transformer is tr and type(pipe) is cls and dict(pipe.config) == config
    torch.testing.assert_close(run(pipe), base, rtol=0, atol=0)


@pytest.mark.parametrize("config, match", [
    (DeepCacheConfig(branch=0), r"branch cuts a U-Net; .*give head_blocks and tail_blocks"),
    (DeepCacheConfig(head_blocks=2, tail_blocks=2), r"head_blocks \+ tail_blocks must be less than the number of "
                                                    r"blocks \(4\)"),
    (DeepCacheConfig(head_blocks=4, tail_blocks=0), "must be less than the number of blocks"),
])
def test_bad_cuts(sd3, config, match):
    pipe = sd3()
    with pytest.raises(ValueError, match=match):
        dcaccel.enable(pipe, config)
    assert not dcaccel.is_enabled(pipe)


@pytest.mark.parametrize("head, tail, match", [
    (-1, 1, r"head_blocks must be an integer >= 0, got -1"), (1, -1, r"tail_blocks must be an integer >= 0, got -1"),
    (1.0, 1, r"head_blocks must be an integer >= 0, got 1.0 \(float\)"), ("1", 1, r"got '1' \(str\)"),
    (True, 1, r"got True \(bool\)"), (2, 2, r"head_blocks \+ tail_blocks must be less than"),
])
def test_split_transformer_validates_its_cut(sd3, head, tail, match):
    with pytest.raises(ValueError, match=match):
        dcaccel.split_transformer(sd3().transformer, head, tail)


def test_split_transformer_is_exported_beside_split_unet(sd3):
    from dcaccel.families.mmdit import FullMMDiT, ShallowMMDiT

    full, shallow = dcaccel.split_transformer(sd3().transformer, 1, 1)
    assert isinstance(full, FullMMDiT) and isinstance(shallow, ShallowMMDiT)
    assert "split_transformer" in dcaccel.__all__ and "split_unet" in dcaccel.__all__
    with pytest.raises(TypeError, match="unsupported model"):
        dcaccel.split_transformer(torch.nn.Linear(2, 2))


def test_transformer_settings_on_a_unet_are_refused(tiny_pipe):
    with pytest.raises(ValueError, match=r"head_blocks/tail_blocks cut a transformer; .*give branch"):
        dcaccel.enable(tiny_pipe(), DeepCacheConfig(head_blocks=1, tail_blocks=1))


def test_refused_call_arguments(sd3):
    pipe = sd3()
    dcaccel.enable(pipe, DeepCacheConfig(interval=2))
    with pytest.raises(ValueError, match=r"joint_attention_kwargs \['scale'\] are not supported"):
        run(pipe, joint_attention_kwargs={"scale": 0.5})
    with pytest.raises(ValueError, match=r"skip_guidance_layers must be a list of block indices \(ints\)"):
        run(pipe, skip_guidance_layers=["1"])
    run(pipe)  # still works


# -- skip-layer guidance (SD 3.5) ---------------------------------------------------------------------------------

SLG = dict(skip_guidance_layers=[1, 2], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.7)
SLG_STEPS = [1, 2, 3, 4]  # i > 0 and i < 0.7 * 7 of 7 steps: diffusers' window


def test_skip_layer_guidance_at_interval_one_is_the_plain_pipeline(sd3):
    pipe = sd3()
    plain = run(pipe, steps=7, **SLG)
    assert not torch.equal(plain, run(pipe, steps=7))  # it changes the image
    got, stats = _ours(pipe, DeepCacheConfig(interval=1), steps=7, **SLG)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    assert [(step, what) for step, what, _ in stats.extra] == [(i, "skip_layers") for i in SLG_STEPS]
    assert stats.full_steps == list(range(7))


def test_skip_layer_guidance_runs_in_full_outside_the_schedule(sd3):
    """With caching: the schedule is the one without skip-layer guidance (not shifted by the extra calls), and
    each skip-layer evaluation is the transformer run in full with those blocks left out, on the step's inputs."""
    pipe = sd3()
    cfg = DeepCacheConfig(interval=3, head_blocks=1, tail_blocks=1)
    without, stats0 = _ours(pipe, cfg, steps=7)
    seen = []
    transformer = pipe.transformer

    def record(module, args, kwargs, output):
        if "skip_layers" in kwargs:
            seen.append((kwargs, output[0]))

    handle = transformer.register_forward_hook(record, with_kwargs=True)
    try:
        got, stats = _ours(pipe, cfg, steps=7, **SLG)
    finally:
        handle.remove()
    assert stats.full_steps == stats0.full_steps == [0, 3, 6] and stats.shallow_steps == stats0.shallow_steps
    assert [step for step, _, _ in stats.extra] == SLG_STEPS and len(seen) == len(SLG_STEPS)
    assert not torch.equal(got, without)
    for kwargs, output in seen:
        assert kwargs["skip_layers"] == [1, 2] and kwargs["hidden_states"].shape[0] == 1  # the text half only
        with torch.no_grad():
            inputs = {k: kwargs[k] for k in ("hidden_states", "timestep", "encoder_hidden_states",
                                             "pooled_projections")}
            again = transformer(**inputs, skip_layers=[1, 2], return_dict=False)[0]
        torch.testing.assert_close(output, again, rtol=0, atol=0)


def test_skip_layer_guidance_is_refused_on_engines_before_the_call(sd3, sd3_engine):
    pipe = sd3()
    dcaccel.enable(pipe, DeepCacheConfig(interval=3, head_blocks=1, tail_blocks=1), backend="onnxruntime",
                   engine_dir=sd3_engine)
    try:
        calls = []
        handle = dcaccel.enabled_state(pipe).wrapper.register_forward_pre_hook(lambda *a: calls.append(1))
        with pytest.raises(ValueError, match="supported on the eager and torch_compile backends"):
            run(pipe, **SLG)
        assert calls == []  # refused before anything ran
        handle.remove()
        run(pipe)  # and the pipeline goes on
    finally:
        dcaccel.disable(pipe)


@pytest.mark.slow  # three graphs compiled
def test_skip_layer_guidance_on_torch_compile(sd3):
    pipe = sd3()
    cfg = DeepCacheConfig(interval=3, head_blocks=1, tail_blocks=1)
    eager, _ = _ours(pipe, cfg, steps=7, **SLG)
    dcaccel.enable(pipe, cfg, backend="torch_compile", height=32, width=32)
    try:
        got = run(pipe, steps=7, **SLG)
        again = run(pipe, steps=7, **SLG)
        stats = dcaccel.last_stats(pipe)
    finally:
        dcaccel.disable(pipe)
    torch.testing.assert_close(got, eager, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    assert [step for step, _, _ in stats.extra] == SLG_STEPS


# -- engines ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3_engine(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from dcaccel.config import BuildConfig
    from dcaccel.engines import build_engines

    directory, _ = build_engines(_pipe(), BuildConfig(height=32, width=32, head_blocks=1, tail_blocks=1,
                                                      backend="onnxruntime"),
                                 out_dir=tmp_path_factory.mktemp("engines"), model_name="tiny-sd3")
    return directory


def test_onnxruntime_engine_equals_eager(sd3, sd3_engine):
    from dcaccel.engines import Manifest

    data = Manifest.read(sd3_engine).data
    assert data["family"] == "mmdit" and data["build"]["head_blocks"] == 1 and data["build"]["tail_blocks"] == 1
    assert set(data["graphs"]["full"]["tolerance"]["reached"]) == {"noise", "feature_image", "feature_text"}
    from dcaccel.graphs.weights import read_weight_map

    wmap = read_weight_map(sd3_engine / "full.weights.json", "full")
    # the cropped position embedding is folded into a constant that depends on no parameter: still refittable
    assert wmap["constants"] and not wmap["unmatched"]
    pipe = sd3()
    cfg = DeepCacheConfig(interval=3, head_blocks=1, tail_blocks=1)
    eager, _ = _ours(pipe, cfg)
    dcaccel.enable(pipe, cfg, backend="onnxruntime", engine_dir=sd3_engine)
    try:
        runner = dcaccel.enabled_state(pipe).runner
        ptrs = {n: t.data_ptr() for n, t in runner.cache.items()}
        got = run(pipe)
        assert {n: t.data_ptr() for n, t in runner.cache.items()} == ptrs  # bound once
    finally:
        dcaccel.disable(pipe)
    torch.testing.assert_close(got, eager, atol=2e-4, rtol=1e-3)
    with pytest.raises(Exception, match=r"build.tail_blocks: engine has 1, pipeline needs 0"):
        dcaccel.enable(pipe, DeepCacheConfig(head_blocks=1, tail_blocks=0), backend="onnxruntime",
                       engine_dir=sd3_engine)


@pytest.mark.slow
def test_torch_compile_equals_eager(sd3):
    pipe = sd3()
    cfg = DeepCacheConfig(interval=3, head_blocks=1, tail_blocks=1)
    eager, _ = _ours(pipe, cfg)
    dcaccel.enable(pipe, cfg, backend="torch_compile", height=32, width=32)
    try:
        got = run(pipe)
        with torch.inference_mode():
            again = run(pipe)
    finally:
        dcaccel.disable(pipe)
    torch.testing.assert_close(got, eager, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


# -- LoRA -------------------------------------------------------------------------------------------------------

def _sd3_lora(transformer, path, seed, rank=4, std=0.2):
    """An SD3 LoRA in diffusers' format: transformer.<module>.lora_A/B.weight on every attention projection."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "add_q_proj")):
            out_f, in_f = module.weight.shape
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * std
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * std
    save_file(tensors, str(path))
    return path


def test_lora_fused_and_swapped_on_sd3(sd3, sd3_engine, tmp_path):
    from dcaccel.lora import LoraSpec, apply_loras, current_loras, remove_loras, swap_loras

    pipe = sd3()
    a = _sd3_lora(pipe.transformer, tmp_path / "a.safetensors", seed=1)
    b = _sd3_lora(pipe.transformer, tmp_path / "b.safetensors", seed=2)
    cfg = DeepCacheConfig(interval=3, head_blocks=1, tail_blocks=1)
    dcaccel.enable(pipe, cfg)
    plain = run(pipe)
    apply_loras(pipe, [LoraSpec(a, 0.8)], fuse=False)
    unfused_a = run(pipe)
    remove_loras(pipe)
    apply_loras(pipe, [LoraSpec(a, 0.8)])
    torch.testing.assert_close(run(pipe), unfused_a, atol=1e-4, rtol=1e-4)  # fused equals unfused
    assert (unfused_a - plain).abs().max() > 1e-2
    swap_loras(pipe, [b])
    eager_b = run(pipe)
    remove_loras(pipe)
    torch.testing.assert_close(run(pipe), plain, rtol=0, atol=0)  # weights restored bit for bit
    dcaccel.disable(pipe)
    # onnxruntime: a swap refits the built graphs (no export) and gives what eager gives
    dcaccel.enable(pipe, cfg, backend="onnxruntime", engine_dir=sd3_engine)
    try:
        swap_loras(pipe, [b])
        assert dcaccel.enabled_state(pipe).runner.loras == current_loras(pipe)
        torch.testing.assert_close(run(pipe), eager_b, atol=2e-4, rtol=1e-3)
        remove_loras(pipe)
    finally:
        dcaccel.disable(pipe)
