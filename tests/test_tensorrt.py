"""The TensorRT backend. On CPU only its error paths and the weight map behind refit can run; the engine tests
need CUDA and TensorRT and are skipped with a reason elsewhere."""

import importlib.util

import pytest
import torch

import dcaccel
from dcaccel import BuildConfig, DeepCacheConfig
from dcaccel.errors import MissingDependencyError

from conftest import run_latents

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRT),
                         reason="needs a CUDA GPU and the tensorrt package (pip install 'dcaccel[gpu]')")


def test_import_needs_neither_tensorrt_nor_cuda():
    import dcaccel.backends.tensorrt as trt_backend

    assert callable(trt_backend.load) and callable(trt_backend.build)
    assert set(trt_backend.Options.build_fields()) == {"exporter", "opset", "fp16", "refittable", "workspace_gb"}


def _open(pipe, **options):
    from dcaccel.engines import open_runner

    return open_runner(pipe, DeepCacheConfig(branch=0), "tensorrt", **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_open_without_cuda_says_so(tiny_pipe):
    pipe = tiny_pipe()
    with pytest.raises(RuntimeError, match="backend 'tensorrt' needs a CUDA GPU; torch sees none"):
        _open(pipe, height=32, width=32)


@pytest.mark.skipif(HAS_TRT, reason="checks the error a machine without tensorrt gives")
def test_missing_tensorrt_names_the_extra(tiny_pipe, monkeypatch):
    pipe = tiny_pipe()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # get past the CUDA check to the import
    with pytest.raises(MissingDependencyError, match=r"pip install 'dcaccel\[gpu\]'") as err:
        _open(pipe, height=32, width=32)
    assert "'tensorrt'" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available() and HAS_TRT, reason="checks the errors of a machine without them")
def test_enable_fails_cleanly_and_leaves_the_pipeline_alone(tiny_pipe):
    pipe = tiny_pipe()
    unet = pipe.unet
    with pytest.raises((RuntimeError, MissingDependencyError), match=r"CUDA|dcaccel\[gpu\]"):
        dcaccel.enable(pipe, DeepCacheConfig(), backend="tensorrt", height=32, width=32)
    assert not dcaccel.is_enabled(pipe)
    assert pipe.unet is unet


@pytest.mark.skipif(torch.cuda.is_available() and HAS_TRT, reason="checks the errors of a machine without them")
def test_a_failed_build_leaves_no_directory(tiny_pipe, tmp_path):
    from dcaccel.engines import build_engines

    with pytest.raises((RuntimeError, MissingDependencyError)):
        build_engines(tiny_pipe(), BuildConfig(height=32, width=32, backend="tensorrt"), out_dir=tmp_path)
    assert not (tmp_path / "model").exists() or list((tmp_path / "model").iterdir()) == []


def test_unknown_tensorrt_option_lists_the_allowed_ones(tiny_pipe, tmp_path):
    from dcaccel.engines import build_engines

    with pytest.raises(ValueError, match=r"unknown tensorrt options \['fp32'\]; allowed: \['exporter'"):
        build_engines(tiny_pipe(), BuildConfig(height=32, width=32, backend="tensorrt", options={"fp32": True}),
                      out_dir=tmp_path)


# ---- GPU: CUDA and TensorRT ----

def _gpu_pipe(dtype=torch.float32):
    import diffusers

    from dcaccel.models import build_pipeline

    pipe = build_pipeline("tiny", "text2img", seed=0).to("cuda", dtype)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _build(pipe, tmp_path, **options):
    from dcaccel.engines import build_engines

    config = BuildConfig(height=32, width=32, backend="tensorrt", device="cuda",
                         dtype=str(pipe.unet.dtype).removeprefix("torch."), options=options)
    directory, built = build_engines(pipe, config, out_dir=tmp_path)
    assert built
    return directory


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-2), (torch.float16, 1e-1)])
def test_deepcache_on_tensorrt_matches_eager(tmp_path, dtype, atol):
    import json

    pipe = _gpu_pipe(dtype)
    directory = _build(pipe, tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["graphs"]["full"]["files"]["plan"] == "full.plan"
    assert "rel_l2" in manifest["graphs"]["shallow"]["tolerance"]["reached"]["noise"]
    config = DeepCacheConfig(interval=2)
    dcaccel.enable(pipe, config)
    try:
        eager = run_latents(pipe)
    finally:
        dcaccel.disable(pipe)
    for cuda_graph in (False, True):
        dcaccel.enable(pipe, config, backend="tensorrt", engine_dir=directory, cuda_graph=cuda_graph)
        try:
            got = run_latents(pipe)
            again = run_latents(pipe)  # CUDA graphs replayed on the second call
        finally:
            dcaccel.disable(pipe)
        torch.testing.assert_close(got.float(), eager.float(), atol=atol, rtol=0)
        torch.testing.assert_close(again, got, atol=1e-3, rtol=0)


@pytest.mark.gpu
@gpu
def test_refit_pushes_new_weights_into_both_engines(tmp_path):
    from dcaccel.families.unet import split_unet

    pipe = _gpu_pipe()
    unet = pipe.unet
    runner, _ = _open(pipe, engine_dir=_build(pipe, tmp_path, refittable=True))
    full, shallow = split_unet(unet, 0)
    sample = runner.specs["full"].sample_inputs(device="cuda", seed=3)
    weight = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)
            runner.refit(dict(zip(("full", "shallow"), split_unet(unet, 0))))
            ref_noise, ref_feature = full(**sample)
            torch.testing.assert_close(runner.run_full(sample), ref_noise, atol=1e-2, rtol=0)
            torch.testing.assert_close(runner.feature, ref_feature, atol=1e-2, rtol=0)
            shallow_in = {t.name: sample[t.name] for t in runner.specs["shallow"].inputs if t.name != "feature"}
            torch.testing.assert_close(runner.run_shallow(shallow_in), shallow(**shallow_in, feature=ref_feature),
                                       atol=1e-2, rtol=0)
    finally:
        with torch.no_grad():
            weight.copy_(original)


@pytest.mark.gpu
@gpu
def test_refit_of_an_engine_built_without_refit_is_refused(tmp_path):
    pipe = _gpu_pipe()
    from dcaccel.families.unet import split_unet

    runner, _ = _open(pipe, engine_dir=_build(pipe, tmp_path))
    with pytest.raises(RuntimeError, match="not refittable"):
        runner.refit(dict(zip(("full", "shallow"), split_unet(pipe.unet, 0))))
