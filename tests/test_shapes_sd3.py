"""shapes-sd3: the shapes task on Stable Diffusion 3's architecture, trained here (build_scripts/train_shapes_sd3.py),
shipped in dcaccel/weights/shapes-sd3 and loaded with from_pretrained as a user would; the transformer defaults
chosen from the quality sweep (benchmarks/quality_sd3.py) and the margin they keep; the sweep's own pieces."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcaccel import pipeline as dc
from dcaccel import shapes
from dcaccel.config import DeepCacheConfig
from dcaccel.models import load_pipeline, trained_model_dir
from dcaccel.shapes import data
from dcaccel.shapes.model import SD3_TRANSFORMER_CONFIG
from dcaccel.shapes.score import accuracy, pipeline_images

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "build_scripts"))

import quality_sd3  # noqa: E402
import train_shapes_sd3  # noqa: E402

# The bar, without DeepCache on new seeds: 95% of all captions drawn right and 90% of the held-out
# combinations. The shipped model (the committed defaults, 12000 steps) reached 100% and 99.2% in its own checks;
# chance is 0.8%, so a worse retraining or a loading defect fails these.
MIN_PROMPT_ACCURACY, MIN_HELD_OUT_ACCURACY = 0.95, 0.90


@pytest.fixture(scope="module")
def shipped():
    return load_pipeline("shapes-sd3"), shapes.load_scorer()


def test_shipped_model_is_an_sd3_pipeline_from_its_directory(shipped):
    from diffusers import StableDiffusion3Pipeline

    pipe, _ = shipped
    directory = Path(trained_model_dir("shapes-sd3"))
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is None
    config = pipe.transformer.config
    assert {k: config[k] for k in SD3_TRANSFORMER_CONFIG} == {k: (list(v) if isinstance(v, tuple) else v)
                                                              for k, v in SD3_TRANSFORMER_CONFIG.items()}
    blocks = pipe.transformer.transformer_blocks
    assert [b.attn2 is not None for b in blocks] == [True, True, True, False, False, False]  # dual attention
    assert blocks[-1].context_pre_only and not blocks[0].context_pre_only
    assert pipe.vae.config.shift_factor is not None
    total = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    assert total < 10 * 2**20, f"shipped weights are {total / 2**20:.1f} MiB"
    # diffusers itself, as a user without dcaccel would load it
    plain = StableDiffusion3Pipeline.from_pretrained(directory, text_encoder_3=None, tokenizer_3=None,
                                                     local_files_only=True)
    assert torch.equal(plain.transformer.pos_embed.proj.weight.float(), pipe.transformer.pos_embed.proj.weight)


def test_shipped_weights_are_the_committed_defaults_run(shipped):
    recorded = json.loads((Path(trained_model_dir("shapes-sd3")) / "shapes.json").read_text())
    defaults = vars(train_shapes_sd3.parser().parse_args([]))
    assert recorded["options"] == {k: defaults[k] for k in train_shapes_sd3.OPTIONS}
    assert recorded["steps"] == defaults["steps"]
    checks = recorded["prompt_accuracy_new_seeds"]
    assert checks["all_captions"]["all"] >= MIN_PROMPT_ACCURACY and checks["held_out"]["all"] >= MIN_HELD_OUT_ACCURACY


def test_training_encodes_prompts_as_the_pipeline_does(shipped):
    pipe, _ = shipped
    prompt = "a small red circle at the top left"
    ids = pipe.tokenizer([prompt, ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        embeds, pooled = train_shapes_sd3.encode_text(pipe.text_encoder, pipe.text_encoder_2, ids,
                                                      pipe.transformer.config.joint_attention_dim)
        pe, ne, pp, npp = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=True)
    assert embeds.shape == (2, pipe.tokenizer.model_max_length + 256, 128)  # CLIP tokens + 256 zero T5 tokens
    torch.testing.assert_close(embeds, torch.cat([pe, ne]))
    torch.testing.assert_close(pooled, torch.cat([pp, npp]))


def test_training_on_collapsed_zero_tokens_is_the_pipelines_function(shipped):
    """The training script runs the T5 slot's 256 identical zero tokens as one token with its attention logit
    raised by log(256): the transformer must compute the same noise prediction as on the pipeline's 272 tokens,
    and only its joint attentions change processor."""
    import copy

    pipe, _ = shipped
    prompts = ["a large blue triangle at the top left", "a small red circle in the center", ""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    torch.manual_seed(0)
    x, sigma = torch.randn(3, 4, 16, 16), torch.tensor([0.9, 0.5, 0.1])
    joint_dim = pipe.transformer.config.joint_attention_dim
    collapsed = copy.deepcopy(pipe.transformer)
    train_shapes_sd3.collapse_zero_tokens(collapsed)
    assert {type(b.attn.processor).__name__ for b in collapsed.transformer_blocks} == {"CollapsedZerosAttention"}
    assert all(type(b.attn2.processor).__name__ == "JointAttnProcessor2_0"
               for b in collapsed.transformer_blocks if b.attn2 is not None)
    with torch.no_grad():
        full, pooled = train_shapes_sd3.encode_text(pipe.text_encoder, pipe.text_encoder_2, ids, joint_dim)
        one, _ = train_shapes_sd3.encode_text(pipe.text_encoder, pipe.text_encoder_2, ids, joint_dim, t5_tokens=1)
        assert one.shape[1] == full.shape[1] - 255
        want = pipe.transformer(hidden_states=x, encoder_hidden_states=full, pooled_projections=pooled,
                                timestep=sigma * 1000).sample
        got = collapsed(hidden_states=x, encoder_hidden_states=one, pooled_projections=pooled,
                        timestep=sigma * 1000).sample
        plain_one = pipe.transformer(hidden_states=x, encoder_hidden_states=one, pooled_projections=pooled,
                                     timestep=sigma * 1000).sample
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (plain_one - want).abs().max() > 1e-2  # without the bias, one zero token is another function


def _default_cache_runs(pipe, scenes, seed):
    """Images of `scenes` without and with the family's default DeepCache, same seeds, the cached run's
    statistics and the config and cut it resolved to."""
    base = pipeline_images(pipe, scenes, seed=seed, batch=120)
    dc.enable(pipe, DeepCacheConfig())
    try:
        cached = pipeline_images(pipe, scenes, seed=seed, batch=120)
        stats, state = dc.last_stats(pipe), dc.enabled_state(pipe)
    finally:
        dc.disable(pipe)
    return base, cached, stats, (state.config, state.cut)


def _check_margin(scorer, scenes, base, cached, accuracy_margin):
    from dcaccel.shapes.evaluate import Reference

    ref = Reference(scorer, scenes)
    base_m, cached_m = ref.metrics(base), ref.metrics(cached, base)
    print(f"{len(scenes)} images: no cache {base_m['prompt_accuracy']:.1%} FID {base_m['fid_scorer']:.2f}; default "
          f"{cached_m['prompt_accuracy']:.1%} FID {cached_m['fid_scorer']:.2f} "
          f"PSNR {cached_m['psnr_to_baseline_db']:.1f}")
    assert (cached - base).abs().max() > 1e-3  # the cache changed the images, so the margin means something
    assert cached_m["prompt_accuracy"] >= base_m["prompt_accuracy"] - accuracy_margin
    assert cached_m["fid_scorer"] <= base_m["fid_scorer"] * (1 + quality_sd3.PAPER_FID_MARGIN)
    return base_m


@pytest.fixture(scope="module")
def runs(shipped):
    """Every caption once, on seeds the sweep never used, without and with the default DeepCache."""
    scenes = data.all_scenes()
    return (scenes, *_default_cache_runs(shipped[0], scenes, seed=30_000))


@pytest.mark.slow  # 100 s of images (the runs fixture); test_calibration's margin test draws shapes-sd3 by default
def test_shipped_model_draws_what_the_prompt_says(shipped, runs):
    _, scorer = shipped
    scenes, base, *_ = runs
    acc = accuracy(scorer, base, scenes)
    print(f"prompt accuracy {acc}")
    assert acc["all"] >= MIN_PROMPT_ACCURACY
    for attribute in ("shape", "colour", "size", "position"):
        assert acc[attribute] >= 0.97, (attribute, acc)


@pytest.mark.slow  # 33 s
def test_shipped_model_composes_the_held_out_combinations(shipped):
    """The 12 combinations training never saw, 5 new seeds each."""
    pipe, scorer = shipped
    held = data.held_out_scenes() * 5
    held_acc = accuracy(scorer, pipeline_images(pipe, held, seed=40_000, batch=60), held)["all"]
    print(f"held-out combinations: {held_acc:.1%}")
    assert held_acc >= MIN_HELD_OUT_ACCURACY


@pytest.mark.slow  # shares the 100 s of images above
def test_default_cut_keeps_accuracy_and_fid_within_the_margin(shipped, runs):
    """The defaults are the sweep's fastest setting within one point of prompt accuracy and the paper's relative FID
    margin (on 360 images). On 120 new ones: within that FID margin, and within one point plus one image."""
    scenes, base, cached, stats, (config, cut) = runs
    recorded = [json.loads(line) for line in (REPO / "benchmarks" / "results" / "2026-11-25-shapes-sd3-quality" /
                                              "results.jsonl").read_text().splitlines()]
    best = quality_sd3.recommend(recorded)
    assert best is not None and best["setting"] == recorded[0]["recommended"], "results file and rule disagree"
    assert {"interval": config.interval, **cut} == best["params"] == {"interval": 2, "head_blocks": 0,
                                                                      "tail_blocks": 1}
    assert stats.full_steps == list(range(0, 20, 2))
    _check_margin(shipped[1], scenes, base, cached, quality_sd3.ACCURACY_MARGIN + 1 / len(scenes))


@pytest.mark.slow
def test_default_cut_keeps_the_margin_on_360_new_images(shipped):
    pipe, scorer = shipped
    scenes = data.all_scenes() * 3
    base, cached, *_ = _default_cache_runs(pipe, scenes, seed=50_000)
    _check_margin(scorer, scenes, base, cached, quality_sd3.ACCURACY_MARGIN)


def test_pareto_front_and_recommendation():
    assert quality_sd3.pareto([(1.0, 1.0), (2.0, 0.5), (0.5, 0.5), (2.0, 0.4)]) == [0, 1]
    rec = lambda name, method, acc, fid, speed: {"setting": name, "method": method,  # noqa: E731
                                                 "prompt_accuracy": acc, "fid_scorer": fid,
                                                 "speedup_transformer": speed}
    records = [rec("none", "none", 0.99, 10.0, 1.0), rec("a", "dcaccel DeepCache", 0.985, 10.5, 2.0),
               rec("b", "dcaccel DeepCache", 0.97, 10.1, 3.0),    # loses 2 points
               rec("c", "dcaccel DeepCache", 0.99, 10.7, 3.5),    # FID +7% > the paper's 6.5%
               rec("d", "cache-dit DBCache", 0.99, 10.0, 4.0)]    # not ours: never a default
    assert quality_sd3.recommend(records)["setting"] == "a"
    assert quality_sd3.recommend(records[:1] + records[2:4]) is None


def test_every_cache_dit_row_builds_its_configs():
    pytest.importorskip("cache_dit")
    rows = [r for r in quality_sd3.default_rows(20) if r.method.startswith("cache-dit")]
    assert {r.method for r in rows} == {"cache-dit DBCache", "cache-dit DBCache+TaylorSeer", "cache-dit DBCache+FoCa",
                                        "cache-dit DBCache+DMD", "cache-dit DBPrune", "cache-dit DBCache static mask"}
    for row in rows:
        options = quality_sd3.cache_dit_options(row)
        config = options["cache_config"]
        assert (config.Fn_compute_blocks, config.Bn_compute_blocks) == (1, 1)
        assert ("calibrator_config" in options) == ("+" in row.method)


def test_sweep_counts_blocks_and_times_rows_side_by_side(shipped):
    """Two scenes in two rounds of one: no cache equals the plain pipeline, the block counts give the FLOP bound
    of ours by hand, and a cache-dit row runs and is disabled again."""
    pytest.importorskip("cache_dit", reason="cache-dit (the bench extra) is not installed")
    pipe, scorer = shipped
    rows = [quality_sd3.Row("no cache", "none"),
            quality_sd3.Row("ours", "dcaccel DeepCache", {"interval": 2, "head_blocks": 1, "tail_blocks": 1})]
    rows.append(quality_sd3.Row("DBCache", "cache-dit DBCache", {"Fn": 1, "Bn": 1, "warmup": 1, "threshold": 0.5}))
    scenes = data.all_scenes()[:2]
    records, meta, images = quality_sd3.sweep(pipe, scorer, rows, seeds=1, steps=4, guidance=4.0, batch=1,
                                              scenes=scenes)
    assert [r["setting"] for r in records] == [r.label for r in rows] and meta["rounds"] == 2
    plain = pipeline_images(pipe, scenes, seed=10_000, steps=4, batch=1)
    assert records[0]["flop_bound"] == 1.0 and records[0]["speedup_rounds"] == [1.0, 1.0]
    per_block = [g * 1e9 for g in meta["block_gflop"]]
    rest = meta["rest_gflop"] * 1e9
    full, shallow = rest + sum(per_block), rest + per_block[0] + per_block[-1]
    assert records[1]["flop_bound"] == pytest.approx(4 * full / (2 * full + 2 * shallow))
    assert records[1]["psnr_to_baseline_db"] < 100  # the cache changed the images
    assert torch.equal(images["no cache"], plain)
    assert not dc.is_enabled(pipe) and not hasattr(pipe.transformer, "_cached_steps")


@pytest.mark.slow  # the training tooling, not the product: 15-20 s each, run with --runslow
def test_training_script_runs_resumes_and_refuses_other_options(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    cmd = [sys.executable, str(REPO / "build_scripts" / "train_shapes_sd3.py"), "--work-dir", str(work), "--out",
           str(out), "--steps", "2", "--batch", "4", "--num-images", "64", "--eval-every", "0", "--skip-checks"]
    first = subprocess.run([*cmd, "--stop-after-train"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not out.exists()
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    recorded = json.loads((out / "shapes.json").read_text())
    assert recorded["resumed_from"] == 2 and recorded["steps"] == 2  # picked up, not trained again
    pipe = load_pipeline(str(out))
    assert pipe("a small red circle at the top left", num_inference_steps=2, output_type="pt").images.shape == \
        (1, 3, 32, 32)
    other = subprocess.run([*cmd, "--lr", "0.01"], capture_output=True, text=True)
    assert other.returncode != 0 and "other inputs" in other.stderr, other.stderr[-2000:]
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.slow  # 41 s; test_calibration's CLI round trip builds and loads in separate processes by default
def test_generate_and_build_on_shapes_sd3_in_separate_processes(tmp_path):
    """`dcaccel build --model shapes-sd3` in one process, `dcaccel generate` on those engines in another, and
    eager with --baseline: the scorer reads both, and the engine image is the eager one."""
    from PIL import Image

    cli = [sys.executable, "-m", "dcaccel.cli"]
    built = subprocess.run([*cli, "build", "--model", "shapes-sd3", "--out", str(tmp_path / "E")],
                           capture_output=True, text=True, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    [engine_dir] = [p.parent for p in (tmp_path / "E").rglob("manifest.json")]
    images = {}
    for backend in ("eager", "onnxruntime"):
        extra = ["--engine-dir", str(engine_dir)] if backend == "onnxruntime" else ["--baseline"]
        run = subprocess.run([*cli, "generate", "--model", "shapes-sd3", "--steps", "10", "--backend", backend,
                              *extra, "--output", str(tmp_path / f"{backend}.png")],
                             capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "embedded shapes-sd3 model" in run.stdout and "scorer reads the DeepCache image as" in run.stdout
        images[backend] = torch.tensor(list(Image.open(tmp_path / f"{backend}.png").getdata()), dtype=torch.float32)
    assert (images["eager"] - images["onnxruntime"]).abs().max() <= 2


@pytest.mark.slow
def test_quality_sd3_script_writes_table_and_plot(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality_sd3.py"), "--quick", "--seeds", "1",
                          "--steps", "8", "--out", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} >= {"none", "dcaccel DeepCache", "cache-dit DBCache",
                                              "cache-dit DBCache+TaylorSeer"}
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert "Rule for the transformer defaults" in (tmp_path / "results.md").read_text()
