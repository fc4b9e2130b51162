"""Engines on CPU: ONNX Runtime and torch.compile graphs against eager, whole pipelines per backend, builds,
manifests and the errors a serving process must get instead of a crash."""

import json
import os
from pathlib import Path

import pytest
import torch

import dcaccel
from dcaccel.config import BuildConfig, DeepCacheConfig
from dcaccel.engines import Manifest, build_engines, open_runner
from dcaccel.errors import EngineError
from dcaccel.families.unet import split_unet
from dcaccel.graphs import verify

from conftest import run_latents

pytest.importorskip("onnxruntime")

SIZE = 32  # pixels; tiny VAEs downsample by 2, so latents are 16x16
CONFIG = DeepCacheConfig(interval=3, branch=1)


def _build(pipe, tmp_path, backend="onnxruntime", branch=CONFIG.branch, model_name="tiny", **kw):
    build = BuildConfig(height=SIZE, width=SIZE, batch_size=1, cfg=True, branch=branch, backend=backend, **kw)
    return build_engines(pipe, build, out_dir=tmp_path, model_name=model_name)


def _eager_reference(pipe, config=CONFIG, **call):
    dcaccel.enable(pipe, config)
    try:
        return run_latents(pipe, **call)
    finally:
        dcaccel.disable(pipe)


@pytest.fixture(scope="module")
def ort_dirs(tmp_path_factory):
    """ONNX engines for both tiny architectures, built once for the module."""
    from conftest import _pipe

    out = tmp_path_factory.mktemp("engines")
    return {arch: _build(_pipe(arch, "text2img"), out, model_name=arch)[0] for arch in ("tiny", "tiny-xl")}


def _graph_errors(runner, unet, branch, seed):
    """Largest differences of the runner's graphs from eager (dcaccel.graphs.verify, as builds use it)."""
    graphs = dict(zip(("full", "shallow"), split_unet(unet, branch)))
    reached = verify.compare(runner, graphs, runner.specs, seed=seed)
    return {f"{g}.{o}": e["max_abs"] for g, outs in reached.items() for o, e in outs.items()}


def _open(pipe, engine_dir, branch=CONFIG.branch, backend="onnxruntime", **options):
    runner, _ = open_runner(pipe, DeepCacheConfig(branch=branch), backend, engine_dir=engine_dir, **options)
    return runner


@pytest.mark.parametrize("arch", ["tiny", "tiny-xl"])
def test_onnxruntime_graphs_match_eager_within_recorded_tolerance(tiny_pipe, ort_dirs, arch):
    from dcaccel.backends.onnxruntime import TOLERANCE

    pipe = tiny_pipe(arch)
    manifest = Manifest.read(ort_dirs[arch])
    for graph in ("full", "shallow"):
        tolerance = manifest.data["graphs"][graph]["tolerance"]
        assert (tolerance["atol"], tolerance["rtol"]) == TOLERANCE["float32"]
        for output, reached in tolerance["reached"].items():
            assert 0 <= reached["max_abs"] < tolerance["atol"], (graph, output, reached)
    runner = _open(pipe, ort_dirs[arch])
    errors = _graph_errors(runner, pipe.unet, CONFIG.branch, seed=3)
    assert max(errors.values()) < 1e-3, errors


def manifest_sample_inputs(engine_dir, seed):
    return Manifest.read(engine_dir).specs["full"].sample_inputs(seed=seed)


@pytest.mark.parametrize("arch", ["tiny", "tiny-xl"])
def test_onnxruntime_pipeline_matches_eager_deepcache(tiny_pipe, ort_dirs, arch):
    pipe = tiny_pipe(arch)
    expected = _eager_reference(pipe)
    dcaccel.enable(pipe, CONFIG, backend="onnxruntime", engine_dir=ort_dirs[arch])
    runner = pipe.unet.runner
    feature_ptr = runner.feature.data_ptr()
    got = run_latents(pipe)
    stats = dcaccel.last_stats(pipe)
    assert stats.full_steps == [0, 3] and stats.shallow_steps == [1, 2, 4, 5]
    assert runner.feature.data_ptr() == feature_ptr  # one feature buffer, bound once
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-3)
    # and DeepCache really changed something against the full model, so the match above means something
    dcaccel.disable(pipe)
    assert (run_latents(pipe) - expected).abs().max() > 1e-3


def test_onnxruntime_feature_written_in_place_by_the_full_graph(tiny_pipe, ort_dirs):
    """The full graph's feature output and the shallow graph's feature input are one tensor: no copy, no host
    round trip between the graphs."""
    pipe = tiny_pipe()
    runner = _open(pipe, ort_dirs["tiny"])
    before = runner.feature.data_ptr()
    runner.feature.zero_()
    runner.run_full(manifest_sample_inputs(ort_dirs["tiny"], seed=1))
    assert runner.feature.data_ptr() == before
    assert runner.feature.abs().sum() > 0


