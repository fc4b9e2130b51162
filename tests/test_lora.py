"""dcaccel.lora: LoRA files in diffusers/PEFT and kohya formats fused into DeepCache pipelines on each backend,
swapped without a rebuild (equal to a fresh build), recorded in manifests, and every bad input refused with a
clear error and the pipeline left exactly as it was."""

import hashlib
import math

import pytest
import torch
from safetensors.torch import save_file

import dcaccel
from dcaccel.engines import Manifest, build_engines, open_runner, weights_hash
from dcaccel.errors import EngineError
from dcaccel.config import BuildConfig, DeepCacheConfig
from dcaccel.lora import (LoraSpec, apply_loras, current_loras, lora_record, remove_loras, swap_loras,
                          use_lcm_lora)
from dcaccel.families.unet import split_unet

from conftest import run_latents

CONFIG = DeepCacheConfig(interval=3, branch=1)  # branch 1: the shallow graph runs attention, which LoRAs change
LINEAR = ("to_q", "to_k", "to_v", "to_out.0")
CONV = ("conv_in", "proj_in", "proj_out", "conv1")  # conv_in: a direct child of the U-Net; conv1: 3x3 LoCon


def _targets(unet):
    return {n: m for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and n.endswith(LINEAR)
            or isinstance(m, torch.nn.Conv2d) and n.split(".")[-1] in CONV}


def write_lora(unet, path, fmt="peft", seed=0, rank=4, alpha=None, std=0.15, shapes=None, extra=None):
    """A LoRA for `unet`'s attention projections and some convolutions with random, clearly visible values, in
    diffusers/PEFT keys (`unet.<module>.lora_A/B.weight`) or kohya keys (`lora_unet_<module>.lora_down/up.weight`
    and `.alpha`). `shapes` overrides a module's weight shape, `extra` adds raw keys."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in _targets(unet).items():
        out_ch, in_ch, *kernel = (shapes or {}).get(name, tuple(module.weight.shape))
        a = torch.randn(rank, in_ch, *kernel, generator=g) * std
        b = torch.randn(out_ch, rank, *([1] * len(kernel)), generator=g) * std
        if fmt == "peft":
            tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"] = a, b
        else:
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = a, b
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha or rank))
    tensors.update(extra or {})
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Two LoRAs for the tiny U-Net: A in diffusers/PEFT keys, B in kohya keys with alpha = rank / 2."""
    from conftest import _pipe

    unet = _pipe("tiny", "text2img").unet
    d = tmp_path_factory.mktemp("loras")
    return {"A": LoraSpec(write_lora(unet, d / "a.safetensors", "peft", seed=1), scale=0.8),
            "B": LoraSpec(write_lora(unet, d / "b-kohya.safetensors", "kohya", seed=2, alpha=2), scale=1.25)}


@pytest.fixture
def pipe(tiny_pipe):
    """The shared tiny pipeline; checked to come back with its own weights and without LoRAs."""
    p = tiny_pipe("tiny")
    before = weights_hash(p.unet)
    yield p
    if dcaccel.is_enabled(p):
        dcaccel.disable(p)  # first: removing the LoRAs then needs no refit (a recompile, with torch_compile)
    if current_loras(p):
        remove_loras(p)
    assert weights_hash(p.unet) == before and not p.get_list_adapters()


def _unet(pipe):
    return pipe.unet.denoiser if dcaccel.is_enabled(pipe) else pipe.unet


def _eager(pipe, lora=None, fuse=True, config=CONFIG, **call):
    """Latents of eager DeepCache with `lora` applied; the pipeline is left as it came."""
    dcaccel.enable(pipe, config)
    try:
        if lora is not None:
            apply_loras(pipe, [lora], fuse=fuse)
        return run_latents(pipe, **call)
    finally:
        if lora is not None:
            remove_loras(pipe)
        dcaccel.disable(pipe)


