"""The LCM-LoRA distilled for the shapes model (build_scripts/distill_lcm_lora.py): it loads like any user's LoRA
file, draws what the prompt says in 4 steps without classifier-free guidance, and DeepCache on top of it costs at
most the margin measured in benchmarks/results/*-shapes-lcm-lora."""

import functools
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from dcaccel import lora
from dcaccel import pipeline as dc
from dcaccel import shapes
from dcaccel.config import DeepCacheConfig
from dcaccel.models import load_pipeline
from dcaccel.shapes import data
from dcaccel.shapes.score import accuracy, pipeline_images

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "dcaccel" / "weights" / "shapes-lcm-lora"
LORA = SHIPPED / "pytorch_lora_weights.safetensors"
# Measured on the shipped LoRA (2026-11-25, README "LCM-LoRA after DeepCache"); the bounds leave room for seeds.
MIN_LCM4_ACCURACY = 0.90     # the bar; measured 99.6% (benchmark, 240 images), 98.3% here (seeds 30000+)
LCM_DEEPCACHE_MARGIN = 0.05  # DeepCache (branch 0) on LCM 4 steps may lose at most 5 points of prompt accuracy
LCM_N3_FID_RATIO = 1.25      # and raise FID (scorer) by at most: N=3 (measured 7.06 -> 7.46 in the benchmark,
LCM_N2_FID_RATIO = 1.6       # 8.75 -> 8.68 here) 25%; N=2 (7.06 -> 9.15, here 8.75 -> 10.65) 60%


@functools.lru_cache(maxsize=None)
def _script():
    spec = importlib.util.spec_from_file_location("distill_lcm_lora", REPO / "build_scripts" / "distill_lcm_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lcm_pipe():
    pipe = load_pipeline("shapes")
    call = lora.use_lcm_lora(pipe, LORA)
    return pipe, call, shapes.load_scorer()


def test_shipped_lcm_lora_is_small_and_the_output_of_the_committed_defaults():
    assert LORA.is_file() and LORA.stat().st_size < 2 * 2**20, LORA
    record = json.loads((SHIPPED / "lcm_lora.json").read_text())
    defaults = _script().parser().parse_args([])
    assert record["options"] == {k: getattr(defaults, k) for k in _script().OPTIONS}
    assert record["steps"] == defaults.steps


def test_shipped_lcm_lora_loads_as_a_user_file(lcm_pipe):
    import diffusers

    pipe, call, _ = lcm_pipe
    assert call == {"num_inference_steps": 4, "guidance_scale": 1.0}
    assert isinstance(pipe.scheduler, diffusers.LCMScheduler)
    [record] = lora.current_loras(pipe)
    assert record == {"name": "pytorch_lora_weights", "sha256": lora.lora_record([LORA])[0]["sha256"], "scale": 1.0}
    plain = load_pipeline("shapes").unet.state_dict()
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, plain[k])]
    assert len(changed) > 50  # fused into the U-Net's weights: a plain U-Net again, ready for any backend


@pytest.fixture(scope="module")
def lcm_runs(lcm_pipe):
    """Every caption once (seeds never used in distillation's checks), LCM 4 steps, without DeepCache and with
    N=2 and N=3 (branch 0)."""
    pipe, call, _ = lcm_pipe
    scenes = data.all_scenes()
    runs = {None: (pipeline_images(pipe, scenes, seed=30_000, steps=4, guidance_scale=1.0), None)}
    for interval in (2, 3):
        dc.enable(pipe, DeepCacheConfig(interval=interval, branch=0))
        try:
            runs[interval] = (pipeline_images(pipe, scenes, seed=30_000, steps=4, guidance_scale=1.0),
                              dc.last_stats(pipe))
        finally:
            dc.disable(pipe)
    return scenes, runs


@pytest.fixture(scope="module")
def reference(lcm_pipe, lcm_runs):
    """The scorer's view of 1200 real images for the captions of lcm_runs (rendered once for every setting)."""
    from dcaccel.shapes.evaluate import Reference

    return Reference(lcm_pipe[2], lcm_runs[0], real_images=1200)


