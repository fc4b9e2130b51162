"""The shapes model: data, tokenizer, scorer, the shipped trained pipeline, and DeepCache's cost in prompt accuracy
on it. The shipped weights are loaded with `from_pretrained` from the package directory, as a user would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcaccel import pipeline as dc
from dcaccel import shapes
from dcaccel.config import DeepCacheConfig
from dcaccel.models import load_pipeline, trained_model_dir
from dcaccel.shapes import data
from dcaccel.shapes.model import UNET_CONFIG
from dcaccel.shapes.score import accuracy, chance_accuracy, frechet_distance, pipeline_images

REPO = Path(__file__).resolve().parents[1]
# Figures the shipped model reached when these tests were written (2026-11-23, see README): the tests assert
# bounds below them with room for run-to-run differences of the seeds, not the figures themselves.
MIN_PROMPT_ACCURACY = 0.95  # the issue asks for 80%; reached 100% (all 120 captions and the 12 held-out ones)
DEEPCACHE_MARGIN = 0.05  # N=3 B=0 may lose at most 5 points of prompt accuracy against no DeepCache


def test_dataset_is_deterministic_and_captions_match_labels():
    a, scenes_a = data.make_dataset(50, seed=7)
    b, scenes_b = data.make_dataset(50, seed=7)
    c, _ = data.make_dataset(50, seed=8)
    assert np.array_equal(a, b) and scenes_a == scenes_b and not np.array_equal(a, c)
    assert a.shape == (50, 32, 32, 3) and a.dtype == np.uint8
    assert {s for s in scenes_a} <= set(data.training_scenes())
    assert shapes.parse_caption("a small red circle at the top left") == data.Scene("circle", "red", "small",
                                                                                  "top left")
    assert shapes.parse_caption("a large green square in the center").position == "center"
    assert shapes.parse_caption("an astronaut riding a horse") is None


def test_held_out_scenes_are_never_trained_on():
    held, train = set(data.held_out_scenes()), set(data.training_scenes())
    assert len(held) == data.NUM_HELD_OUT and not held & train
    assert held | train == set(data.all_scenes())
    assert len(data.all_scenes()) == 3 * 4 * 2 * 5
    assert chance_accuracy() == pytest.approx(1 / 120)


def test_tokenizer_makes_one_token_per_word_and_round_trips(tmp_path):
    from transformers import CLIPTokenizer

    from dcaccel.shapes.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(data.vocabulary())
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    for scene in data.all_scenes():
        words = scene.caption.split()
        assert loaded.tokenize(scene.caption) == [w + "</w>" for w in words]
        ids = loaded(scene.caption, padding="max_length", max_length=loaded.model_max_length).input_ids
        assert len(ids) == loaded.model_max_length and ids[0] == 0 and ids[len(words) + 1] == 1


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8))
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
    near, far = frechet_distance(x, x + 0.1), frechet_distance(x, x + 1.0)
    assert near == pytest.approx(8 * 0.01, rel=1e-6) and far == pytest.approx(8.0, rel=1e-6)
    assert frechet_distance(x, rng.normal(size=(500, 8)) * 2) > 1.0


@pytest.fixture(scope="module")
def shipped():
    pipe = load_pipeline("shapes")
    return pipe, shapes.load_scorer()


def test_shipped_model_loads_from_its_directory_as_a_stable_diffusion_pipeline(shipped):
    from diffusers import StableDiffusionPipeline

    pipe, _ = shipped
    directory = Path(trained_model_dir("shapes"))
    assert isinstance(pipe, StableDiffusionPipeline)
    index = json.loads((directory / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    total = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    assert total < 20 * 2**20, f"shipped weights are {total / 2**20:.1f} MiB"
    unet = pipe.unet
    assert unet.dtype == torch.float32 and len(unet.down_blocks) == 3 and unet.config.layers_per_block == 2
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D",
                                                           "CrossAttnDownBlock2D"]


@pytest.mark.slow  # kept out of the default run for its time (2026-12-08: the default run was 11.9 min)
def test_scorer_reads_vae_reconstructions_almost_as_well_as_real_images(shipped):
    pipe, scorer = shipped
    real_np, scenes = data.make_dataset(600, seed=3, scenes=data.all_scenes())
    real = data.to_tensor(real_np)
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(real).latent_dist.mode()).sample.clamp(-1, 1)
    on_real, on_recon = accuracy(scorer, real, scenes)["all"], accuracy(scorer, recon, scenes)["all"]
    print(f"scorer accuracy: real {on_real:.1%}, VAE reconstructions {on_recon:.1%}")
    assert on_real >= 0.97
    assert on_recon >= on_real - 0.03


@pytest.fixture(scope="module")
def prompt_runs(shipped):
    """Every scene once, seeds never used before, without and with DeepCache N=3 B=0 (same seeds)."""
    pipe, scorer = shipped
    scenes = data.all_scenes()
    baseline = pipeline_images(pipe, scenes, seed=20_000)
    dc.enable(pipe, DeepCacheConfig(interval=3, branch=0))
    try:
        cached = pipeline_images(pipe, scenes, seed=20_000)
        stats = dc.last_stats(pipe)
    finally:
        dc.disable(pipe)
    return scenes, baseline, cached, stats


@pytest.mark.slow  # 35 s of images
def test_shipped_model_draws_what_the_prompt_says(shipped, prompt_runs):
    _, scorer = shipped
    scenes, baseline, _, _ = prompt_runs
    acc = accuracy(scorer, baseline, scenes)
    held = set(data.held_out_scenes())
    mask = torch.tensor([s in held for s in scenes])
    held_acc = accuracy(scorer, baseline[mask], [s for s in scenes if s in held])
    print(f"prompt accuracy without DeepCache: {acc} (chance {chance_accuracy():.1%}); held-out scenes {held_acc}")
    assert acc["all"] >= MIN_PROMPT_ACCURACY
    assert held_acc["all"] >= 0.9  # combinations never seen in training: composition, not memory
    for attribute in data.ATTRIBUTES:
        assert acc[attribute] >= 0.9, (attribute, acc)


@pytest.mark.slow  # 36 s of images; test_calibration's margin test draws the shapes U-Net by default
def test_deepcache_keeps_prompt_accuracy_within_margin(shipped, prompt_runs):
    _, scorer = shipped
    scenes, baseline, cached, stats = prompt_runs
    assert stats.shallow_steps, "DeepCache ran no shallow step"
    base_acc, cached_acc = accuracy(scorer, baseline, scenes)["all"], accuracy(scorer, cached, scenes)["all"]
    print(f"prompt accuracy: no DeepCache {base_acc:.1%}, N=3 B=0 {cached_acc:.1%}")
    assert cached_acc >= base_acc - DEEPCACHE_MARGIN
    assert (cached - baseline).abs().max() > 1e-3  # DeepCache changed the images, so the margin means something


def test_generate_default_is_the_shapes_model(tmp_path, capsys):
    from dcaccel.cli import main

    out = tmp_path / "img.png"
    assert main(["generate", "--steps", "10", "--baseline", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "embedded shapes model" in text and "scorer reads the DeepCache image as" in text
    assert out.exists() and out.with_name("img-baseline.png").exists()


@pytest.mark.slow  # the training tooling, not the product: 15-20 s each, run with --runslow
def test_training_script_runs_and_resumes(tmp_path):
    """A few steps of every stage, exported and loaded; a rerun with more U-Net steps continues the checkpoint."""
    work, out = tmp_path / "work", tmp_path / "out"
    cmd = [sys.executable, str(REPO / "build_scripts" / "train_shapes.py"), "--work-dir", str(work), "--out",
           str(out), "--vae-steps", "2", "--scorer-steps", "2", "--unet-steps", "2", "--batch", "8",
           "--num-images", "64", "--real-images", "32", "--eval-every", "1000000", "--eval-scenes", "2",
           "--stop-after", "unet"]
    run = lambda: subprocess.run(cmd, capture_output=True, text=True)  # noqa: E731
    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "vae"] == [2]
    assert not any("resumed_from" in r for r in records)
    cmd[cmd.index("--unet-steps") + 1] = "4"
    cmd = cmd[:-2]  # this time through to the export
    second = run()
    assert second.returncode == 0, second.stderr[-3000:]
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()][len(records):]
    resumed = {r["stage"]: r["resumed_from"] for r in records if "resumed_from" in r}
    assert resumed == {"vae": 2, "scorer": 2, "unet": 2}  # every stage picked up, none restarted
    assert not any(r["stage"] in ("vae", "scorer") and "step" in r for r in records)  # finished: not trained
    assert not any(r["stage"] == "latents" for r in records)  # encoded once, reused
    assert [r["step"] for r in records if r["stage"] == "unet-eval"] == [4]
    pipe = load_pipeline(str(out))
    assert pipe.unet.config.block_out_channels == list(UNET_CONFIG["block_out_channels"])
    image = pipe("a small red circle at the top left", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 32, 32)
    assert json.loads((out / "shapes.json").read_text())["steps"]["unet"] == 4
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.slow  # kept out of the default run for its time (2026-12-07: the default run was 13 min)
def test_quality_sweep_records_accuracy_fid_and_speed_per_setting(shipped, tmp_path):
    from dcaccel.shapes.evaluate import markdown, quality_sweep

    pipe, scorer = shipped
    scenes = data.all_scenes()[::6] + data.held_out_scenes()[:2]
    settings = [DeepCacheConfig(interval=3, branch=0), DeepCacheConfig(interval=5, branch=8, schedule="nonuniform")]
    records, meta = quality_sweep(pipe, scorer, settings, seeds=1, steps=10, real_images=200, scenes=scenes,
                                  progress=lambda *_: None)
    assert [r["setting"] for r in records] == ["no DeepCache", "N=3 B=0 uniform", "N=5 B=8 nonuniform"]
    base = records[0]
    assert base["agreement_with_baseline"] == 1.0 and base["speedup_unet"] == pytest.approx(1.0)
    held = set(data.held_out_scenes())
    assert base["held_out_images"] == sum(s in held for s in scenes) > 0 and base["images"] == len(scenes)
    for r in records:
        assert 0 <= r["prompt_accuracy"] <= 1 and r["fid_scorer"] >= 0 and r["unet_seconds"] > 0
    assert records[1]["psnr_to_baseline_db"] < 100  # DeepCache changed the images
    assert meta["fid_real_floor"] >= 0
    table = markdown(records, meta, "# test")
    assert table.count("\n| N=") == 2 and "no DeepCache" in table


@pytest.mark.slow
def test_quality_script_writes_results(tmp_path):
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--settings", "3:0", "--seeds", "1",
                    "--repeats", "1", "--steps", "5", "--scorer", "shapes", "--out", str(tmp_path)],
                   check=True, capture_output=True)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["setting"] for line in lines] == ["no DeepCache", "N=3 B=0 uniform"]
    assert {json.loads(line)["scorer"] for line in lines} == {"shapes"}
    assert "| N=3 B=0 uniform |" in (tmp_path / "results.md").read_text()


def test_quality_script_refuses_a_directory_without_a_scorer(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--scorer", str(tmp_path),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2 and "no scorer in" in run.stderr and "scorer/model.safetensors" in run.stderr
    assert not (tmp_path / "out").exists()


def test_training_script_exports_beside_the_shipped_model_by_default():
    # its defaults do not reproduce the shipped model's FID, so a plain run must not replace it
    run = subprocess.run([sys.executable, str(REPO / "build_scripts" / "train_shapes.py"), "--help"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "1000"})  # argparse would break a long path across lines
    assert str(REPO / ".train" / "shapes-out") in run.stdout and "dcaccel/weights/shapes)" in run.stdout
