import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dcaccel import bench


def _args(argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


# -- FLOPs ---------------------------------------------------------------------------------------------------------


def _flops(fn, mapping=None):
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping or {}) as counter:
        fn()
    return counter.get_total_flops(), {str(k) for k in counter.get_flop_counts()["Global"]}


@pytest.mark.parametrize("shapes", [((2, 4, 64, 8), (2, 4, 77, 8), (2, 4, 77, 8)),
                                    ((3, 2, 16, 40), (3, 2, 9, 40), (3, 2, 9, 40))])
def test_sdpa_formula_equals_explicit_matmuls(shapes):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g) for s in shapes)
    fused, ops = _flops(lambda: F.scaled_dot_product_attention(q, k, v), bench.sdpa_flop_formulas())
    explicit, _ = _flops(lambda: torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v)
    (b, h, length, e), s, ev = shapes[0], shapes[1][-2], shapes[2][-1]
    assert fused == explicit == 2 * b * h * length * s * e + 2 * b * h * length * s * ev
    assert any("scaled_dot_product" in op for op in ops), "counted on the fused CPU kernel, not a decomposition"
    # A value dim unlike the query's (the CPU kernel declines those shapes, so check the formula alone).
    assert bench.sdpa_flops((1, 1, 4, 8), (1, 1, 5, 8), (1, 1, 5, 16)) == 2 * 4 * 5 * 8 + 2 * 4 * 5 * 16