@pytest.mark.slow  # 25 s of images
def test_lcm_four_steps_draws_what_the_prompt_says(lcm_pipe, lcm_runs):
    _, _, scorer = lcm_pipe
    scenes, runs = lcm_runs
    acc = accuracy(scorer, runs[None][0], scenes)["all"]
    held = data.held_out_scenes()
    held_acc = accuracy(scorer, pipeline_images(lcm_pipe[0], held * 3, seed=31_000, steps=4, guidance_scale=1.0),
                        held * 3)["all"]
    print(f"LCM-LoRA 4 steps, guidance 1: prompt accuracy {acc:.1%}, held-out scenes {held_acc:.1%}")
    assert acc >= MIN_LCM4_ACCURACY
    assert held_acc >= 0.8


@pytest.mark.parametrize("interval, full_steps, fid_ratio", [(3, [0, 3], LCM_N3_FID_RATIO),
                                                             (2, [0, 2], LCM_N2_FID_RATIO)])
def test_deepcache_on_lcm_stays_within_the_measured_margin(lcm_runs, reference, interval, full_steps, fid_ratio):
    _, runs = lcm_runs
    (plain, _), (cached, stats) = runs[None], runs[interval]
    assert stats.full_steps == full_steps and len(stats.shallow_steps) == 4 - len(full_steps)
    a, b = reference.metrics(plain), reference.metrics(cached, plain)
    print(f"LCM 4 steps, N={interval} B=0: accuracy {a['prompt_accuracy']:.1%} -> {b['prompt_accuracy']:.1%}; FID "
          f"{a['fid_scorer']:.2f} -> {b['fid_scorer']:.2f}; PSNR {b['psnr_to_baseline_db']:.1f} dB")
    assert b["psnr_to_baseline_db"] < 60  # DeepCache changed the images, so the margin means something
    assert b["prompt_accuracy"] >= a["prompt_accuracy"] - LCM_DEEPCACHE_MARGIN
    assert b["fid_scorer"] <= a["fid_scorer"] * fid_ratio


