"""Calibrated schedules: which denoiser evaluations run the full graph, chosen offline per model against the
uncached output, and stored as an artifact that says what it is valid for.

How calibrate() searches (one model, scheduler, step count, guidance and cut at a time):
  1. Record (one pass over the calibration prompts, as uncached calls): every evaluation runs the full graph,
     so the call's output is the uncached one; the shallow graph is also run on the feature of each of the last
     `max_gap` evaluations, and the relative L2 distance of its noise prediction to the full graph's is the
     one-step error errors[i][j] of reusing step i's feature at step j (SmoothCache's error curves, LeMiCa's
     step graph). Cost: one uncached call plus max_gap shallow evaluations per step.
  2. Search (a pure function, best_schedules): for every budget K of full steps, the K-step schedule (step 0
     full) whose summed one-step errors are lowest, by dynamic programming over the step graph.
  3. Confirm (real calls, as the user will run them): every candidate runs the whole pipeline on the
     calibration prompts and seeds; its error is the relative L2 distance of its final latents to the uncached
     ones. Candidates per budget: the step-graph schedule, the uniform schedule where one has that many full
     steps, and `refine` rounds of local search (each full step moved by one evaluation, the best move kept);
     the lowest measured error wins. So the stored schedule is never worse, on the calibration set, than any
     candidate it was compared with.
The search is deterministic: the seed fixes the initial noise (image i uses seed + i), ties break towards the
earlier schedule.

The file (Calibration.save / Calibration.load) is JSON: what it is valid for (family, cut, the weights' sha256,
the scheduler's class and config, steps, evaluations, guidance, img2img strength), the prompts' count and sha256,
and per budget the full steps, their FLOP bound and the calibration error; plus the uniform schedules' errors
measured in the same run, the default budget (the fewest full steps whose error is at most that of the
family's default uniform schedule) and the search's cost. It carries its own sha256: an edited file is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .config import DeepCacheConfig, check_int, check_real

logger = logging.getLogger(__name__)

FORMAT = "dcaccel-calibration"
VERSION = 1
CHECKED_AT_ENABLE = ("family", "cut", "weights_sha256", "scheduler")
CHECKED_AT_CALL = ("num_evaluations", "guidance_scale")


class CalibrationMismatch(ValueError):
    """A calibration used where it was not made for (see Calibration.check_pipeline / check_call)."""


# -- the search on recorded errors: pure functions -------------------------------------------------------------------


def best_schedules(errors: np.ndarray, budgets, max_gap: int) -> dict[int, list[int]]:
    """For each budget K, the K full steps (0 among them) minimising the summed one-step errors: a cached step j
    after full step i costs errors[i][j], which must be finite (measured) for j - i <= max_gap.

    best_schedules(e, [2], 2) on 4 steps picks the second full step that splits the cached steps cheapest.
    Budgets that cannot be covered within max_gap are left out."""
    n = errors.shape[0]
    inf = math.inf
    # seg[i][m]: cost of full at i, cached i+1..m-1 (m = next full step or n)
    seg = np.full((n, n + 1), inf)
    for i in range(n):
        total = 0.0
        seg[i][i + 1] = 0.0
        for m in range(i + 2, min(n, i + max_gap + 1) + 1):
            e = errors[i][m - 1]
            if not np.isfinite(e):
                break
            total += float(e)
            seg[i][m] = total
    top = max(budgets) if budgets else 0
    # f[k][i]: cheapest cover of steps i..n-1 with k full steps, step i full; nxt[k][i]: the next full step
    f = np.full((top + 1, n + 1), inf)
    nxt = np.full((top + 1, n + 1), -1, dtype=np.int64)
    for i in range(n):
        f[1][i] = seg[i][n]
    for k in range(2, top + 1):
        for i in range(n - 1, -1, -1):
            best, arg = inf, -1
            for m in range(i + 1, min(n - 1, i + max_gap + 1) + 1):
                c = seg[i][m] + f[k - 1][m]
                if c < best - 1e-15:
                    best, arg = c, m
            f[k][i], nxt[k][i] = best, arg
    out = {}
    for k in budgets:
        if not np.isfinite(f[k][0]):
            continue
        steps, i = [0], 0
        for kk in range(k, 1, -1):
            i = int(nxt[kk][i])
            steps.append(i)
        out[k] = steps
    return out


def uniform_schedules(num_steps: int) -> dict[int, list[int]]:
    """{number of full steps: the uniform schedule with that many} for intervals 2..num_steps-1 (the first
    interval giving each count)."""
    out = {}
    for interval in range(2, num_steps):
        steps = list(range(0, num_steps, interval))
        out.setdefault(len(steps), steps)
    return out


def neighbours(steps: list[int], num_steps: int) -> list[list[int]]:
    """The schedules one move away: one full step (not 0) moved by one evaluation to a free place."""
    out, taken = [], set(steps)
    for s in steps[1:]:
        for d in (-1, 1):
            t = s + d
            if 0 < t < num_steps and t not in taken:
                out.append(sorted((taken - {s}) | {t}))
    return out


def flop_bound(num_steps: int, n_full: int, shallow_fraction: float) -> float:
    return num_steps / (n_full + (num_steps - n_full) * shallow_fraction)


# -- the artifact ------------------------------------------------------------------------------------------------


def _canonical(data) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


class Calibration:
    """A calibration file's contents (see the module docstring). Use dcaccel.calibrate to make one."""

    def __init__(self, data: dict, path: str | None = None):
        self.data, self.path = data, path

    # reading and writing
    @classmethod
    def load(cls, path) -> "Calibration":
        if isinstance(path, Calibration):
            return path
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"calibration must be a dcaccel.Calibration or the path of a calibration file, got "
                             f"{type(path).__name__}")
        p = Path(path)
        if p.is_dir():
            p = p / "calibration.json"
        if not p.is_file():
            raise FileNotFoundError(f"no calibration file at {p} (make one with `dcaccel calibrate ... --out FILE` "
                                    "or dcaccel.calibrate(...).save(FILE))")
        try:
            data = json.loads(p.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{p} is not a calibration file: not JSON ({e})") from None
        cal = cls(data, str(p))
        cal._check_structure()
        return cal

    def save(self, path) -> Path:
        """Write to a temporary name beside `path` and rename it into place (nothing partial is left)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in self.data.items() if k != "sha256"}
        data["sha256"] = hashlib.sha256(_canonical(data).encode()).hexdigest()
        tmp = p.with_name(f".{p.name}.partial-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)
        self.data, self.path = data, str(p)
        return p

    def _check_structure(self) -> None:
        d, where = self.data, self.path or "calibration"
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{where} is not a dcaccel calibration file (format {FORMAT!r} expected)")
        if d.get("version") != VERSION:
            raise ValueError(f"{where}: calibration format version {d.get('version')!r}; this dcaccel reads "
                             f"version {VERSION}: calibrate again")
        body = {k: v for k, v in d.items() if k != "sha256"}
        if d.get("sha256") != hashlib.sha256(_canonical(body).encode()).hexdigest():
            raise ValueError(f"{where}: the file does not match its own sha256 (edited or damaged after it was "
                             "written): calibrate again")
        try:
            valid = d["valid_for"]
            n = check_int("num_evaluations", valid["num_evaluations"], 1)
            for k, b in d["budgets"].items():
                steps = b["full_steps"]
                if int(k) != len(steps) or steps[0] != 0 or sorted(set(steps)) != steps or steps[-1] >= n:
                    raise ValueError(f"budget {k}: full steps {steps}")
                float(b["flop_bound"]), float(b["error"])
            for f in CHECKED_AT_ENABLE + CHECKED_AT_CALL:
                valid[f]
            if str(d["default_budget"]) not in d["budgets"]:
                raise ValueError(f"default budget {d['default_budget']} has no schedule")
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{where}: malformed calibration ({type(e).__name__}: {e}): calibrate again") from None

    def __eq__(self, other):
        return isinstance(other, Calibration) and self.data == other.data

    def __hash__(self):
        return hash(_canonical(self.data))

    def __repr__(self):
        v = self.valid_for
        return (f"Calibration({self.path or 'in memory'}: {v['family']} {v['cut']}, {v['num_evaluations']} "
                f"evaluations, guidance {v['guidance_scale']}, budgets {self.budgets()[0]}..{self.budgets()[-1]})")

    # what it holds
    @property
    def valid_for(self) -> dict:
        return self.data["valid_for"]

    @property
    def num_evaluations(self) -> int:
        return int(self.valid_for["num_evaluations"])

    @property
    def default_budget(self) -> int:
        return int(self.data["default_budget"])

    def budgets(self) -> list[int]:
        return sorted(int(k) for k in self.data["budgets"])

    def budget(self, k: int) -> dict:
        return self.data["budgets"][str(k)]

    def summary(self) -> dict:
        v = self.valid_for
        return {"path": self.path, "sha256": self.data.get("sha256"), "family": v["family"], "cut": v["cut"],
                "num_evaluations": v["num_evaluations"], "guidance_scale": v["guidance_scale"],
                "budgets": [self.budgets()[0], self.budgets()[-1]], "default_budget": self.default_budget}

    def choose_budget(self, num_full_steps: int | None = None, speedup: float | None = None) -> int:
        """num_full_steps as given; speedup: the budget with the most full steps whose FLOP bound is >= speedup;
        neither: the default budget."""
        if num_full_steps is not None:
            if str(num_full_steps) not in self.data["budgets"]:
                raise ValueError(f"num_full_steps must be one of the calibrated budgets {self.budgets()}, got "
                                 f"{num_full_steps}")
            return int(num_full_steps)
        if speedup is not None:
            ok = [k for k in self.budgets() if self.budget(k)["flop_bound"] >= speedup - 1e-9]
            if not ok:
                k = self.budgets()[0]
                raise ValueError(f"speedup {speedup:g} is beyond this calibration: its fastest budget ({k} full "
                                 f"steps) has a FLOP bound of {self.budget(k)['flop_bound']:.2f}x")
            return max(ok)
        return self.default_budget

    def full_steps_for(self, num_steps: int, num_full_steps: int | None = None, speedup: float | None = None,
                       fallback: bool = False) -> list[int]:
        """The calibrated full steps for a call of `num_steps` evaluations. Another step count is refused unless
        `fallback`: then the steps are rescaled (step s -> round(s * num_steps / calibrated steps))."""
        steps = self.budget(self.choose_budget(num_full_steps, speedup))["full_steps"]
        n = self.num_evaluations
        if num_steps == n:
            return list(steps)
        if not fallback:
            raise CalibrationMismatch(
                f"this call runs {num_steps} denoiser evaluations; the calibration {self.path or ''} was made for "
                f"{n} (num_inference_steps {self.valid_for['num_inference_steps']}"
                + (f", strength {self.valid_for['strength']}" if self.valid_for.get("strength") is not None else "")
                + "): call with those steps, calibrate for this step count, or pass calibration_fallback=True "
                  "(the calibrated steps rescaled)")
        return sorted({0} | {min(num_steps - 1, round(s * num_steps / n)) for s in steps})

    def expected_fields(self, pipe, family, model, cut: dict) -> dict:
        """What this pipeline would record (the fields checked at enable)."""
        from .engines import weights_hash

        return {"family": family.name, "cut": dict(cut), "weights_sha256": weights_hash(model),
                "scheduler": scheduler_record(pipe.scheduler)}

    def differences(self, expected: dict) -> list[str]:
        out = []
        for field, want in expected.items():
            have = self.valid_for.get(field)
            if field == "scheduler" and isinstance(have, dict):
                if have.get("class") != want["class"]:
                    out.append(f"scheduler.class: calibration has {have.get('class')}, pipeline has {want['class']}")
                hc, wc = have.get("config", {}), want["config"]
                for k in sorted(set(hc) | set(wc)):
                    if hc.get(k, "<absent>") != wc.get(k, "<absent>"):
                        out.append(f"scheduler.config.{k}: calibration has {_canonical(hc.get(k, '<absent>'))}, "
                                   f"pipeline has {_canonical(wc.get(k, '<absent>'))}")
            elif have != want:
                out.append(f"{field}: calibration has {_canonical(have)}, pipeline has {_canonical(want)}")
        return out

    def check_pipeline(self, pipe, family, model, cut: dict, fallback: bool = False) -> list[str]:
        """Refuse (CalibrationMismatch naming every differing field) a pipeline this calibration was not made
        for; with `fallback`, warn and return the differences instead."""
        diffs = self.differences(self.expected_fields(pipe, family, model, cut))
        if diffs and not fallback:
            raise CalibrationMismatch(
                f"calibration {self.path or '(in memory)'} was made for something else and is refused:\n  "
                + "\n  ".join(diffs) + "\ncalibrate this pipeline (dcaccel calibrate / dcaccel.calibrate), or pass "
                "calibration_fallback=True to use it anyway")
        if diffs:
            logger.warning("calibration %s used with calibration_fallback although: %s", self.path, "; ".join(diffs))
        return diffs

    def check_call(self, num_evaluations: int, guidance_scale, fallback: bool = False) -> list[str]:
        diffs = []
        if num_evaluations != self.num_evaluations:
            diffs.append(f"num_evaluations: calibration has {self.num_evaluations}, this call runs {num_evaluations}")
        want = self.valid_for["guidance_scale"]
        if guidance_scale is not None and want is not None and not math.isclose(float(guidance_scale), want):
            diffs.append(f"guidance_scale: calibration has {want}, this call uses {guidance_scale}")
        if diffs and not fallback:
            raise CalibrationMismatch(
                f"calibration {self.path or '(in memory)'} does not fit this call:\n  " + "\n  ".join(diffs)
                + "\ncall with the calibrated settings, calibrate for these, or pass calibration_fallback=True "
                  "(the calibrated steps rescaled to the call's evaluations)")
        if diffs:
            logger.info("calibration fallback: %s", "; ".join(diffs))
        return diffs

    def table(self) -> str:
        """A text table of the budgets: full steps, FLOP bound, error, and the uniform schedule beside it."""
        uniform = self.data.get("uniform", {})
        lines = [f"{'full':>4}  {'FLOP bound':>10}  {'error':>8}  {'uniform error':>13}  full steps"]
        for k in self.budgets():
            b = self.budget(k)
            u = uniform.get(str(k))
            mark = " (default)" if k == self.default_budget else ""
            lines.append(f"{k:>4}  {b['flop_bound']:>9.2f}x  {b['error']:>8.4f}  "
                         f"{'' if u is None else format(u['error'], '.4f'):>13}  {b['full_steps']}{mark}")
        return "\n".join(lines)


def scheduler_record(scheduler) -> dict:
    from .families.base import normalized_config

    return {"class": type(scheduler).__name__, "config": normalized_config(dict(scheduler.config))}


def prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


# -- running it ----------------------------------------------------------------------------------------------------


class _Runs:
    """Runs the pipeline on the calibration prompts under a policy; counts the cost."""

    def __init__(self, pipe, prompts, steps, guidance, seed, batch, call_kwargs, wrapper, shallow_fraction,
                 objective):
        self.objective = objective
        self.pipe, self.prompts, self.steps, self.guidance = pipe, prompts, steps, guidance
        self.seed, self.batch, self.call_kwargs, self.wrapper = seed, batch, call_kwargs, wrapper
        self.shallow_fraction = shallow_fraction
        self.full_evals = self.shallow_evals = 0
        self.calls = 0

    def __call__(self, policy) -> torch.Tensor:
        self.wrapper.policy = policy
        out = []
        for start in range(0, len(self.prompts), self.batch):
            chunk = self.prompts[start:start + self.batch]
            gens = [torch.Generator().manual_seed(self.seed + start + i) for i in range(len(chunk))]
            output = self.pipe(prompt=chunk, num_inference_steps=self.steps, guidance_scale=self.guidance,
                               generator=gens, output_type="pt" if self.objective == "image" else "latent",
                               **self.call_kwargs).images
            out.append(output.detach().float().cpu())
            st = self.wrapper.stats
            self.full_evals += len(st.full_steps)
            self.shallow_evals += len(st.shallow_steps)
            self.calls += 1
        return torch.cat(out)


OBJECTIVES = {
    "image": "mean over the calibration images of the RMSE of the decoded image (pixels in [0, 1]) to the "
             "uncached one",
    "latent": "mean over the calibration images of ||final latents - uncached final latents|| / ||uncached final "
              "latents||",
}


def latent_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of ||latents - reference|| / ||reference|| (objective 'latent')."""
    a, b = latents.flatten(1), reference.flatten(1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)).mean())


