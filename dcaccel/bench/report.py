"""Fields derived across the records of one run, the sweep's recommendation, the Markdown tables and the plot."""

from __future__ import annotations

from pathlib import Path

from .timing import ratio


def _unique(xs):
    return list(dict.fromkeys(xs))


def cut_of(r: dict, short: bool = False) -> str:
    if r.get("head_blocks") is not None:
        return f"h{r['head_blocks']}t{r['tail_blocks']}" if short else \
            f"head {r['head_blocks']}, tail {r['tail_blocks']}"
    return f"b{r['branch']}" if short else f"branch {r['branch']}"


def derive_speedups(records: list[dict]) -> list[dict]:
    """Fill in the ratios between records of one run, per step count: speedup of the denoiser loop and of the
    pipeline call over eager's no-cache run, speedup of the loop over the same backend's no-cache run (eager's
    for the peers), and achieved = that speedup / theoretical. Returns `records`."""
    def key(r):
        return r["kind"], r["backend"], r.get("interval"), r["steps"]

    def own_backend(r):  # a peer (reference) is compared with eager's no-cache run
        return "eager" if r["kind"] == "reference" else r["backend"]

    by_key = {key(r): r for r in records if r.get("status") == "ok" and r.get("denoiser_loop_median_s") is not None}
    for r in records:
        if r.get("status") != "ok" or r.get("kind") == "recommendation":
            continue
        eager = by_key.get(("dcaccel", "eager", 1, r["steps"]))
        if eager is not None:
            r["speedup_loop_vs_eager"] = ratio(eager["denoiser_loop_median_s"], r.get("denoiser_loop_median_s"))
            r["speedup_pipeline_vs_eager"] = ratio(eager["pipeline_median_s"], r.get("pipeline_median_s"))
        if r["kind"] == "baseline" or r.get("interval") == 1:
            continue
        own = by_key.get(("dcaccel", own_backend(r), 1, r["steps"]))
        if own is not None and r.get("denoiser_loop_median_s") is not None:
            r["speedup_loop_vs_own_no_cache"] = ratio(own["denoiser_loop_median_s"], r["denoiser_loop_median_s"])
            if r.get("theoretical_speedup"):
                r["achieved_fraction"] = r["speedup_loop_vs_own_no_cache"] / r["theoretical_speedup"]
    return records


# ----------------------------------------------------------------------------------------------------------------
# Sweep recommendation


def recommend(records: list[dict], args) -> list[dict]:
    """Per backend and step count: the fastest (denoiser loop median) cached setting within the fidelity bound."""
    bound = {"max_rel_l2": args.max_rel_l2, "min_psnr_db": args.min_psnr}
    out = []
    groups = {}
    for r in records:
        if r["kind"] == "dcaccel" and r["status"] == "ok" and r.get("interval", 1) != 1:
            groups.setdefault((r["backend"], r["steps"]), []).append(r)
    for (backend, steps), rows in groups.items():
        def within(r):
            if r.get("latent_rel_l2") is None:
                return False
            if args.max_rel_l2 is not None and r["latent_rel_l2"] > args.max_rel_l2:
                return False
            if args.min_psnr is not None and not r.get("images_identical") and r["psnr_db"] < args.min_psnr:
                return False
            return True

        ok = [r for r in rows if within(r) and r.get("denoiser_loop_median_s") is not None]
        rec = {"kind": "recommendation", "model": rows[0]["model"], "weights": rows[0]["weights"],
               "backend": backend, "steps": steps, "height": rows[0]["height"], "width": rows[0]["width"],
               "scheduler": rows[0]["scheduler"], "bound": bound, "tried": len(rows), "within_bound": len(ok)}
        if ok:
            best = min(ok, key=lambda r: r["denoiser_loop_median_s"])
            rec.update({k: best.get(k) for k in (
                "interval", "branch", "head_blocks", "tail_blocks", "schedule", "denoiser_loop_median_s", "pipeline_median_s",
                "speedup_loop_vs_own_no_cache", "speedup_loop_vs_eager", "theoretical_speedup", "latent_rel_l2",
                "psnr_db", "ssim")})
            rec["recommendation"] = f"interval {best['interval']}, {cut_of(best)}, {best['schedule']}"
        else:
            rec["recommendation"] = "none of the tried settings stays within the bound: run without DeepCache"
        out.append(rec)
    return out


def _fmt(v, spec=".3f", none="-"):
    if v is None:
        return none
    return format(v, spec)


def _fmt_time(median, p90):
    return "-" if median is None else f"{median:.3f} ({p90:.3f})"