@pytest.mark.slow  # the training tooling, not the product: 15-20 s each, run with --runslow
def test_distillation_script_runs_resumes_and_writes_a_loadable_lora(tmp_path):
    import subprocess

    work, out = tmp_path / "work", tmp_path / "out"
    cmd = [sys.executable, str(REPO / "build_scripts" / "distill_lcm_lora.py"), "--work-dir", str(work), "--out",
           str(out), "--steps", "2", "--batch", "4", "--num-images", "216", "--eval-every", "0",
           "--save-every", "1", "--rank", "4", "--check-seeds", "0"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    cmd[cmd.index("--steps") + 1] = "3"
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert [r["resumed_from"] for r in records if "resumed_from" in r] == [2]
    assert json.loads((out / "lcm_lora.json").read_text())["steps"] == 3
    cmd[cmd.index("--rank") + 1] = "8"
    other = subprocess.run(cmd, capture_output=True, text=True)
    assert other.returncode != 0 and "trained on other inputs" in other.stderr
    pipe = load_pipeline("shapes")
    lora.use_lcm_lora(pipe, out / "pytorch_lora_weights.safetensors")
    assert pipe("a small red circle at the top left", num_inference_steps=2, guidance_scale=1.0,
                output_type="pt").images.shape == (1, 3, 32, 32)
    assert not [p for p in tmp_path.rglob("*") if ".partial" in p.name]


def test_parse_lora_argument_knows_the_embedded_name_and_checks_the_scale():
    spec = lora.parse_lora_argument("shapes-lcm:0.5")
    assert spec.path.resolve() == LORA.resolve()
    assert (spec.scale, spec.name) == (0.5, None)  # named by its file, as when its path is given (engines agree)
    assert lora.parse_lora_argument("dir:with:colons.safetensors").path == Path("dir:with:colons.safetensors")
    with pytest.raises(ValueError, match=r"LoRA scale must be a finite number in \[-100, 100\], got 1000000000.0"):
        lora.parse_lora_argument("x.safetensors:1e9")
    with pytest.raises(ValueError, match=r"no embedded LoRA 'nope'; embedded: \['shapes-lcm'\]"):
        lora.embedded_lora("nope")


@pytest.mark.slow  # 58 s
def test_build_and_generate_with_the_shipped_lcm_lora_in_separate_processes(tmp_path):
    """As a user runs it: `dcaccel build --lora shapes-lcm --no-cfg` in one process, `dcaccel generate` on those
    engines with the same LoRA in another; the engine image matches the eager one of the same seed."""
    import subprocess

    from PIL import Image

    cli = [sys.executable, "-m", "dcaccel.cli"]
    common = ["--model", "shapes", "--lora", "shapes-lcm", "--branch", "0"]
    built = subprocess.run([*cli, "build", *common, "--no-cfg", "--out", str(tmp_path / "E")], capture_output=True,
                           text=True, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    [engine_dir] = [p.parent for p in (tmp_path / "E").rglob("manifest.json")]
    images = {}
    for backend in ("eager", "onnxruntime"):
        extra = ["--engine-dir", str(engine_dir)] if backend == "onnxruntime" else []
        run = subprocess.run([*cli, "generate", *common, "--interval", "2", "--scheduler", "lcm", "--steps", "4",
                              "--guidance", "1", "--backend", backend, *extra,
                              "--output", str(tmp_path / f"{backend}.png")],
                             capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "scorer reads the DeepCache image as" in run.stdout, run.stdout
        images[backend] = torch.tensor(list(Image.open(tmp_path / f"{backend}.png").getdata()), dtype=torch.float32)
    assert (images["eager"] - images["onnxruntime"]).abs().max() <= 2  # 8-bit PNGs of the same image
    refused = subprocess.run([*cli, "generate", "--model", "shapes", "--interval", "2", "--steps", "4",
                              "--scheduler", "lcm", "--guidance", "1", "--backend", "onnxruntime", "--engine-dir",
                              str(engine_dir), "--output", str(tmp_path / "x.png")], capture_output=True, text=True,
                             cwd=tmp_path)
    assert refused.returncode == 2 and "lora" in refused.stderr.lower(), refused.stderr
    pipe = load_pipeline("shapes")  # the Python API on the CLI's engine: the same LoRA by its file
    lora.use_lcm_lora(pipe, lora.embedded_lora("shapes-lcm"))
    dc.enable(pipe, DeepCacheConfig(interval=2, branch=0), backend="onnxruntime", engine_dir=engine_dir)
    try:
        assert pipe("a small red circle at the top left", num_inference_steps=4, guidance_scale=1.0,
                    output_type="pt").images.shape == (1, 3, 32, 32)
    finally:
        dc.disable(pipe)


@pytest.mark.slow
def test_lcm_quality_benchmark_writes_its_table_and_plot(tmp_path):
    import subprocess

    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lcm_quality.py"), "--lcm-steps", "2",
                          "--ddim-steps", "2", "--seeds", "1", "--repeats", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    rows = [r["row"] for r in records if r["backend"] == "eager"]
    assert rows == ["DDIM 2 steps, no DeepCache", "DDIM 2 steps, DeepCache N=2 B=0", "DDIM 2 steps, DeepCache N=3 B=0",
                    "DDIM 4 steps, no DeepCache", "LCM scheduler, no LoRA 4 steps, no DeepCache",
                    "LCM-LoRA 2 steps, no DeepCache", "LCM-LoRA 2 steps, DeepCache N=2 B=0",
                    "LCM-LoRA 2 steps, DeepCache N=2 B=1", "LCM-LoRA 2 steps, DeepCache N=3 B=0",
                    "LCM-LoRA 2 steps, DeepCache N=3 B=1"]
    assert [r["row"] for r in records if r["backend"] == "onnxruntime"] == rows
    for r in records:
        assert 0 <= r["prompt_accuracy"] <= 1 and r["fid_scorer"] >= 0 and r["unet_ms_per_image"] > 0
    same = {r["row"]: r for r in records if r["backend"] == "eager"}
    onnx = {r["row"]: r for r in records if r["backend"] == "onnxruntime"}
    for row in rows:  # the same images on both backends, within ONNX Runtime's float differences
        assert abs(same[row]["prompt_accuracy"] - onnx[row]["prompt_accuracy"]) <= 0.02, row
    assert "| eager | LCM-LoRA 2 steps, DeepCache N=2 B=0 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 10_000