def image_error(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of the RMSE between decoded images in [0, 1] (objective 'image'; a per-image PSNR is
    -20 log10 of it)."""
    return float((images - reference).flatten(1).pow(2).mean(1).sqrt().mean())


def output_error(objective: str, output: torch.Tensor, reference: torch.Tensor) -> float:
    return image_error(output, reference) if objective == "image" else latent_error(output, reference)


def calibrate(pipe, prompts, num_inference_steps: int = 20, guidance_scale: float = 4.0,
              config: DeepCacheConfig | None = None, seed: int = 0, *, batch_size: int | None = None,
              max_gap: int | None = None, budgets=None, refine: int = 0, sensitivity: bool = True,
              objective: str = "latent", progress=None, **call_kwargs) -> Calibration:
    """Calibrate the full-step schedule of `pipe` (see the module docstring) for the cut in `config` (its
    schedule fields are ignored), `num_inference_steps`, `guidance_scale` and any further pipeline call
    arguments (`strength=` and `image=` for img2img, a ControlNet's `image=`, ...), on `prompts` (image i uses
    the generator seeded `seed + i`). Returns the Calibration; `.save(path)` writes it.

    batch_size: prompts per pipeline call (default all); max_gap: the longest run of cached steps measured and
    allowed (default ceil(evaluations / 2), so every budget from 2 full steps up can be placed); budgets:
    numbers of full steps (default 2 .. evaluations - 1); refine: rounds of local search per budget (each costs
    about 2 x budget real calls); progress: called with a line of text after every real call."""
    from . import pipeline as dc
    from .families import family_of_pipeline

    if dc.is_enabled(pipe):
        raise RuntimeError("dcaccel.calibrate runs on a plain pipeline: dcaccel.disable(pipe) first")
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    prompts = list(prompts)
    steps = check_int("num_inference_steps", num_inference_steps, 2)
    guidance = check_real("guidance_scale", guidance_scale, 0.0, 100.0)
    seed = check_int("seed", seed, 0)
    batch = len(prompts) if batch_size is None else check_int("batch_size", batch_size, 1)
    refine = check_int("refine", refine, 0, 10)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {sorted(OBJECTIVES)}")
    config = config or DeepCacheConfig()
    if not isinstance(config, DeepCacheConfig):
        raise TypeError(f"config must be a dcaccel.DeepCacheConfig, got {type(config).__name__}")
    family = family_of_pipeline(pipe)
    model = family.denoiser(pipe)
    family.check(model)
    cut = family.resolve_cut(model, family.resolve_config(config))
    say = progress or (lambda text: None)
    started = time.perf_counter()
    record_cfg = DeepCacheConfig(interval=1, **{"cut_controlnet": config.cut_controlnet, **cut})
    dc.enable(pipe, record_cfg, "eager")
    try:
        state = dc.enabled_state(pipe)
        wrapper = state.wrapper
        fraction, flop_method = _shallow_fraction(pipe, family, model, cut, guidance, call_kwargs)
        runs = _Runs(pipe, prompts, steps, guidance, seed, batch, call_kwargs, wrapper, fraction, objective)
        # 1. record the uncached trajectory and the one-step errors
        recorder = _LazyRecorder(max_gap)
        reference = runs(recorder)
        n = recorder.num_steps
        gap = recorder.max_gap
        with np.errstate(invalid="ignore", divide="ignore"):
            errors = (recorder.policy.errors / recorder.policy.counts).numpy()
        errors[~np.isfinite(errors)] = np.inf
        shallow_record = recorder.policy.shallow_calls
        runs.shallow_evals += shallow_record
        say(f"recorded {n} evaluations x {len(prompts)} prompts (+{shallow_record} shallow evaluations) "
            f"in {time.perf_counter() - started:.1f} s")
        wanted = list(range(2, n)) if budgets is None else sorted({check_int("budget", b, 2, n - 1) for b in budgets})
        if not wanted:
            raise ValueError(f"no budget to calibrate: {n} evaluations leave none between 2 and {n - 1} full steps")
        measured: dict[tuple, float] = {}

        def measure(steps_: list[int]) -> float:
            key = tuple(steps_)
            if key not in measured:
                cfg = DeepCacheConfig(schedule="explicit", full_steps=steps_, **cut)
                from .policies import StaticPolicy

                measured[key] = output_error(objective, runs(StaticPolicy(cfg)), reference)
                say(f"real call {len(measured)}: {len(steps_)} full steps {steps_}: error {measured[key]:.4f}")
            return measured[key]

        # 2. how much a one-step error at each step moves the final output: cache that step alone
        weights = np.ones(n)
        if sensitivity:
            for j in range(1, n):
                alone = measure([i for i in range(n) if i != j])
                weights[j] = alone / errors[j - 1][j] if np.isfinite(errors[j - 1][j]) and errors[j - 1][j] > 0 \
                    else 1.0
        # 3. search on the recorded errors, weighted
        graph = best_schedules(errors * weights[None, :], wanted, gap)
        uniform = uniform_schedules(n)

        # 4. confirm with real calls
        chosen = {}
        for k in wanted:
            candidates = [s for s in (graph.get(k), uniform.get(k)) if s is not None]
            if not candidates:  # max_gap too small to place k full steps
                continue
            best = min(candidates, key=measure)
            for _ in range(refine):
                around = neighbours(best, n)
                if not around:
                    break
                move = min(around, key=measure)
                if measure(move) >= measure(best):
                    break
                best = move
            chosen[k] = best
        if not chosen:
            raise ValueError(f"max_gap {gap} cannot place any of the budgets {wanted} in {n} evaluations: raise it")
        uniform_errors = {k: measure(s) for k, s in uniform.items()}
    finally:
        dc.disable(pipe)
    seconds = time.perf_counter() - started
    default_interval = family.resolve_config(DeepCacheConfig()).interval
    default_uniform = list(range(0, n, default_interval))
    default_error = measured.get(tuple(default_uniform))
    if default_error is None and len(default_uniform) < n:
        default_error = uniform_errors.get(len(default_uniform))
    ok = [k for k in chosen if default_error is not None and measured[tuple(chosen[k])] <= default_error]
    default_budget = min(ok) if ok else min(chosen, key=lambda k: abs(k - len(default_uniform)))
    # one uncached pass over the prompts: n full evaluations per batch
    uncached_calls = (runs.full_evals + runs.shallow_evals * fraction) / (n * math.ceil(len(prompts) / batch))
    data = {
        "format": FORMAT, "version": VERSION,
        "valid_for": {
            **{k: v for k, v in (("family", family.name), ("cut", dict(cut)))},
            "weights_sha256": _weights_sha(model),
            "scheduler": scheduler_record(pipe.scheduler),
            "pipeline": type(pipe).__name__,
            "num_inference_steps": steps, "num_evaluations": n, "guidance_scale": guidance,
            "strength": call_kwargs.get("strength"),
        },
        "prompts": {"count": len(prompts), "sha256": prompts_sha256(prompts)},
        "seed": seed,
        "objective": objective, "error_metric": OBJECTIVES[objective],
        "shallow_fraction": fraction, "shallow_fraction_method": flop_method,
        "budgets": {str(k): {"full_steps": s, "flop_bound": flop_bound(n, k, fraction),
                             "error": measured[tuple(s)]} for k, s in sorted(chosen.items())},
        "uniform": {str(k): {"full_steps": s, "error": uniform_errors[k]} for k, s in sorted(uniform.items())},
        "default_budget": default_budget,
        "default_rule": f"the fewest full steps whose error is <= that of the family's default uniform schedule "
                        f"(interval {default_interval}: {default_error if default_error is None else round(default_error, 5)})",
        "search": {
            "method": "step-graph dynamic programming on recorded one-step errors, candidates confirmed by real "
                      f"calls, {refine} round(s) of local search per budget",
            "max_gap": gap, "refine": refine, "real_calls": runs.calls, "batch_size": batch,
            "full_evaluations": runs.full_evals, "shallow_evaluations": runs.shallow_evals,
            "uncached_call_equivalents": round(uncached_calls, 2),
        },
        # what differs between two runs of the same calibration (everything else is the same, seed for seed)
        "run": {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": round(seconds, 2),
                "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype),
                "torch": torch.__version__},
    }
    body = copy.deepcopy(data)
    body["sha256"] = hashlib.sha256(_canonical(body).encode()).hexdigest()
    cal = Calibration(json.loads(_canonical(body)))
    cal._check_structure()
    return cal


def _weights_sha(model) -> str:
    from .engines import weights_hash

    return weights_hash(model)


class _LazyRecorder:
    """A RecordPolicy made at the first call, when the number of evaluations is known."""

    name = "record"

    def __init__(self, max_gap: int | None):
        self.requested_gap = max_gap
        self.policy = None

    def begin(self, num_steps: int) -> None:
        if self.policy is None:
            from .policies import RecordPolicy

            gap = math.ceil(num_steps / 2) if self.requested_gap is None else self.requested_gap
            gap = check_int("max_gap", gap, 1, max(1, num_steps - 1))
            self.policy = RecordPolicy(num_steps, gap)
        self.policy.begin(num_steps)

    @property
    def num_steps(self) -> int:
        return self.policy.num_steps

    @property
    def max_gap(self) -> int:
        return self.policy.max_gap

    def run(self, step, inputs, runner):
        return self.policy.run(step, inputs, runner)


def _shallow_fraction(pipe, family, model, cut, guidance, call_kwargs) -> tuple[float, str]:
    """FLOPs of a shallow call over those of a full call at the calibration's shapes."""
    from .bench.flops import graph_flops
    from .config import BuildConfig
    from .models import default_resolution

    size = default_resolution(pipe)
    height, width = call_kwargs.get("height") or size, call_kwargs.get("width") or size
    try:
        build = BuildConfig(height=height, width=width, batch_size=1, cfg=guidance > 1, backend="onnxruntime",
                            **cut)
        counts = graph_flops(family, model, cut, build, family.geometry(pipe))
        return counts["shallow"] / counts["full"], f"FLOPs at {height}x{width} ({counts['method']})"
    except Exception as e:  # noqa: BLE001 - the bound is informative; a failed count must not stop calibration
        logger.warning("could not count FLOPs of the split graphs (%s): FLOP bounds assume a free shallow step", e)
        return 0.0, f"not counted ({type(e).__name__}: {e})"