def test_sdpa_formula_on_a_diffusers_attention_block():
    """AttnProcessor2_0 (SDPA) with our formula counts what the classic processor's explicit baddbmm/bmm count."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8).eval()
    x, ctx = torch.randn(2, 50, 32), torch.randn(2, 77, 24)
    attn.set_processor(AttnProcessor2_0())
    sdpa, _ = _flops(lambda: attn(x, encoder_hidden_states=ctx), bench.sdpa_flop_formulas())
    attn.set_processor(AttnProcessor())
    classic, ops = _flops(lambda: attn(x, encoder_hidden_states=ctx))
    assert "aten.bmm" in ops and sdpa == classic > 0


@pytest.mark.slow  # kept out of the default run for its time (2026-12-08: the default run was 11.9 min)
def test_graph_flops_meta_count_equals_cpu_count_and_matches_the_spec(tiny_pipe):
    from dcaccel.config import BuildConfig
    from dcaccel.models import architecture_config
    from dcaccel.families.unet import graph_specs, split_unet

    unet = tiny_pipe("tiny").unet
    build = BuildConfig(height=32, width=32, branch=1)
    from dcaccel.families.unet import FAMILY

    geometry = {"vae_scale_factor": 2, "text_len": 77}
    meta = bench.graph_flops(FAMILY, unet, {"branch": 1}, build, geometry)
    assert meta["method"].startswith("FlopCounterMode on a meta-device copy")
    specs = graph_specs(unet, 1, build, 2, 77)
    full, shallow = split_unet(unet, 1)
    assert meta["full"] == bench.count_flops(full, specs["full"].sample_inputs())
    assert meta["shallow"] == bench.count_flops(shallow, specs["shallow"].sample_inputs())
    assert 0 < meta["shallow"] < meta["full"]

    # DEEPCACHE.md: an SD 1.5 cached step at branch 0, latent 32x32, costs 0.066 of a full one.
    import diffusers

    with torch.device("meta"):
        sd15 = diffusers.UNet2DConditionModel(**architecture_config("sd15")["unet"])
    f = bench.graph_flops(FAMILY, sd15, {"branch": 0}, BuildConfig(height=256, width=256, branch=0),
                          {"vae_scale_factor": 8, "text_len": 77})
    assert f["shallow"] / f["full"] == pytest.approx(0.066, abs=5e-4)


def test_theoretical_speedup():
    assert bench.theoretical_speedup(20, 7, 13, 100, 10) == pytest.approx(2000 / (700 + 130))
    assert bench.theoretical_speedup(5, 5, 0, 100, 10) == 1.0


# -- fidelity metrics ----------------------------------------------------------------------------------------------


def _pattern():
    """A deterministic 3x40x36 image in [0, 1] and a perturbed copy (no RNG: the same on every torch)."""
    i = torch.arange(40, dtype=torch.float64)
    j = torch.arange(36, dtype=torch.float64)
    c = torch.arange(3, dtype=torch.float64)
    x = 0.5 + 0.4 * torch.sin(i[None, :, None] / 5 + c[:, None, None]) * torch.cos(j[None, None, :] / 7)
    y = (x + 0.08 * torch.sin(i[None, :, None] * 1.7 + j[None, None, :] * 2.3)).clamp(0, 1)
    return x, y


def test_ssim_identity_noise_and_reference_values():
    x, y = _pattern()
    assert bench.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    # skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    # data_range=1, channel_axis=2) gives 0.7429624232309919 for this pair.
    assert bench.ssim(y, x) == pytest.approx(0.7429624232309919, abs=1e-9)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    values = [bench.ssim((x + s * noise).clamp(0, 1), x) for s in (0.01, 0.05, 0.2, 0.5)]
    assert all(a > b for a, b in zip(values, values[1:])) and values[0] < 1
    # Constant images: the structure term is 1, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.3, 0.6, 0.01 ** 2
    assert bench.ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)) == pytest.approx(
        (2 * a * b + c1) / (a * a + b * b + c1))
    assert bench.ssim(x[None].repeat(2, 1, 1, 1), x[None].repeat(2, 1, 1, 1)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one shape"):
        bench.ssim(x, x[:, :-1])


def test_psnr_and_rel_l2():
    x = torch.full((3, 8, 8), 0.5)
    assert bench.psnr(x, x) == math.inf
    assert bench.psnr(x + 0.1, x) == pytest.approx(20.0)  # mse 0.01
    assert bench.psnr(x + 0.01, x) > bench.psnr(x + 0.1, x)
    assert bench.rel_l2(x, x) == 0.0
    assert bench.rel_l2(x * 1.1, x) == pytest.approx(0.1)


def test_parse_lora_argument():
    from pathlib import Path

    from dcaccel.lora import parse_lora_argument

    assert parse_lora_argument("loras/style.safetensors:0.8").path == Path("loras/style.safetensors")
    assert parse_lora_argument("loras/style.safetensors:0.8").scale == 0.8
    assert parse_lora_argument("style.safetensors").scale == 1.0
    assert parse_lora_argument("C:\\loras\\style.safetensors").path == Path("C:\\loras\\style.safetensors")


# -- the harness, end to end, on the tiny architecture -------------------------------------------------------------


@pytest.fixture(scope="module")
def matrix_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = _args(["--arch", "tiny", "--backends", "eager", "onnxruntime", "tensorrt", "--interval", "2",
                  "--branch", "0", "--steps", "4", "--repeats", "1", "--warmup", "0", "--out", str(out),
                  "--no-progress", "--quiet", "--threads", "1"])
    b = bench.Bench(args)
    records = b.run()
    return b, records, out


def _row(records, kind, backend, interval):
    [r] = [r for r in records if r["kind"] == kind and r["backend"] == backend and r.get("interval") == interval]
    return r


def test_matrix_writes_jsonl_markdown_and_plot(matrix_run):
    b, records, out = matrix_run
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert lines == records
    # written as measured (a run killed part-way keeps them): one warm-up line per configuration that ran, one
    # line per timed call
    partial = [json.loads(line) for line in (out / "partial.jsonl").read_text().splitlines()]
    ran = [r for r in records if r["status"] == "ok"]
    assert sorted(p["config"] for p in partial if p["phase"] == "warm-up") == sorted(r["label"] for r in ran)
    rounds = [p for p in partial if p["phase"] == "round"]
    assert len(rounds) == sum(r["timed_calls"] for r in ran) and all(p["denoiser_loop_s"] > 0 for p in rounds)
    labels = [r["label"] for r in records]
    assert labels == ["diffusers (no dcaccel)", "eager: no cache", "eager: interval 2, branch 0, uniform",
                      "reference DeepCacheSDHelper: interval 2, branch 0, uniform", "onnxruntime: no cache",
                      "onnxruntime: interval 2, branch 0, uniform", "tensorrt"]
    for r in records:
        assert r["weights"] == "random weights" and r["steps"] == 4 and r["height"] == r["width"] == 32
        assert {"platform", "cpu", "cores", "versions"} <= set(r["machine"])
        assert set(r["machine"]["versions"]) >= {"torch", "diffusers", "onnxruntime"}
    trt = _row(records, "dcaccel", "tensorrt", None)
    assert trt["status"].startswith("not run: ") and trt.get("denoiser_loop_median_s") is None
    for r in records:
        if r["status"] != "ok":
            continue
        for key in ("denoiser_loop_median_s", "denoiser_loop_p90_s", "pipeline_median_s", "pipeline_p90_s",
                    "full_step_median_s", "theoretical_speedup", "flops_full", "flops_shallow",
                    "speedup_loop_vs_eager", "speedup_pipeline_vs_eager"):
            assert r[key] is not None and r[key] > 0, (r["label"], key)
        assert r["memory_method"] and r["peak_mem_delta_mb"] is not None
    md = (out / "results.md").read_text()
    assert "random weights" in md and "machine:" in md and "## 4 steps" in md
    assert md.count("\n| ") == len(records) + 1
    assert "not run: TensorRT needs" in md or "not run: " in md
    assert (out / "results.png").is_file()
    unet = b.denoiser
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules()), "timing hooks removed"
    assert unet is b.pipe.unet, "every backend disabled again"


def test_matrix_fidelity_and_speed_fields(matrix_run):
    _, records, _ = matrix_run
    base = _row(records, "baseline", "diffusers", None)
    assert base["n_full"] == 4 and base["n_shallow"] == 0 and base.get("latent_rel_l2") is None
    eager0 = _row(records, "dcaccel", "eager", 1)
    assert eager0["fidelity_vs"] == "diffusers (no dcaccel)" and eager0["latent_rel_l2"] == 0.0
    assert eager0["images_identical"] and eager0["ssim"] == pytest.approx(1.0)
    assert eager0["theoretical_speedup"] == 1.0 and eager0["speedup_loop_vs_eager"] == 1.0
    ort0 = _row(records, "dcaccel", "onnxruntime", 1)
    assert ort0["latent_rel_l2"] < 1e-4 and ort0["build_seconds"] > 0
    for backend, kind in (("eager", "dcaccel"), ("onnxruntime", "dcaccel"), ("eager", "reference")):
        r = _row(records, kind, backend, 2)
        assert r["full_steps"] == [0, 2] and (r["n_full"], r["n_shallow"]) == (2, 2)
        assert r["theoretical_speedup"] > 1 and 0 < r["flops_shallow"] < r["flops_full"]
        f_full, f_shallow = r["flops_full"], r["flops_shallow"]
        assert r["theoretical_speedup"] == pytest.approx(4 * f_full / (2 * f_full + 2 * f_shallow))
        assert r["fidelity_vs"] == f"{backend}: no cache" and r["latent_rel_l2"] > 1e-4
        assert r["psnr_db"] > 0 and 0 < r["ssim"] < 1 and r["shallow_step_median_s"] > 0
        assert r["achieved_fraction"] == pytest.approx(r["speedup_loop_vs_own_no_cache"] / r["theoretical_speedup"])
    # The reference helper and dcaccel's eager graphs compute the same thing.
    ours, ref = _row(records, "dcaccel", "eager", 2), _row(records, "reference", "eager", 2)
    assert ours["latent_rel_l2"] == pytest.approx(ref["latent_rel_l2"], rel=1e-4)


@pytest.mark.slow  # 19 s
def test_sweep_recommends_a_setting_within_the_bound(tmp_path):
    args = _args(["--arch", "tiny", "--sweep", "--max-rel-l2", "0.05", "--interval", "2", "3", "--branch", "0",
                  "1", "--steps", "5", "--repeats", "1", "--out", str(tmp_path), "--no-progress", "--quiet",
                  "--threads", "1"])
    records = bench.run(args)
    rows = [r for r in records if r["kind"] == "dcaccel" and r.get("interval", 1) > 1]
    assert {r["backend"] for r in records if r["kind"] != "recommendation"} == {"diffusers", "eager"}
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert all(r["loras"] == [] for r in rows)
    for r in rows:
        inside = r["latent_rel_l2"] <= 0.05
        assert (r["not_timed"] is None) == inside and (r["denoiser_loop_median_s"] is not None) == inside
    [rec] = [r for r in records if r["kind"] == "recommendation"]
    saved = json.loads((tmp_path / "recommendation.json").read_text())
    assert saved == [rec] and rec["steps"] == 5 and rec["backend"] == "eager"
    within = [r for r in rows if r["latent_rel_l2"] <= 0.05]
    if within:
        assert rec["latent_rel_l2"] <= 0.05
        assert rec["denoiser_loop_median_s"] == min(r["denoiser_loop_median_s"] for r in within)
    else:
        assert rec["recommendation"].startswith("none of the tried settings")
    assert "Recommendation (sweep)" in (tmp_path / "results.md").read_text()
    # A bound nothing meets: say so.
    none = bench.recommend(records[:-1], _args(["--sweep", "--max-rel-l2", "1e-12"]))
    assert none[0]["recommendation"].startswith("none of the tried settings") and none[0]["within_bound"] == 0


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--sweep needs a fidelity bound"):
        bench.run(_args(["--sweep", "--out", str(tmp_path), "--quiet"]))
    with pytest.raises(ValueError, match="bounds for --sweep"):
        bench.run(_args(["--max-rel-l2", "0.1", "--out", str(tmp_path), "--quiet"]))
    with pytest.raises(ValueError, match=r"--branch \[12\] out of range: this U-Net has branches 0..11"):
        bench.run(_args(["--arch", "tiny", "--branch", "12", "--out", str(tmp_path), "--quiet"]))


@pytest.mark.slow  # 23 s
def test_sd3_matrix_with_cache_dit_beside_ours(tmp_path):
    """The SD 3 family in the harness: our rows, cache-dit's static DBCache with the same cut and schedule (equal
    latents), FLOPs of the transformer's graphs, and the interleaved timing fields."""
    pytest.importorskip("cache_dit")
    args = _args(["--arch", "tiny-sd3", "--backends", "eager", "onnxruntime", "--interval", "3", "--head-blocks",
                  "1", "--tail-blocks", "0", "1", "--steps", "6", "--repeats", "2", "--out", str(tmp_path),
                  "--no-progress", "--quiet", "--threads", "1", "--peers", "cache-dit"])
    records = bench.run(args)
    labels = [r["label"] for r in records]
    assert labels[:4] == ["diffusers (no dcaccel)", "eager: no cache", "eager: interval 3, head 1, tail 0, uniform",
                          "eager: interval 3, head 1, tail 1, uniform"]
    assert "cache-dit DBCache (static mask): interval 3, head 1, tail 1, uniform" in labels
    for r in records:
        assert r["status"] == "ok", (r["label"], r["status"])
        assert r["family"] == "mmdit" and r["timed_calls"] == 2 and r["interleaved"]
    peers = [r for r in records if r["kind"] == "reference"]
    assert len(peers) == 2 and all(r["latents_equal_eager"] for r in peers)
    for r in peers:
        assert r["full_steps"] == [0, 3] and (r["n_full"], r["n_shallow"]) == (2, 4)
        assert r["speedup_loop_vs_own_no_cache"] > 0 and r["fidelity_vs"] == "eager: no cache"
    cached = [r for r in records if r["kind"] == "dcaccel" and r["interval"] == 3]
    assert {(r["head_blocks"], r["tail_blocks"]) for r in cached} == {(1, 0), (1, 1)}
    for r in cached:
        assert 0 < r["flops_shallow_fraction"] < 1 and r["theoretical_speedup"] > 1
    h1t0 = next(r for r in cached if r["tail_blocks"] == 0 and r["backend"] == "eager")
    h1t1 = next(r for r in cached if r["tail_blocks"] == 1 and r["backend"] == "eager")
    assert h1t0["flops_shallow_fraction"] < h1t1["flops_shallow_fraction"]
    assert "cache-dit" in (tmp_path / "results.md").read_text()