@pytest.mark.parametrize("which", ["A", "B"])
def test_fused_equals_unfused_with_deepcache(pipe, loras, which):
    base = _eager(pipe)
    unfused = _eager(pipe, loras[which], fuse=False)
    fused = _eager(pipe, loras[which])
    assert (unfused - base).abs().max() > 0.1, "the LoRA must change the output visibly"
    torch.testing.assert_close(fused, unfused, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(_eager(pipe), base, rtol=0, atol=0)  # removed: the weights are back bit for bit


def test_apply_before_or_after_enable_and_interval_one_is_plain_diffusers(pipe, loras):
    apply_loras(pipe, [loras["A"]])
    dcaccel.enable(pipe, CONFIG)
    before = run_latents(pipe)
    dcaccel.disable(pipe)
    remove_loras(pipe)
    torch.testing.assert_close(_eager(pipe, loras["A"]), before, rtol=0, atol=0)
    # interval 1 with the fused LoRA equals diffusers' own unfused LoRA without DeepCache
    pipe.load_lora_weights(str(loras["A"].path), adapter_name="plain")
    pipe.set_adapters(["plain"], [loras["A"].scale])
    plain = run_latents(pipe)
    pipe.unload_lora_weights()
    for p in pipe.unet.parameters():
        p.requires_grad_(True)  # PEFT froze them
    torch.testing.assert_close(_eager(pipe, loras["A"], config=DeepCacheConfig(interval=1)), plain,
                               atol=2e-4, rtol=1e-4)


def test_several_loras_and_records(pipe, loras):
    both = [loras["A"], loras["B"]]
    unfused = _eager_many(pipe, both, fuse=False)
    fused = _eager_many(pipe, both)
    torch.testing.assert_close(fused, unfused, atol=2e-4, rtol=1e-4)
    record = lora_record(both)
    assert record == [{"name": "a", "sha256": hashlib.sha256(loras["A"].path.read_bytes()).hexdigest(), "scale": 0.8},
                      {"name": "b_kohya", "sha256": hashlib.sha256(loras["B"].path.read_bytes()).hexdigest(),
                       "scale": 1.25}]
    apply_loras(pipe, both)
    assert current_loras(pipe) == record
    with pytest.raises(RuntimeError, match="already applied; use dcaccel.lora.swap_loras"):
        apply_loras(pipe, both)


def _eager_many(pipe, specs, fuse=True):
    dcaccel.enable(pipe, CONFIG)
    try:
        apply_loras(pipe, specs, fuse=fuse)
        return run_latents(pipe)
    finally:
        remove_loras(pipe)
        dcaccel.disable(pipe)


def test_swap_equals_applying_from_scratch_eager(pipe, loras):
    fresh = _eager(pipe, loras["B"])
    apply_loras(pipe, [loras["B"]])
    fresh_hash = weights_hash(pipe.unet)
    remove_loras(pipe)
    dcaccel.enable(pipe, CONFIG)
    apply_loras(pipe, [loras["A"]])
    swap_loras(pipe, [loras["B"]])
    assert weights_hash(pipe.unet.denoiser) == fresh_hash, "a swap restores the weights exactly before fusing"
    assert pipe.unet.runner.loras == current_loras(pipe) == lora_record([loras["B"]])
    torch.testing.assert_close(run_latents(pipe), fresh, rtol=0, atol=0)
    swap_loras(pipe, [])
    assert current_loras(pipe) == [] and pipe.unet.runner.loras == []


# -- onnxruntime: refit instead of rebuild --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ort_dir_b(loras, tmp_path_factory):
    """ONNX engines for the tiny pipeline with LoRA B fused, built once, recording B in the manifest."""
    pytest.importorskip("onnxruntime")
    from conftest import _pipe

    p = _pipe("tiny", "text2img")
    apply_loras(p, [loras["B"]])
    try:
        build = BuildConfig(height=32, width=32, branch=CONFIG.branch, backend="onnxruntime")
        directory, _ = build_engines(p, build, out_dir=tmp_path_factory.mktemp("engines"), model_name="tiny",
                                     loras=current_loras(p))
    finally:
        remove_loras(p)
    return directory


def test_onnxruntime_refit_equals_a_fresh_build(pipe, loras, ort_dir_b):
    unfused_a = _eager(pipe, loras["A"], fuse=False)
    eager_b = _eager(pipe, loras["B"])
    apply_loras(pipe, [loras["B"]])
    dcaccel.enable(pipe, CONFIG, backend="onnxruntime", engine_dir=ort_dir_b)
    runner = pipe.unet.runner
    assert runner.loras == lora_record([loras["B"]])
    fresh_b = run_latents(pipe)
    torch.testing.assert_close(fresh_b, eager_b, atol=1e-3, rtol=1e-3)

    swap_loras(pipe, [loras["A"]])  # new weights in both graphs, no export
    assert runner.loras == lora_record([loras["A"]])
    sample = runner.specs["full"].sample_inputs(seed=3)
    full, shallow = split_unet(pipe.unet.denoiser, CONFIG.branch)
    with torch.no_grad():
        noise, feature = full(**sample)
        torch.testing.assert_close(runner.run_full(sample), noise, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(runner.run_shallow(sample), shallow(**sample, feature=feature), atol=1e-4,
                                   rtol=1e-4)
    torch.testing.assert_close(run_latents(pipe), unfused_a, atol=1e-3, rtol=1e-3)

    swap_loras(pipe, [loras["B"]])  # back to B by refit: what the fresh build gave
    torch.testing.assert_close(run_latents(pipe), fresh_b, atol=1e-6, rtol=0)


def test_engine_built_for_one_lora_is_refused_for_another(pipe, loras, ort_dir_b):
    data = Manifest.read(ort_dir_b).data
    assert data["loras"] == [{"name": "b_kohya", "sha256": hashlib.sha256(loras["B"].path.read_bytes()).hexdigest(),
                              "scale": 1.25}]
    apply_loras(pipe, [loras["A"]])
    with pytest.raises(EngineError, match=r"(?s)loras: engine has .*b_kohya.*pipeline needs .*\"a\""):
        open_runner(pipe, CONFIG, "onnxruntime", engine_dir=ort_dir_b)
    with pytest.raises(EngineError, match="loras: engine has"):
        dcaccel.enable(pipe, CONFIG, backend="onnxruntime", engine_dir=ort_dir_b)
    assert not dcaccel.is_enabled(pipe)
    swap_loras(pipe, [LoraSpec(loras["B"].path, scale=1.0)])  # same file, another scale: another engine
    with pytest.raises(EngineError, match="loras: engine has"):
        dcaccel.enable(pipe, CONFIG, backend="onnxruntime", engine_dir=ort_dir_b)


# -- torch.compile ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("freezing", [False, True])
def test_torch_compile_fuse_and_swap(pipe, loras, freezing):
    """freezing=False: a swap changes the weights in place and nothing recompiles (the fail_on_recompile stance
    would raise); freezing=True: the refit compiles both graphs again."""
    unfused_a = _eager(pipe, loras["A"], fuse=False)
    eager_b = _eager(pipe, loras["B"])
    dcaccel.enable(pipe, CONFIG, backend="torch_compile", height=32, width=32, freezing=freezing)
    runner = pipe.unet.runner
    first_compile = runner.compile_seconds
    apply_loras(pipe, [loras["A"]])
    torch.testing.assert_close(run_latents(pipe), unfused_a, atol=1e-3, rtol=1e-3)
    swap_loras(pipe, [loras["B"]])
    torch.testing.assert_close(run_latents(pipe), eager_b, atol=1e-3, rtol=1e-3)
    assert runner.loras == lora_record([loras["B"]])
    assert (runner.compile_seconds != first_compile) == freezing


# -- LCM-LoRA --------------------------------------------------------------------------------------------------


def test_lcm_lora_with_deepcache(pipe, tmp_path):
    import diffusers

    lcm = write_lora(pipe.unet, tmp_path / "lcm.safetensors", "kohya", seed=3, alpha=8, rank=8, std=0.05)
    ddim = pipe.scheduler
    call = use_lcm_lora(pipe, lcm, num_inference_steps=4, guidance_scale=1.0)
    try:
        assert isinstance(pipe.scheduler, diffusers.LCMScheduler) and pipe.unet.config.time_cond_proj_dim is None
        call = {"steps": call["num_inference_steps"], "guidance_scale": call["guidance_scale"]}
        plain = run_latents(pipe, **call)
        for guidance in (1.0, 1.5):  # without and with classifier-free guidance
            dcaccel.enable(pipe, DeepCacheConfig(interval=1))
            exact = run_latents(pipe, **{**call, "guidance_scale": guidance})
            dcaccel.disable(pipe)
            dcaccel.enable(pipe, DeepCacheConfig(interval=2, branch=0))
            cached = run_latents(pipe, **{**call, "guidance_scale": guidance})
            assert dcaccel.last_stats(pipe).full_steps == [0, 2]
            dcaccel.disable(pipe)
            assert torch.isfinite(cached).all() and (cached - exact).abs().max() > 0
            if guidance == 1.0:
                torch.testing.assert_close(exact, plain, rtol=0, atol=0)
    finally:
        pipe.scheduler = ddim


# -- bad input: a clear error, and the pipeline exactly as it was ----------------------------------------------


def _state(pipe):
    unet = _unet(pipe)
    return {"weights": weights_hash(unet), "text_encoder": weights_hash(pipe.text_encoder),
            "names": sorted(k for m in (unet, pipe.text_encoder) for k in m.state_dict()), "requires_grad": [p.requires_grad for p in unet.parameters()],
            "adapters": pipe.get_list_adapters(), "enabled": dcaccel.is_enabled(pipe), "loras": current_loras(pipe),
            "runner_loras": pipe.unet.runner.loras if dcaccel.is_enabled(pipe) else None, "unet": id(pipe.unet)}


def _bad_loras(unet, d):
    from conftest import _pipe

    other = _pipe("tiny-xl", "text2img").unet
    wide = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 48)}
    junk = {"unet.down_blocks.0.attentions.0.nonexistent.lora_A.weight": torch.zeros(4, 32),
            "unet.down_blocks.0.attentions.0.nonexistent.lora_B.weight": torch.zeros(32, 4)}
    kohya_junk = {"lora_unet_mid_block_no_such_module.lora_down.weight": torch.zeros(4, 32),
                  "lora_unet_mid_block_no_such_module.lora_up.weight": torch.zeros(32, 4)}
    (d / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    integer = {f"unet.{name}.lora_A.weight": torch.ones(4, 32, dtype=torch.int64)}  # replaces the float one
    return {
        "missing": (d / "nope.safetensors", FileNotFoundError, r"LoRA file .*nope\.safetensors does not exist"),
        "unknown keys": (write_lora(unet, d / "junk.safetensors", "peft", extra=junk), ValueError,
                         r"2 keys name 1 module the pipeline's models do not have: unet\.down_blocks\.0\.attentions\.0\."
                         r"nonexistent$"),
        "unknown kohya keys": (write_lora(unet, d / "kjunk.safetensors", "kohya", extra=kohya_junk), ValueError,
                               r"2 keys name 1 module .*: unet\.mid_block\.no\.such\.module$"),
        "mixed formats": (write_lora(unet, d / "mixed.safetensors", "kohya", extra=junk), ValueError,
                          r"kohya-style keys .* beside keys of another format"),
        "other architecture": (write_lora(other, d / "xl.safetensors", "peft"), ValueError,
                               r"does not fit this pipeline"),
        "shapes": (write_lora(unet, d / "wide.safetensors", "peft", shapes=wide), ValueError,
                   r"attn1\.to_q: the LoRA's update has shape \(32, 48\).*the weight is \(32, 32\)"),
        "not safetensors": (d / "garbage.safetensors", ValueError, r"is not a safetensors file"),
        "integer tensor": (write_lora(unet, d / "int.safetensors", "peft", extra=integer), ValueError,
                           r"1 tensor is not floating point \(unet\.down_blocks\.0.*lora_A\.weight: int64\)"),
    }


@pytest.mark.parametrize("enabled", [False, True])
def test_bad_loras_leave_the_pipeline_as_it_was(pipe, loras, tmp_path, enabled):
    bad = _bad_loras(pipe.unet, tmp_path)
    if enabled:
        dcaccel.enable(pipe, CONFIG)
        apply_loras(pipe, [loras["A"]])
        before_latents = run_latents(pipe)
    before = _state(pipe)
    for case, (path, error, match) in bad.items():
        change = (lambda p: swap_loras(pipe, [loras["B"], p])) if enabled else (lambda p: apply_loras(pipe, [p]))
        with pytest.raises(error, match=match):
            change(path)
        assert _state(pipe) == before, case
    if enabled:
        torch.testing.assert_close(run_latents(pipe), before_latents, rtol=0, atol=0)


def test_a_failure_inside_diffusers_loader_is_rolled_back(pipe, tmp_path, monkeypatch):
    """Without dcaccel's up-front checks, an integer tensor fails inside diffusers' loader, after PEFT layers were
    put into the U-Net: the rollback still leaves every weight, name and flag as it was."""
    import dcaccel.lora

    monkeypatch.setattr(dcaccel.lora, "_check_tensors", lambda path, tensors: None)
    path = _bad_loras(pipe.unet, tmp_path)["integer tensor"][0]
    before = _state(pipe)
    with pytest.raises(Exception):
        apply_loras(pipe, [path])
    assert _state(pipe) == before


def test_other_architecture_names_modules_and_shapes(pipe, tmp_path):
    from conftest import _pipe

    path = write_lora(_pipe("tiny-xl", "text2img").unet, tmp_path / "xl.safetensors", "peft")
    with pytest.raises(ValueError) as e:
        apply_loras(pipe, [path])
    message = str(e.value)
    assert "models do not have" in message and "of other shapes than the LoRA's" in message
    assert "xl.safetensors" in message


@pytest.mark.parametrize("scale, error", [(float("nan"), ValueError), (math.inf, ValueError), ("1.0", TypeError),
                                          (True, TypeError), (1e30, ValueError), (-101, ValueError)])
def test_scale_must_be_a_finite_number(loras, scale, error):
    with pytest.raises(error, match="LoRA scale must be a"):
        LoraSpec(loras["A"].path, scale=scale)


def test_failed_refit_rolls_everything_back(pipe, loras, monkeypatch):
    dcaccel.enable(pipe, CONFIG)
    apply_loras(pipe, [loras["A"]])
    before, latents = _state(pipe), run_latents(pipe)

    def broken(graphs):
        raise RuntimeError("refit failed")

    monkeypatch.setattr(pipe.unet.runner, "refit", broken)
    with pytest.raises(RuntimeError, match="refit failed"):
        swap_loras(pipe, [loras["B"]])
    monkeypatch.undo()
    assert _state(pipe) == before
    torch.testing.assert_close(run_latents(pipe), latents, rtol=0, atol=0)


def test_unfused_loras_need_the_eager_backend(pipe, loras, monkeypatch):
    dcaccel.enable(pipe, CONFIG)
    monkeypatch.setattr(dcaccel.enabled_state(pipe), "backend", "onnxruntime")
    with pytest.raises(ValueError, match="fuse=False keeps LoRA layers"):
        apply_loras(pipe, [loras["A"]], fuse=False)
    monkeypatch.undo()
    apply_loras(pipe, [loras["A"]], fuse=False)
    with pytest.raises(RuntimeError, match="not fused"):
        swap_loras(pipe, [loras["B"]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_lora_holding_nan_or_inf_is_refused(pipe, tmp_path, bad):
    from safetensors.torch import load_file

    path = write_lora(pipe.unet, tmp_path / "bad.safetensors", seed=3)
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = bad
    save_file(tensors, str(path))
    before = weights_hash(pipe.unet)
    with pytest.raises(ValueError, match=r"1 tensor hold NaN or infinite values .*a LoRA must be finite"):
        apply_loras(pipe, [path])
    assert weights_hash(pipe.unet) == before and current_loras(pipe) == []


def test_fused_weights_that_overflow_are_refused_and_rolled_back(pipe, tmp_path):
    """Finite LoRA tensors whose product overflows: the fused weights would be infinite; refused, rolled back."""
    path = write_lora(pipe.unet, tmp_path / "huge.safetensors", seed=4, std=1e20)
    before = weights_hash(pipe.unet)
    with pytest.raises(ValueError, match=r"made .* NaN or infinite .*lower their scales"):
        apply_loras(pipe, [path])
    assert weights_hash(pipe.unet) == before and current_loras(pipe) == [] and not pipe.get_list_adapters()


# -- weights changed behind dcaccel's back -----------------------------------------------------------------------

def test_lora_fused_by_diffusers_after_enable_is_refitted(pipe, loras, ort_dir_b):
    """diffusers' own load_lora_weights + fuse_lora on an enabled onnxruntime pipeline: the next call sees new
    weights and refits the graphs (before, the engine kept running the old ones)."""
    eager_b = _eager(pipe, loras["B"])
    apply_loras(pipe, [loras["B"]])
    dcaccel.enable(pipe, CONFIG, backend="onnxruntime", engine_dir=ort_dir_b)
    remove_loras(pipe)  # back to the plain weights, through dcaccel (refitted)
    plain = run_latents(pipe)
    state = dcaccel.enabled_state(pipe)
    unet = state.denoiser
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    try:
        from safetensors.torch import load_file

        pipe.load_lora_weights(load_file(str(loras["B"].path)), adapter_name="b")
        pipe.set_adapters(["b"], adapter_weights=[loras["B"].scale])
        pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=["b"])
        pipe.unload_lora_weights()
        refitted = run_latents(pipe)
        torch.testing.assert_close(refitted, eager_b, atol=1e-3, rtol=1e-3)
        assert (refitted - plain).abs().max() > 1e-2
    finally:
        unet.load_state_dict(original)
        dcaccel.disable(pipe)
