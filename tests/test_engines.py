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


@pytest.mark.slow  # kept out of the default run for its time (2026-12-07: the default run was 13 min)
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


@pytest.mark.slow  # kept out of the default run for its time (2026-12-07: the default run was 13 min)
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


# -- the workflow as users run it: build in one process, load in another -----------------------------------------

def _cli(*args, hashseed, timeout=300, check=True):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONHASHSEED": str(hashseed)}
    result = subprocess.run([sys.executable, "-m", "dcaccel.cli", *args], capture_output=True, text=True,
                            timeout=timeout, env=env)
    if check:
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


def _pixels(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.parametrize("source", ["embedded", pytest.param("moved directory", marks=pytest.mark.slow)])  # 50 s each
def test_build_in_one_process_load_in_another(tmp_path, source):
    """`dcaccel build`, then in a new process with another hash seed `dcaccel generate --engine-dir`: the engine
    loads (also from a pipeline directory moved after the build) and draws what eager DeepCache draws."""
    from dcaccel.models import build_pipeline

    model = "tiny"
    if source == "moved directory":
        build_pipeline("tiny").save_pretrained(tmp_path / "pipe")
        model = str(tmp_path / "pipe")
    _cli("build", "--model", model, "--height", "32", "--width", "32", "--branch", "1", "--out",
         str(tmp_path / "E"), "--name", "m", hashseed=1)
    (engine,) = (tmp_path / "E" / "m").iterdir()
    if source == "moved directory":
        os.rename(tmp_path / "pipe", tmp_path / "moved")
        model = str(tmp_path / "moved")
    common = ["generate", "a red circle", "--model", model, "--steps", "6", "--branch", "1", "--seed", "3"]
    _cli(*common, "--output", str(tmp_path / "eager.png"), hashseed=2)
    for seed in (2, 3):
        out = tmp_path / f"ort{seed}.png"
        _cli(*common, "--backend", "onnxruntime", "--engine-dir", str(engine), "--output", str(out), hashseed=seed)
        assert abs(_pixels(out) - _pixels(tmp_path / "eager.png")).max() <= 2


def test_refusal_names_every_field_in_full(ort_dirs, tiny_pipe):
    """No value is cut short: a long config value is printed whole, with the key that differs."""
    with pytest.raises(EngineError) as info:
        _open(tiny_pipe("tiny-xl"), ort_dirs["tiny"])
    text = str(info.value)
    assert "..." not in text
    xl, sd = tiny_pipe("tiny-xl").unet.config, tiny_pipe("tiny").unet.config
    assert f"model_config.addition_embed_type: engine has null, pipeline needs \"{xl.addition_embed_type}\"" in text
    assert f"model_config.down_block_types: engine has {json.dumps(list(sd.down_block_types), separators=(',', ':'))}" \
        in text
    assert "model_config._" not in text and "_name_or_path" not in text


# -- engine files are verified on load -----------------------------------------------------------------------------

def _copy_engine(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_engine_file_changed_in_place_is_refused(ort_dirs, tiny_pipe, tmp_path):
    """Same size, other bytes (weights edited in the file): refused naming the file, not run."""
    import onnx
    from onnx import numpy_helper

    copy = _copy_engine(ort_dirs["tiny"], tmp_path / "engine")
    model = onnx.load(str(copy / "full.onnx"))
    init = max(model.graph.initializer, key=lambda i: numpy_helper.to_array(i).size)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    size = (copy / "full.onnx").stat().st_size
    onnx.save(model, str(copy / "full.onnx"))
    assert (copy / "full.onnx").stat().st_size == size
    with pytest.raises(EngineError, match=r"full\.onnx \(full graph\) does not match its recorded sha256"):
        dcaccel.enable(tiny_pipe(), CONFIG, backend="onnxruntime", engine_dir=copy)


@pytest.mark.slow  # kept out of the default run for its time (2026-12-07: the default run was 13 min)
def test_another_models_file_of_the_same_size_is_refused(ort_dirs, tmp_path):
    from conftest import _pipe
    from dcaccel.models import build_pipeline

    other = build_pipeline("tiny", seed=7)  # same architecture, other weights: ONNX files of the same sizes
    other_dir, _ = _build(other, tmp_path / "other")
    copy = _copy_engine(ort_dirs["tiny"], tmp_path / "engine")
    assert (other_dir / "shallow.onnx").stat().st_size == (copy / "shallow.onnx").stat().st_size
    (copy / "shallow.onnx").write_bytes((other_dir / "shallow.onnx").read_bytes())
    with pytest.raises(EngineError, match=r"shallow\.onnx \(shallow graph\) does not match its recorded sha256"):
        _open(_pipe("tiny", "text2img"), copy)


# -- manifests: edited, malformed, swapped ------------------------------------------------------------------------

@pytest.mark.parametrize("edit", [
    lambda d: d["versions"].update(torch="1.0.0"),
    lambda d: d["build"].update(branch=2),
    lambda d: d["graphs"]["full"].update(tolerance={}),
])
def test_edited_manifest_is_refused(ort_dirs, tiny_pipe, tmp_path, edit):
    copy = _copy_engine(ort_dirs["tiny"], tmp_path / "engine")
    _edit_manifest(copy, edit, resign=False)
    with pytest.raises(EngineError, match="was edited after the build"):
        dcaccel.enable(tiny_pipe(), CONFIG, backend="onnxruntime", engine_dir=copy)
    with pytest.raises(EngineError, match="was edited after the build"):
        dcaccel.enable(tiny_pipe(), DeepCacheConfig(interval=3, branch=2), backend="onnxruntime", engine_dir=copy)


def test_branch_of_a_manifest_from_elsewhere_must_match_its_graphs(ort_dirs, tiny_pipe, tmp_path):
    """A manifest signed again with another branch (not an edit dcaccel can see) still cannot run the wrong
    graphs: its specs are recomputed for the branch and compared."""
    copy = _copy_engine(ort_dirs["tiny"], tmp_path / "engine")
    _edit_manifest(copy, lambda d: d["build"].update(branch=4))  # another block: other feature shape
    with pytest.raises(EngineError, match=r"specs\.full: engine has"):
        dcaccel.enable(tiny_pipe(), DeepCacheConfig(interval=3, branch=4), backend="onnxruntime", engine_dir=copy)
    _edit_manifest(copy, lambda d: d["build"].update(branch=2))  # same block, same shapes: the key gives it away
    with pytest.raises(EngineError, match="key .* is not the hash of its fields"):
        dcaccel.enable(tiny_pipe(), DeepCacheConfig(interval=3, branch=2), backend="onnxruntime", engine_dir=copy)


@pytest.mark.parametrize("content, match", [
    ("[]", "must hold a JSON object, it holds a list"),
    ("{", "is not valid JSON"),
    ('{"format": 1}', "has format 1, this dcaccel reads format 2"),
])
def test_malformed_manifest_is_refused_clearly(ort_dirs, tiny_pipe, tmp_path, content, match):
    copy = _copy_engine(ort_dirs["tiny"], tmp_path / "engine")
    (copy / "manifest.json").write_text(content)
    with pytest.raises(EngineError, match=match):
        dcaccel.enable(tiny_pipe(), CONFIG, backend="onnxruntime", engine_dir=copy)


@pytest.mark.parametrize("missing", ["graphs", "specs", "build"])
def test_manifest_without_a_section_is_refused_clearly(ort_dirs, tiny_pipe, tmp_path, missing):
    copy = _copy_engine(ort_dirs["tiny"], tmp_path / "engine")
    _edit_manifest(copy, lambda d: d.pop(missing))
    with pytest.raises(EngineError, match=f"not a complete manifest \\({missing} is missing\\)"):
        dcaccel.enable(tiny_pipe(), CONFIG, backend="onnxruntime", engine_dir=copy)


def test_swapped_graph_files_are_refused(ort_dirs, tiny_pipe, tmp_path):
    copy = _copy_engine(ort_dirs["tiny"], tmp_path / "engine")
    full, shallow = (copy / "full.onnx").read_bytes(), (copy / "shallow.onnx").read_bytes()
    (copy / "full.onnx").write_bytes(shallow)
    (copy / "shallow.onnx").write_bytes(full)
    with pytest.raises(EngineError, match=r"(full|shallow)\.onnx .*(sha256|bytes)"):
        dcaccel.enable(tiny_pipe(), CONFIG, backend="onnxruntime", engine_dir=copy)
    # swapped in a manifest signed again (so the checksums agree): the graphs' inputs give it away
    copy2 = _copy_engine(ort_dirs["tiny"], tmp_path / "engine2")

    def swap(d):
        g = d["graphs"]
        g["full"]["files"]["onnx"], g["shallow"]["files"]["onnx"] = "shallow.onnx", "full.onnx"
        g["full"]["checksums"]["shallow.onnx"] = g["shallow"]["checksums"].pop("shallow.onnx")
        g["shallow"]["checksums"]["full.onnx"] = g["full"]["checksums"].pop("full.onnx")
    _edit_manifest(copy2, swap)
    with pytest.raises(EngineError, match=r"is not the (full|shallow) graph of this engine"):
        dcaccel.enable(tiny_pipe(), CONFIG, backend="onnxruntime", engine_dir=copy2)


def test_garbage_weight_map_is_refused_at_load(ort_dirs, tiny_pipe, tmp_path):
    copy = _copy_engine(ort_dirs["tiny"], tmp_path / "engine")
    path = copy / "full.weights.json"
    path.write_text("x" * path.stat().st_size)
    with pytest.raises(EngineError, match=r"full\.weights\.json \(full graph\) does not match its recorded sha256"):
        dcaccel.enable(tiny_pipe(), CONFIG, backend="onnxruntime", engine_dir=copy)


def test_manifest_naming_a_file_outside_its_directory_is_refused(ort_dirs, tiny_pipe, tmp_path):
    copy = _copy_engine(ort_dirs["tiny"], tmp_path / "engine")
    _edit_manifest(copy, lambda d: d["graphs"]["full"]["files"].update(onnx="../full.onnx"))
    with pytest.raises(EngineError, match="not a plain file name inside the engine directory"):
        dcaccel.enable(tiny_pipe(), CONFIG, backend="onnxruntime", engine_dir=copy)


# -- leftovers ---------------------------------------------------------------------------------------------------

def _dead_pid():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.slow  # 15 s; test_interrupted_build_leaves_nothing_that_loads runs by default
def test_killed_build_leaves_nothing_the_next_build_keeps(tmp_path):
    """A build killed (SIGKILL) mid-way leaves its partial directory; the next build of that model removes it."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "E"
    proc = subprocess.Popen([sys.executable, "-m", "dcaccel.cli", "build", "--model", "tiny", "--height", "32",
                             "--width", "32", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("tiny/.*.partial-*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(out.glob("tiny/.*.partial-*")), "the build was killed after it started writing"
    from conftest import _pipe

    directory, built = _build(_pipe("tiny", "text2img"), out, branch=0)
    assert built and sorted(p.name for p in (out / "tiny").iterdir()) == [directory.name]


@pytest.mark.slow  # kept out of the default run for its time (2026-12-07: the default run was 13 min)
def test_in_memory_builds_leave_no_scratch_directory(tiny_pipe):
    import gc
    import tempfile

    pipe = tiny_pipe()
    base = Path(tempfile.gettempdir())
    mine = lambda: set(base.glob(f"dcaccel-engines-{os.getpid()}-*"))  # noqa: E731
    before = mine()
    dcaccel.enable(pipe, CONFIG, backend="onnxruntime", height=32, width=32)
    scratch = mine() - before
    assert len(scratch) == 1
    run_latents(pipe)
    dcaccel.disable(pipe)
    gc.collect()
    assert not any(p.exists() for p in scratch)
    # a killed process's scratch directory is removed by the next process's in-memory build
    dead = base / f"dcaccel-engines-{_dead_pid()}-leftover"
    dead.mkdir()
    (dead / "full.onnx").write_bytes(b"x")
    from dcaccel.engines import scratch_dir

    fresh = scratch_dir()
    assert not dead.exists()
    fresh.rmdir()


@pytest.mark.slow  # 15 s
def test_in_memory_build_is_removed_at_exit(tmp_path):
    import subprocess
    import sys

    code = ("import sys, os; sys.path.insert(0, 'tests'); import dcaccel; from dcaccel.models import build_pipeline; "
            "p = build_pipeline('tiny'); dcaccel.enable(p, dcaccel.DeepCacheConfig(branch=1), backend='onnxruntime', "
            "height=32, width=32); print(os.getpid())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    import tempfile

    assert not list(Path(tempfile.gettempdir()).glob(f"dcaccel-engines-{result.stdout.split()[-1]}-*"))


@pytest.mark.slow  # 11 s
def test_forced_rebuild_swaps_atomically(ort_dirs, tiny_pipe, monkeypatch, tmp_path):
    """--force replaces the engine in one atomic exchange: there is no moment without one."""
    import dcaccel.engines as engines

    pipe = tiny_pipe()
    out = tmp_path / "E"
    first, _ = _build(pipe, out)
    inode = os.stat(first).st_ino
    seen = []
    real = engines._exchange

    def spy(a, b):
        ok = real(a, b)
        seen.append((ok, (b / "manifest.json").is_file()))
        return ok

    monkeypatch.setattr(engines, "_exchange", spy)
    second, built = build_engines(pipe, BuildConfig(height=SIZE, width=SIZE, branch=CONFIG.branch), out_dir=out,
                                  model_name="tiny", force=True)
    assert built and second == first and seen == [(True, True)] and os.stat(first).st_ino != inode
    assert sorted(p.name for p in (out / "tiny").iterdir()) == [first.name]


@pytest.mark.slow  # 19 s
def test_rebuild_killed_between_two_renames_is_restored(tiny_pipe, tmp_path):
    """Where the atomic exchange is not available, a rebuild renames twice; a process killed between the two
    leaves the old engine under a temporary name, and the next build or load puts it back."""
    import subprocess
    import sys

    out = tmp_path / "E"
    first, _ = _build(tiny_pipe(), out)
    code = f"""
import os, sys
sys.path.insert(0, 'tests')
import dcaccel.engines as engines
from dcaccel.config import BuildConfig
from dcaccel.models import build_pipeline
engines._exchange = lambda a, b: False
real = os.replace
def replace(src, dst):
    real(src, dst)
    if '.old-' in str(dst):
        os._exit(9)  # killed between the two renames
engines.os.replace = replace
engines.build_engines(build_pipeline('tiny'), BuildConfig(height=32, width=32, branch=1), out_dir={str(out)!r},
                      model_name='tiny', force=True)
"""
    result = subprocess.run([sys.executable, "-c", code], timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 9
    assert not first.exists() and list((out / "tiny").glob(".*.old-*"))
    directory, built = _build(tiny_pipe(), out)
    assert directory == first and not built, "the old engine was put back, complete, and reused"
    assert sorted(p.name for p in (out / "tiny").iterdir()) == [first.name]


def test_unknown_backend_option_lists_the_allowed_ones(tiny_pipe, ort_dirs):
    with pytest.raises(ValueError, match=r"unknown onnxruntime options \['foo'\]; allowed: \['exporter', 'opset', "
                                         r"'provider', 'threads'\]"):
        dcaccel.enable(tiny_pipe(), CONFIG, backend="onnxruntime", engine_dir=ort_dirs["tiny"], foo=1)
    with pytest.raises(ValueError, match=r"options \['exporter'\] are fixed by the engine"):
        dcaccel.enable(tiny_pipe(), CONFIG, backend="onnxruntime", engine_dir=ort_dirs["tiny"], exporter="dynamo")
    with pytest.raises(ValueError, match="torch_compile option freezing must be true or false"):
        _build(tiny_pipe(), Path("unused"), backend="torch_compile", options={"freezing": "yes"})


# -- weights changed after enable ------------------------------------------------------------------------------

def test_load_state_dict_after_enable_refits_the_engine(ort_dirs, tiny_pipe):
    pipe = tiny_pipe()
    unet = pipe.unet
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    changed = {k: v * 1.05 if v.is_floating_point() else v for k, v in original.items()}
    try:
        unet.load_state_dict(changed)
        expected = _eager_reference(pipe)
        unet.load_state_dict(original)
        dcaccel.enable(pipe, CONFIG, backend="onnxruntime", engine_dir=ort_dirs["tiny"])
        before = run_latents(pipe)
        pipe.unet.load_state_dict(changed)
        after = run_latents(pipe)
        torch.testing.assert_close(after, expected, atol=2e-4, rtol=1e-3)
        assert (after - before).abs().max() > 1e-3
    finally:
        unet.load_state_dict(original)
        if dcaccel.is_enabled(pipe):
            dcaccel.disable(pipe)


def test_engine_of_another_dtype_than_the_pipeline_now_has_is_refused(ort_dirs, tiny_pipe):
    pipe = tiny_pipe()
    dcaccel.enable(pipe, CONFIG, backend="onnxruntime", engine_dir=ort_dirs["tiny"])
    try:
        pipe.to(torch.float16)
        with pytest.raises(EngineError, match="unet is now float16, and the onnxruntime graphs were built for "
                                              "float32"):
            run_latents(pipe)
    finally:
        pipe.to(torch.float32)
        dcaccel.disable(pipe)
    with pytest.raises(EngineError, match="build.dtype: engine has \"float32\", pipeline needs \"float16\""):
        dcaccel.enable(pipe.to(torch.float16), CONFIG, backend="onnxruntime", engine_dir=ort_dirs["tiny"])
    pipe.to(torch.float32)