def test_build_twice_is_skipped(tiny_pipe, ort_dirs):
    """The second build of the same key reuses the first, untouched (--force: see the CLI test)."""
    first = ort_dirs["tiny"]
    mtime = os.stat(first / "full.onnx").st_mtime_ns
    second, built = _build(tiny_pipe(), first.parents[1])
    assert second == first and not built
    assert os.stat(first / "full.onnx").st_mtime_ns == mtime
    # nothing half-written lies beside it
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]


def test_interrupted_build_leaves_nothing_that_loads(tiny_pipe, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr("dcaccel.graphs.verify.compare", crash)
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_pipe(), tmp_path)
    leftovers = list((tmp_path / "tiny").iterdir()) if (tmp_path / "tiny").exists() else []
    assert leftovers == []


def test_truncated_or_missing_engine_file_is_refused(tiny_pipe, ort_dirs, tmp_path):
    import shutil

    pipe = tiny_pipe()
    copy = tmp_path / "engine"
    shutil.copytree(ort_dirs["tiny"], copy)
    data = (copy / "shallow.onnx").read_bytes()
    (copy / "shallow.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match=r"shallow\.onnx.*truncated or replaced"):
        dcaccel.enable(pipe, CONFIG, backend="onnxruntime", engine_dir=copy)
    assert not dcaccel.is_enabled(pipe)
    # same size, garbage inside: the runtime's load error is turned into a clear one
    (copy / "shallow.onnx").write_bytes(b"\0" * len(data))
    with pytest.raises(EngineError, match=r"shallow\.onnx.*does not match its recorded sha256"):
        dcaccel.enable(pipe, CONFIG, backend="onnxruntime", engine_dir=copy)
    (copy / "full.onnx").unlink()
    with pytest.raises(EngineError, match=r"full\.onnx.*missing"):
        dcaccel.enable(pipe, CONFIG, backend="onnxruntime", engine_dir=copy)
    with pytest.raises(EngineError, match="not an engine directory"):
        dcaccel.enable(pipe, CONFIG, backend="onnxruntime", engine_dir=tmp_path)
    assert not dcaccel.is_enabled(pipe)


def test_mismatched_manifest_is_refused_naming_each_field(tiny_pipe, ort_dirs):
    pipe = tiny_pipe()
    with pytest.raises(EngineError, match="build.branch: engine has 1, pipeline needs 2"):
        _open(pipe, ort_dirs["tiny"], branch=2)
    with pytest.raises(EngineError, match="build.backend"):
        _open(pipe, ort_dirs["tiny"], backend="torch_compile")
    with pytest.raises(EngineError) as info:
        _open(tiny_pipe("tiny-xl"), ort_dirs["tiny"])
    assert "model_config" in str(info.value) and "weights_hash" in str(info.value)
    # same architecture, other weights
    unet = tiny_pipe().unet
    with torch.no_grad():
        unet.conv_out.bias.add_(1e-3)
    try:
        with pytest.raises(EngineError, match="weights_hash") as info:
            dcaccel.enable(pipe, CONFIG, backend="onnxruntime", engine_dir=ort_dirs["tiny"])
        assert "model_config" not in str(info.value)
    finally:
        with torch.no_grad():
            unet.conv_out.bias.sub_(1e-3)
    assert not dcaccel.is_enabled(pipe)


def test_manifest_records_what_a_build_fixed(ort_dirs):
    data = Manifest.read(ort_dirs["tiny"]).data
    for field in ("weights_hash", "model_config", "specs", "build", "versions", "build_seconds", "graphs", "key"):
        assert field in data
    assert data["build"]["branch"] == CONFIG.branch and data["build"]["backend"] == "onnxruntime"
    full = {t["name"]: t for t in data["specs"]["full"]["inputs"]}
    assert full["sample"]["shape"] == [2, 4, 16, 16] and full["sample"]["dtype"] == "float32"
    assert data["versions"]["torch"] == torch.__version__
    assert data["graphs"]["full"]["checksums"]["full.onnx"]["size"] > 0
    assert data["family"] == "unet" and not any(k.startswith("_") for k in data["model_config"])


def test_call_with_other_resolution_or_batch_is_refused(tiny_pipe, ort_dirs):
    pipe = tiny_pipe()
    dcaccel.enable(pipe, CONFIG, backend="onnxruntime", engine_dir=ort_dirs["tiny"])
    with pytest.raises(ValueError, match=r"static shapes.*sample: got \(2, 4, 24, 24\), built for \(2, 4, 16, 16\)"):
        run_latents(pipe, height=48, width=48)
    with pytest.raises(ValueError, match="static shapes"):
        run_latents(pipe, num_images_per_prompt=2)
    with pytest.raises(ValueError, match="static shapes"):
        run_latents(pipe, guidance_scale=1.0)  # no guidance batch: batch 1, engine built for 2


def test_enable_options_fixed_by_the_engine_are_refused(tiny_pipe, ort_dirs):
    pipe = tiny_pipe()
    with pytest.raises(ValueError, match="fixed by the engine"):
        dcaccel.enable(pipe, CONFIG, backend="onnxruntime", engine_dir=ort_dirs["tiny"], height=64)
    assert not dcaccel.is_enabled(pipe)


def test_unknown_backend_and_provider(tiny_pipe, ort_dirs):
    pipe = tiny_pipe()
    with pytest.raises(ValueError, match="unknown backend 'tvm'; choose from"):
        dcaccel.enable(pipe, CONFIG, backend="tvm")
    with pytest.raises(ValueError, match="onnxruntime option provider must be one of"):
        dcaccel.enable(pipe, CONFIG, backend="onnxruntime", engine_dir=ort_dirs["tiny"], provider="rocm")
    with pytest.raises(ValueError, match="needs engine_dir"):
        dcaccel.enable(pipe, CONFIG, backend="onnxruntime")
    assert not dcaccel.is_enabled(pipe)


def test_cli_build_skips_then_forces(ort_dirs, tmp_path, capsys):
    from dcaccel.cli import main

    args = ["build", "--model", "tiny", "--height", "32", "--width", "32", "--branch", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "built onnxruntime engines" in out and "RANDOM weights" in out
    (directory,) = (tmp_path / "tiny").iterdir()
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["build"]["height"] == 32 and manifest["build"]["branch"] == 2
    assert directory.name != ort_dirs["tiny"].name  # another branch, another key
    mtime = os.stat(directory / "full.onnx").st_mtime_ns
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(args + ["--force"]) == 0
    assert "built onnxruntime engines" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [directory.name]
    assert os.stat(directory / "full.onnx").st_mtime_ns != mtime
    assert main(args + ["--height", "30"]) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_build_script_runs_as_a_file(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "build_scripts" / "build.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--force" in result.stdout


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """torch.compile engine of the tiny SD-like model, built once (compiling takes about a minute on 2 cores)."""
    from conftest import _pipe

    pipe = _pipe("tiny", "text2img")
    out = tmp_path_factory.mktemp("compiled")
    directory, _ = _build(pipe, out, backend="torch_compile")
    return directory


@pytest.mark.slow
def test_torch_compile_graphs_pipeline_and_no_recompile(tiny_pipe, compiled):
    """Compiled graphs match eager; a whole pipeline matches eager DeepCache; no recompilation during calls
    (the runner sets the fail_on_recompile stance, so a recompile would raise), also for calls made under
    inference_mode; the feature buffer is allocated once."""
    pipe = tiny_pipe()
    data = Manifest.read(compiled).data
    assert data["graphs"]["full"]["tolerance"]["reached"]["noise"]["max_abs"] < 1e-3
    expected = _eager_reference(pipe)
    dcaccel.enable(pipe, CONFIG, backend="torch_compile", engine_dir=compiled)
    runner = pipe.unet.runner
    errors = _graph_errors(runner, pipe.unet.denoiser, CONFIG.branch, seed=5)
    assert max(errors.values()) < 1e-3, errors
    got = run_latents(pipe)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-3)
    with torch.inference_mode():
        again = run_latents(pipe)
    torch.testing.assert_close(again, got)
    assert runner.cache_buffers.allocations == 1
    with pytest.raises(ValueError, match="static shapes"):
        run_latents(pipe, height=48, width=48)


@pytest.mark.slow
def test_torch_compile_refuses_other_torch_version(tiny_pipe, compiled, tmp_path):
    import shutil

    copy = tmp_path / "engine"
    shutil.copytree(compiled, copy)
    _edit_manifest(copy, lambda data: data["versions"].update(torch="2.0.0"))  # re-signed: as if built there
    with pytest.raises(EngineError, match=r"versions\.torch: engine has \"2\.0\.0\""):
        dcaccel.enable(tiny_pipe(), CONFIG, backend="torch_compile", engine_dir=copy)


def _edit_manifest(directory, change, resign=True):
    """Change a manifest; resign=True signs it again as a build would (a manifest from elsewhere, not an edit)."""
    import hashlib

    from dcaccel.engines import canonical

    path = Path(directory) / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    if resign:
        data.pop("manifest_sha256", None)
        data["manifest_sha256"] = hashlib.sha256(canonical(data).encode()).hexdigest()
    path.write_text(json.dumps(data))
