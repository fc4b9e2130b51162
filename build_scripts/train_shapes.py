#!/usr/bin/env python
"""Train the shapes model on CPU: VAE, then the scorer, then the U-Net with its text encoder; export a diffusers
pipeline directory (fp16 weights, loads with `from_pretrained`) plus the scorer.

Resumable: every stage checkpoints into --work-dir (written to a temporary name and renamed) and a rerun picks up
where the last one stopped; a finished stage is skipped. Runs once on a developer machine (41 minutes for all
three stages on two idle cores, the U-Net at about 0.55 s a step); CI never trains.

The shipped weights came from a staged run whose early U-Net settings differ (see their shapes.json). These
defaults, run from scratch, match the shipped model's prompt accuracy but not its FID (27.4 against 9.85):
benchmarks/results/2026-11-25-shapes-repro/README.md. So the export goes to .train/shapes-out unless --out says
otherwise, and the shipped model is replaced only on request.

    python build_scripts/train_shapes.py                      # all stages, then export to .train/shapes-out
    python build_scripts/train_shapes.py --unet-steps 6000    # continue the U-Net for longer
    python benchmarks/quality.py --model .train/shapes-out --scorer shapes   # compare it with the shipped model
    python build_scripts/train_shapes.py --out dcaccel/weights/shapes        # replace the shipped model
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dcaccel.shapes import data, model as shapes_model, score  # noqa: E402

NUM_TRAIN_IMAGES = 108 * 120  # 120 renderings of each training scene
NUM_REAL_EVAL = 1200          # held-out real images (new seed, every scene) for the scorer and the FID reference


def log(work: Path, **record):
    record["time"] = round(time.time(), 1)
    print(json.dumps(record), flush=True)
    with open(work / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def save_atomic(obj, path: Path):
    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Stage:
    """A resumable loop: modules, optimiser, step and RNG state, saved by the caller every so many steps and at
    the end. `inputs` names what the stage was trained on (image count, VAE steps): resuming on other inputs is
    refused rather than mixing them. `schedule_steps` is the step count the learning-rate schedule was planned
    for at the start; continuing past it (a larger --*-steps on a rerun) keeps the final learning rate."""

    def __init__(self, work: Path, name: str, modules: dict, optimiser, total: int, inputs: dict | None = None):
        self.path, self.name, self.modules, self.opt, self.total = work / f"{name}.pt", name, modules, optimiser, total
        self.inputs = inputs or {}
        self.step, self.schedule_steps, self.resumed_from = 0, total, None
        if self.path.exists():
            ckpt = torch.load(self.path, weights_only=False)
            saved_inputs = ckpt.get("inputs", {})  # keys a checkpoint predates are not compared
            differ = {k: (v, self.inputs.get(k)) for k, v in saved_inputs.items() if v != self.inputs.get(k)}
            if differ:
                raise SystemExit(f"{self.path} was trained on other inputs (saved, this run): {differ}; "
                                 f"use the same options or another --work-dir")
            for key, m in modules.items():
                m.load_state_dict(ckpt["modules"][key])
            optimiser.load_state_dict(ckpt["optimiser"])
            self.step = self.resumed_from = ckpt["step"]
            self.schedule_steps = ckpt.get("schedule_steps", total)
            torch.set_rng_state(ckpt["rng"])
            log(work, stage=name, resumed_from=self.step)

    @property
    def done(self) -> bool:
        return self.step >= self.total

    def lr(self, peak: float, warmup: int) -> float:
        return lr_at(self.step, self.schedule_steps, peak, warmup)

    def optimise(self, loss, peak: float, warmup: int, clip: float | None = None):
        """One optimiser step on `loss` at the scheduled learning rate."""
        for g in self.opt.param_groups:
            g["lr"] = self.lr(peak, warmup)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], clip)
        self.opt.step()
        self.step += 1

    def save(self):
        save_atomic({"modules": {k: m.state_dict() for k, m in self.modules.items()},
                     "optimiser": self.opt.state_dict(), "step": self.step, "rng": torch.get_rng_state(),
                     "schedule_steps": self.schedule_steps, "inputs": self.inputs}, self.path)


def train_vae(work: Path, images: torch.Tensor, real: torch.Tensor, steps: int, batch: int):
    vae = shapes_model.build_components()["vae"]
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    stage = Stage(work, "vae", {"vae": vae}, opt, steps, {"num_images": len(images)})
    vae.train()
    while not stage.done:
        x = images[torch.randint(len(images), (batch,))]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * kl
        stage.optimise(loss, 1e-3, 100)
        if stage.step % 100 == 0 or stage.done:
            stage.save()
            vae.eval()
            with torch.no_grad():
                recon = vae.decode(vae.encode(real[:256]).latent_dist.mode()).sample.clamp(-1, 1)
                p = score.psnr(recon, real[:256])
            vae.train()
            log(work, stage="vae", step=stage.step, loss=round(loss.item(), 5), psnr=round(p, 2))
    return vae.eval(), stage.step


@torch.no_grad()
def encode_latents(work: Path, vae, images: torch.Tensor, vae_steps: int) -> tuple[torch.Tensor, float]:
    """The training images encoded once (distribution means, scaled to unit variance); reused while the images
    and the VAE are those they were encoded from, encoded again otherwise."""
    path = work / "latents.pt"
    if path.exists():
        saved = torch.load(path)
        if len(saved["latents"]) == len(images) and saved.get("vae_steps", vae_steps) == vae_steps:
            return saved["latents"], saved["scaling_factor"]
    latents = torch.cat([vae.encode(c).latent_dist.mode() for c in images.split(256)])
    scaling = float(1 / latents.std())
    save_atomic({"latents": latents * scaling, "scaling_factor": scaling, "vae_steps": vae_steps}, path)
    log(work, stage="latents", n=len(latents), scaling_factor=scaling)
    return latents * scaling, scaling


def augment(x: torch.Tensor) -> torch.Tensor:
    """Light noise and blur, so that the scorer reads decoded and generated images, not only crisp renders."""
    if torch.rand(()) < 0.5:
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1) * 0.5 + x * 0.5
    return (x + 0.05 * torch.rand(len(x), 1, 1, 1) * torch.randn_like(x)).clamp(-1, 1)


def train_scorer(work: Path, images, labels, real, real_scenes, steps: int, batch: int):
    scorer = shapes_model.Scorer()
    opt = torch.optim.AdamW(scorer.parameters(), lr=2e-3, weight_decay=1e-4)
    stage = Stage(work, "scorer", {"scorer": scorer}, opt, steps, {"num_images": len(images)})
    scorer.train()
    while not stage.done:
        idx = torch.randint(len(images), (batch,))
        logits = scorer(augment(images[idx]))
        loss = sum(F.cross_entropy(logits[k], labels[k][idx]) for k in logits)
        stage.optimise(loss, 2e-3, 50)
        if stage.step % 100 == 0 or stage.done:
            stage.save()
            scorer.eval()
            acc = score.accuracy(scorer, real, real_scenes)
            scorer.train()
            log(work, stage="scorer", step=stage.step, loss=round(loss.item(), 4), real_accuracy=acc)
    return scorer.eval()


def make_pipeline(comps: dict, unet, text_encoder, vae, scaling: float):
    from diffusers import StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scaling)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=comps["tokenizer"], unet=unet,
                                   scheduler=comps["scheduler"], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_unet(work: Path, vae, scaling: float, latents, scenes, scorer, steps: int, batch: int, lr: float,
               eval_every: int = 1000, vae_steps: int = 0, eval_scenes: int = 60, ema_decay: float = 0.995,
               reset_ema: bool = False):
    from diffusers import DDPMScheduler

    comps = shapes_model.build_components(seed=1)
    unet, text_encoder, tokenizer = comps["unet"], comps["text_encoder"], comps["tokenizer"]
    ema = {"unet": copy.deepcopy(unet), "text_encoder": copy.deepcopy(text_encoder)}
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    stage = Stage(work, "unet", {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema["unet"],
                                 "ema_text_encoder": ema["text_encoder"]}, opt, steps,
                  {"num_images": len(latents), "vae_steps": vae_steps,
                   "prediction_type": shapes_model.SCHEDULER_CONFIG["prediction_type"]})
    if reset_ema:  # after a change of objective the average of the old weights is of no use
        for key, live in (("unet", unet), ("text_encoder", text_encoder)):
            ema[key].load_state_dict(live.state_dict())
        log(work, stage="unet", reset_ema_at=stage.step)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in shapes_model.SCHEDULER_CONFIG.items()
                                       if k not in ("set_alpha_to_one", "steps_offset")})
    captions = sorted({s.caption for s in scenes})
    caption_index = {c: i for i, c in enumerate(captions)}
    ids = tokenizer(captions + [""], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    empty = len(captions)
    scene_ids = torch.tensor([caption_index[s.caption] for s in scenes])
    eval_scenes = data.all_scenes()[::2][:eval_scenes]
    unet.train(), text_encoder.train()
    t0 = time.time()
    while not stage.done:
        idx = torch.randint(len(latents), (batch,))
        tokens = ids[torch.where(torch.rand(batch) < 0.1, empty, scene_ids[idx])]  # 10% unconditional, for CFG
        x0 = latents[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,))
        xt = noise_scheduler.add_noise(x0, noise, t)
        pred = unet(xt, t, text_encoder(tokens)[0]).sample
        # v-prediction, unweighted: at high noise this is a loss on the predicted image, where the prompt decides
        # where the shape goes (an epsilon loss gives that decision a weight of about alpha_bar, i.e. none)
        loss = F.mse_loss(pred, noise_scheduler.get_velocity(x0, noise, t))
        stage.optimise(loss, lr, 200, clip=1.0)
        decay = min(ema_decay, (1 + stage.step) / (10 + stage.step))
        with torch.no_grad():
            for key, live in (("unet", unet), ("text_encoder", text_encoder)):
                for e, p in zip(ema[key].parameters(), live.parameters()):
                    e.lerp_(p, 1 - decay)
        if stage.step % 50 == 0:
            log(work, stage="unet", step=stage.step, loss=round(loss.item(), 4),
                seconds_per_step=round((time.time() - t0) / 50, 3))
            t0 = time.time()
        if stage.step % 250 == 0 or stage.done:
            stage.save()
        if stage.step % eval_every == 0 or stage.done:
            pipe = make_pipeline(comps, ema["unet"].eval(), ema["text_encoder"].eval(), vae, scaling)
            acc = score.accuracy(scorer, score.pipeline_images(pipe, eval_scenes, seed=0), eval_scenes)
            log(work, stage="unet-eval", step=stage.step, prompt_accuracy=acc)
            t0 = time.time()
    return comps, ema["unet"].eval(), ema["text_encoder"].eval(), stage.step


def export(out: Path, pipe, scorer, metadata: dict):
    """Write the pipeline (fp16 weights), the scorer (unless None) and shapes.json to a temporary directory, then
    rename it to `out`."""
    import shutil

    from safetensors.torch import save_file

    partial, old = out.with_name(out.name + ".partial"), out.with_name(out.name + ".old")
    for stale in (partial, old):
        if stale.exists():
            shutil.rmtree(stale)
    pipe.to(torch.float16).save_pretrained(partial, safe_serialization=True)
    pipe.to(torch.float32)
    if scorer is not None:
        (partial / "scorer").mkdir()
        save_file({k: v.to(torch.float16).contiguous() for k, v in scorer.state_dict().items()},
                  partial / "scorer" / "model.safetensors")
    (partial / "shapes.json").write_text(json.dumps(metadata, indent=1) + "\n")
    if out.exists():  # moved aside, not deleted, until the new directory is in place
        os.replace(out, old)
    os.replace(partial, out)
    if old.exists():
        shutil.rmtree(old)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=REPO / ".train" / "shapes")
    p.add_argument("--out", type=Path, default=REPO / ".train" / "shapes-out",
                   help="the exported pipeline directory (default %(default)s; the shipped model is "
                        "dcaccel/weights/shapes)")
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--scorer-steps", type=int, default=1000)
    p.add_argument("--unet-steps", type=int, default=3500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--num-images", type=int, default=NUM_TRAIN_IMAGES, help="training images (default %(default)s)")
    p.add_argument("--real-images", type=int, default=NUM_REAL_EVAL, help="held-out real images for checks")
    p.add_argument("--eval-every", type=int, default=1000, help="U-Net steps between prompt-accuracy checks")
    p.add_argument("--eval-scenes", type=int, default=60, help="prompts in each check (default 60)")
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--reset-ema", action="store_true", help="restart the U-Net's EMA from its live weights")
    p.add_argument("--note", default="", help="free text recorded in shapes.json (e.g. how a run was resumed)")
    p.add_argument("--stop-after", choices=["vae", "scorer", "unet"], help="stop after this stage (no export)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    train_np, train_scenes = data.make_dataset(args.num_images, seed=0)
    real_np, real_scenes = data.make_dataset(args.real_images, seed=1, scenes=data.all_scenes())
    images, real = data.to_tensor(train_np), data.to_tensor(real_np)

    vae, vae_steps = train_vae(args.work_dir, images, real, args.vae_steps, args.batch)
    if args.stop_after == "vae":
        return
    latents, scaling = encode_latents(args.work_dir, vae, images, vae_steps)
    scorer = train_scorer(args.work_dir, images, data.labels_tensor(train_scenes), real, real_scenes,
                          args.scorer_steps, 128)
    if args.stop_after == "scorer":
        return
    comps, unet, text_encoder, unet_steps = train_unet(args.work_dir, vae, scaling, latents, train_scenes, scorer,
                                                       args.unet_steps, args.batch, args.lr, args.eval_every,
                                                       vae_steps, args.eval_scenes, args.ema_decay,
                                                       args.reset_ema)
    if args.stop_after == "unet":
        return
    pipe = make_pipeline(comps, unet, text_encoder, vae, scaling)
    with torch.no_grad():
        recon = vae.decode(vae.encode(real).latent_dist.mode()).sample.clamp(-1, 1)
    metadata = {
        "trained_on": "build_scripts/train_shapes.py: %d images of %d scenes (seed 0); held-out scenes: %s"
                      % (args.num_images, len(data.training_scenes()), [s.caption for s in data.held_out_scenes()]),
        "steps": {"vae": vae_steps, "scorer": args.scorer_steps, "unet": unet_steps},
        "batch": args.batch, "lr": args.lr, "ema_decay": args.ema_decay, "note": args.note,
        "scheduler": {k: shapes_model.SCHEDULER_CONFIG[k] for k in ("beta_schedule", "beta_start", "beta_end",
                                                                   "prediction_type")},
        "vae_psnr_db": round(score.psnr(recon, real), 2),
        "scorer_accuracy_real": score.accuracy(scorer, real, real_scenes),
        "scorer_accuracy_vae_reconstructions": score.accuracy(scorer, recon, real_scenes),
    }
    export(args.out, pipe, scorer, metadata)
    log(args.work_dir, stage="export", out=str(args.out), **metadata)


if __name__ == "__main__":
    main()