def markdown_table(records: list[dict], steps: int) -> str:
    head = ["configuration", "loop s median (p90)", "pipeline s median (p90)", "full step ms",
            "shallow step ms", "speedup vs eager loop / pipeline", "vs own no-cache", "theoretical", "achieved",
            "fidelity vs", "latent rel L2", "PSNR dB", "SSIM", "peak mem MiB: +delta (total)", "build s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if r.get("steps") != steps or r.get("kind") == "recommendation":
            continue
        ms = (lambda v: _fmt(v * 1e3 if v is not None else None, ".1f"))
        speed = "-" if r.get("speedup_loop_vs_eager") is None else (
            f"{r['speedup_loop_vs_eager']:.2f}x / {_fmt(r.get('speedup_pipeline_vs_eager'), '.2f')}x")
        psnr_txt = "inf" if r.get("images_identical") else _fmt(r.get("psnr_db"), ".2f")
        status = r["status"] if r["status"] != "ok" else (r.get("not_timed") or "ok")
        cells = [
            r["label"], _fmt_time(r.get("denoiser_loop_median_s"), r.get("denoiser_loop_p90_s")),
            _fmt_time(r.get("pipeline_median_s"), r.get("pipeline_p90_s")),
            ms(r.get("full_step_median_s")), ms(r.get("shallow_step_median_s")), speed,
            _fmt(r.get("speedup_loop_vs_own_no_cache"), ".2f") + ("x" if r.get("speedup_loop_vs_own_no_cache") else ""),
            _fmt(r.get("theoretical_speedup"), ".2f") + ("x" if r.get("theoretical_speedup") else ""),
            _fmt(r.get("achieved_fraction"), ".0%"), r.get("fidelity_vs", "-") if r["status"] == "ok" else "-",
            _fmt(r.get("latent_rel_l2"), ".2e"), psnr_txt, _fmt(r.get("ssim"), ".4f"),
            "-" if r.get("peak_mem_delta_mb") is None else
            f"+{r['peak_mem_delta_mb']:.1f} ({r['peak_mem_total_mb']:.0f})",
            _fmt(r.get("build_seconds"), ".1f"), status,
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def write_markdown(records: list[dict], path: Path, header: dict, recommendations: list[dict] | None = None) -> None:
    steps = _unique(r["steps"] for r in records if "steps" in r)
    parts = [
        "# dcaccel benchmark",
        "",
        f"- date: {header['date']}",
        f"- model: {header['model']}",
        f"- machine: {header['machine']}",
        f"- versions: {header['versions']}",
        f"- settings: {header['settings']}",
        f"- memory: {header['memory']}",
        "",
        "loop: the summed time of the denoiser (U-Net or transformer) evaluations of one call, timed by "
        "dcaccel's step loop or by forward hooks for diffusers and the peers; every configuration is warmed up "
        "by one untimed call, then timed once per round, rounds interleaved. Speedups divide medians measured in "
        "this run. theoretical: N*F_full / (n_full*F_full + n_shallow*F_shallow) from FLOP counts of the two "
        "graphs for the schedule that ran; achieved: the speedup over the same backend's no-cache run divided by "
        "it. Fidelity: against the row named in 'fidelity vs' (same seed), latents and decoded images. "
        "Build time is reported apart and never included in a timing. See benchmarks/README.md.",
    ]
    for n in steps:
        parts += ["", f"## {n} steps", "", markdown_table(records, n)]
    if recommendations:
        parts += ["", "## Recommendation (sweep)", ""]
        for rec in recommendations:
            extra = "" if rec.get("interval") is None else (
                f": loop {rec['denoiser_loop_median_s']:.3f} s, {rec['speedup_loop_vs_own_no_cache']:.2f}x over "
                f"{rec['backend']} without cache, latent rel L2 {rec['latent_rel_l2']:.3g}, PSNR "
                f"{_fmt(rec['psnr_db'], '.2f', 'inf')} dB")
            parts.append(f"- {rec['backend']}, {rec['steps']} steps, bound {_bound_text(rec['bound'])}: "
                         f"**{rec['recommendation']}**{extra} ({rec['within_bound']} of {rec['tried']} within)")
    path.write_text("\n".join(parts) + "\n")


def _bound_text(bound: dict) -> str:
    parts = []
    if bound.get("max_rel_l2") is not None:
        parts.append(f"latent rel L2 <= {bound['max_rel_l2']}")
    if bound.get("min_psnr_db") is not None:
        parts.append(f"PSNR >= {bound['min_psnr_db']} dB")
    return " and ".join(parts)


def write_plot(records: list[dict], path: Path, header: dict) -> str:
    """Speedup over eager's no-cache run against PSNR, one point per cached configuration. Returns a note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'dcaccel[bench]')"
    points = [r for r in records if r.get("status") == "ok" and r.get("psnr_db") is not None
              and r.get("speedup_loop_vs_eager") is not None and r.get("interval") not in (None, 1)]
    if not points:
        return "plot skipped: no cached configuration with both a speedup and a finite PSNR"
    several_steps = len({r["steps"] for r in points}) > 1
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"eager": "o", "torch_compile": "s", "onnxruntime": "^", "tensorrt": "D"}

    def series(r):
        return r["peer"] if r["kind"] == "reference" else r["backend"]

    for backend in _unique(series(r) for r in points):
        rows = [r for r in points if series(r) == backend]
        ax.scatter([r["psnr_db"] for r in rows], [r["speedup_loop_vs_eager"] for r in rows],
                   marker=markers.get(backend, "x"), label=backend)
        for r in rows:
            text = f"{backend} i{r['interval']} {cut_of(r, short=True)}" + (
                " nu" if r["schedule"] == "nonuniform" else "")
            text += f" {r['steps']}st" if several_steps else ""
            ax.annotate(text, (r["psnr_db"], r["speedup_loop_vs_eager"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.ticklabel_format(useOffset=False)
    lo, hi = min(r["psnr_db"] for r in points), max(r["psnr_db"] for r in points)
    ax.set_xlim(min(lo - 1, (lo + hi) / 2 - 5), max(hi + 1, (lo + hi) / 2 + 5))
    ax.set_xlabel("PSNR of decoded image vs the same backend without cache (dB)")
    ax.set_ylabel("denoiser loop speedup vs eager without cache")
    ax.set_title(f"{header['model'].split(' (')[0]}: speedup vs fidelity", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written: {path}"


