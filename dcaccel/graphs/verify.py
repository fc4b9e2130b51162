"""The one check of a runner against eager PyTorch, used by every build and by the tests.

The full graph is run on sample inputs by both; then the shallow graph, fed the eager full graph's cache by
both, so that each graph is judged on its own. Errors are reported per output; `check` raises if any element
is off by more than atol + rtol * |reference|.
"""

from __future__ import annotations

import torch

from .spec import GraphSpec, call_graph


def errors(ref: torch.Tensor, got: torch.Tensor, atol: float = 0.0, rtol: float = 0.0) -> dict:
    ref, got = ref.detach().double(), got.detach().to(ref.device).double()
    diff = (ref - got).abs()
    return {"max_abs": float(diff.max()),
            "max_rel": float((diff / ref.abs().clamp_min(1e-6)).max()),
            "rel_l2": float((ref - got).norm() / ref.norm().clamp_min(1e-12)),
            "within": bool((diff <= atol + rtol * ref.abs()).all())}


def compare(runner, graphs: dict[str, torch.nn.Module], specs: dict[str, GraphSpec], seed: int = 1,
            atol: float = 0.0, rtol: float = 0.0) -> dict[str, dict[str, dict]]:
    """{graph: {output: errors}} of `runner` against the eager `graphs` on the same sample inputs."""
    sample = specs["full"].sample_inputs(device=_device_of(graphs["full"]), seed=seed)
    out = {}
    with torch.no_grad():
        ref = call_graph(graphs["full"], specs["full"], sample)
        noise = runner.run_full(sample)
        got = {specs["full"].output_names[0]: noise, **{n: runner.cache[n] for n in specs["full"].cache}}
        out["full"] = {name: errors(ref[name], got[name], atol, rtol) for name in specs["full"].output_names}
        shallow_in = {t.name: sample[t.name] for t in specs["shallow"].call_inputs}
        for name in specs["shallow"].cache:
            runner.cache[name].copy_(ref[name])
        ref_shallow = call_graph(graphs["shallow"], specs["shallow"], {**shallow_in, **{n: ref[n] for n in
                                                                                      specs["shallow"].cache}})
        name = specs["shallow"].output_names[0]
        out["shallow"] = {name: errors(ref_shallow[name], runner.run_shallow(shallow_in), atol, rtol)}
    return out


def check(reached: dict[str, dict[str, dict]], atol: float, rtol: float, what: str) -> None:
    bad = {f"{g}.{o}": e for g, outs in reached.items() for o, e in outs.items() if not e["within"]}
    if bad:
        raise RuntimeError(f"{what} differs from eager PyTorch beyond atol={atol}, rtol={rtol}: {bad}")


def _device_of(module: torch.nn.Module):
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
