#!/usr/bin/env python
"""Distil an LCM-LoRA for the shapes U-Net on CPU (latent consistency distillation, as in the LCM-LoRA paper):
the shipped shapes model is the teacher, run with classifier-free guidance; a skipping-step DDIM solver on the
50-step grid that diffusers' LCMScheduler samples from (original_inference_steps=50) takes the teacher one grid
step back; the target is the student with an exponential moving average of its LoRA weights; only the LoRA
weights are trained. The output is an ordinary diffusers/PEFT LoRA file, loaded like any user's:

    python build_scripts/distill_lcm_lora.py      # writes dcaccel/weights/shapes-lcm-lora/ (about 7 min, 2 cores)

    pipe = dcaccel.models.load_pipeline("shapes")
    call = dcaccel.lora.use_lcm_lora(pipe, dcaccel.lora.embedded_lora("shapes-lcm"))  # or the file's path
    images = pipe("a small red circle at the top left", **call).images

Resumable: the run checkpoints into --work-dir (written to a temporary name and renamed) every --save-every steps
and a rerun continues from there; its options must be the same. The shipped file is the EMA (target) LoRA at the
last step, and lcm_lora.json beside it records the options and the checks of that run.

The defaults are those that measured best here (log.jsonl holds the checks every --eval-every steps). With lr 1e-4
the FID (scorer) of 2-step images fell from 12.0 (the teacher under LCMScheduler) to 8.5 at step 500, then rose
again (10.5 at step 1000, 4-step images 12.8): the self-consistency target drifts with longer training, so the
run stops at 500. With lr 1e-3 the drift came sooner (FID 24-32 in benchmarks/lcm_quality.py after 1500 steps, prompt
accuracy still ~99%).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "build_scripts"))

from train_shapes import Stage, log, save_atomic  # noqa: E402

from dcaccel.shapes import data, score  # noqa: E402
from dcaccel.shapes.evaluate import Reference  # noqa: E402

# the modules LCM-LoRA adapts in SD 1.5 (attention, feed-forward, resnet convolutions, samplers, time projections)
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                  "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0  # LCMScheduler's boundary condition (diffusers' defaults)
OPTIONS = ("teacher", "rank", "guidance", "ddim_steps", "batch", "lr", "ema_decay", "huber_c", "num_images", "seed")


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip and c_out of LCMScheduler.get_scalings_for_boundary_condition_discrete: f(x, 0) = x."""
    scaled = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
    c_out = scaled / (scaled ** 2 + SIGMA_DATA ** 2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


class Solver:
    """Skipping-step DDIM on the grid t_n = (n + 1) * k - 1 (k = 1000 / ddim_steps): the timesteps LCMScheduler
    chooses its inference steps from."""

    def __init__(self, alphas_cumprod: torch.Tensor, ddim_steps: int, prediction_type: str):
        self.alphas_cumprod, self.prediction_type = alphas_cumprod, prediction_type
        self.k = len(alphas_cumprod) // ddim_steps
        self.timesteps = torch.arange(1, ddim_steps + 1) * self.k - 1
        self.alpha_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]])

    def x0_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":
            return a.sqrt() * x_t - (1 - a).sqrt() * output, a.sqrt() * output + (1 - a).sqrt() * x_t
        if self.prediction_type == "epsilon":
            return (x_t - (1 - a).sqrt() * output) / a.sqrt(), output
        raise ValueError(f"prediction_type {self.prediction_type!r}: expected v_prediction or epsilon")

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        a_prev = self.alpha_prev[index].view(-1, 1, 1, 1)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def add_lora(unet, rank: int):
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES))
    return [p for n, p in unet.named_parameters() if "lora_" in n]


class Swap:
    """Run the student with the EMA LoRA weights (the target network) inside a `with` block."""

    def __init__(self, live: list, ema: torch.nn.ParameterList):
        self.live, self.ema = live, ema

    def __enter__(self):
        self.saved = [p.detach().clone() for p in self.live]
        for p, e in zip(self.live, self.ema):
            p.data.copy_(e)

    def __exit__(self, *exc):
        for p, s in zip(self.live, self.saved):
            p.data.copy_(s)


def lcm_quality(pipe, ref, steps: int, seed: int) -> dict:
    """Prompt accuracy, held-out accuracy and FID (scorer) of LCM images at `steps` steps, guidance 1."""
    from diffusers import LCMScheduler

    saved = pipe.scheduler
    pipe.scheduler = LCMScheduler.from_config(saved.config)
    try:
        images = score.pipeline_images(pipe, ref.scenes, seed, steps=steps, guidance_scale=1.0)
    finally:
        pipe.scheduler = saved
    m = ref.metrics(images)
    return {"prompt_accuracy": round(m["prompt_accuracy"], 4), "held_out_accuracy": m["held_out_scene_accuracy"]
            and round(m["held_out_scene_accuracy"], 4), "fid_scorer": round(m["fid_scorer"], 2)}


def export_lora(out: Path, unet, metadata: dict) -> None:
    """Write pytorch_lora_weights.safetensors (diffusers' LoRA file, PEFT keys) and lcm_lora.json into a staging
    directory and put it in place in one step (dcaccel's engine builds do the same): `out` is always either the
    previous export or the new one."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from dcaccel.engines import StagingDir

    # PEFT keys (lora_A/lora_B), as diffusers' LCM-LoRA training script writes them: its diffusers-key conversion
    # renames only the attention projections, and a file with both kinds is one diffusers' loader misreads
    layers = get_peft_model_state_dict(unet)
    with StagingDir(out) as staging:
        StableDiffusionPipeline.save_lora_weights(staging, unet_lora_layers={k: v.to(torch.float16).contiguous()
                                                                            for k, v in layers.items()},
                                                  safe_serialization=True)
        (staging / "lcm_lora.json").write_text(json.dumps(metadata, indent=1) + "\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="shapes", help="the shapes model, or a local directory of one")
    p.add_argument("--work-dir", type=Path, default=REPO / ".train" / "lcm-lora")
    p.add_argument("--out", type=Path, default=REPO / "dcaccel" / "weights" / "shapes-lcm-lora")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--guidance", type=float, default=4.0, help="the teacher's classifier-free guidance scale")
    p.add_argument("--ddim-steps", type=int, default=50, help="solver grid (LCMScheduler's original_inference_steps)")
    p.add_argument("--ema-decay", type=float, default=0.95)
    p.add_argument("--huber-c", type=float, default=1e-3)
    p.add_argument("--num-images", type=int, default=108 * 40, help="training images encoded once (seed 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--eval-every", type=int, default=100,
                   help="steps between quality checks (LCM 2 and 4 steps; 0: none)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--check-seeds", type=int, default=1,
                   help="images per caption in the final checks recorded in lcm_lora.json (0: none)")
    return p


def main(argv=None):
    import copy

    from dcaccel import shapes
    from dcaccel.models import load_pipeline, trained_model_dir

    p = parser()
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    options = {k: getattr(args, k) for k in OPTIONS}

    pipe = load_pipeline(args.teacher)
    scorer = shapes.load_scorer(trained_model_dir("shapes") if args.teacher == "shapes" else args.teacher)
    unet, vae, tokenizer, text_encoder = pipe.unet, pipe.vae, pipe.tokenizer, pipe.text_encoder
    teacher = copy.deepcopy(unet).requires_grad_(False).eval()
    for module in (vae, text_encoder):
        module.requires_grad_(False).eval()
    live = add_lora(unet, args.rank)
    ema = torch.nn.ParameterList([torch.nn.Parameter(q.detach().clone(), requires_grad=False) for q in live])
    opt = torch.optim.AdamW(live, lr=args.lr, weight_decay=1e-2)
    stage = Stage(args.work_dir, "lcm_lora", {"unet": unet, "ema": ema}, opt, args.steps, options)

    # the teacher's data: training images (held-out scenes excluded) encoded once, captions embedded once
    latents_path = args.work_dir / "latents.pt"
    saved = torch.load(latents_path) if latents_path.exists() else None
    source = {"teacher": args.teacher, "num_images": args.num_images}
    if saved is None or saved.get("source") != source:  # encoded from another teacher or image count: again
        with torch.no_grad():
            images_np, scenes = data.make_dataset(args.num_images, seed=0)
            latents = torch.cat([vae.encode(c).latent_dist.mode() for c in data.to_tensor(images_np).split(256)])
        saved = {"latents": latents * vae.config.scaling_factor, "captions": [s.caption for s in scenes],
                 "source": source}
        save_atomic(saved, latents_path)
    latents, captions = saved["latents"], sorted(set(saved["captions"]))
    scene_ids = torch.tensor([captions.index(c) for c in saved["captions"]])
    with torch.no_grad():
        ids = tokenizer(captions + [""], padding="max_length", max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        embeddings = text_encoder(ids)[0]
    uncond = embeddings[-1:]

    solver = Solver(pipe.scheduler.alphas_cumprod.float(), args.ddim_steps, pipe.scheduler.config.prediction_type)
    eval_ref = None

    def evaluate():
        nonlocal eval_ref
        if eval_ref is None:  # every caption once, held-out ones among them
            eval_ref = Reference(scorer, data.all_scenes(), real_images=600)
        unet.eval()
        with Swap(live, ema):
            checks = {f"lcm{n}": lcm_quality(pipe, eval_ref, n, seed=0) for n in (2, 4)}
        unet.train()
        log(args.work_dir, stage="lcm_lora-eval", step=stage.step, **checks)

    if stage.step == 0 and args.eval_every:
        evaluate()  # the starting point: the LoRA adds nothing yet (B = 0), the teacher under LCMScheduler
    unet.train()
    t0 = time.time()
    while not stage.done:
        idx = torch.randint(len(latents), (args.batch,))
        x0, cond = latents[idx], embeddings[scene_ids[idx]]
        index = torch.randint(0, args.ddim_steps, (args.batch,))
        t = solver.timesteps[index]
        t_prev = (t - solver.k).clamp_min(0)
        x_t = pipe.scheduler.add_noise(x0, torch.randn_like(x0), t)

        c_skip, c_out = boundary_scalings(t)
        student_x0, _ = solver.x0_eps(unet(x_t, t, cond).sample, x_t, t)
        prediction = c_skip * x_t + c_out * student_x0
        with torch.no_grad():
            out = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                          torch.cat([cond, uncond.expand_as(cond)])).sample
            x0_c, eps_c = solver.x0_eps(out[:args.batch], x_t, t)
            x0_u, eps_u = solver.x0_eps(out[args.batch:], x_t, t)
            x_prev = solver.step(x0_u + args.guidance * (x0_c - x0_u), eps_u + args.guidance * (eps_c - eps_u),
                                 index)
            with Swap(live, ema):
                target_x0, _ = solver.x0_eps(unet(x_prev, t_prev, cond).sample, x_prev, t_prev)
            c_skip_prev, c_out_prev = boundary_scalings(t_prev)
            target = c_skip_prev * x_prev + c_out_prev * target_x0
        loss = (torch.sqrt((prediction - target) ** 2 + args.huber_c ** 2) - args.huber_c).mean()
        stage.optimise(loss, args.lr, 100, clip=1.0)
        with torch.no_grad():
            for e, q in zip(ema, live):
                e.lerp_(q, 1 - args.ema_decay)
        if stage.step % 50 == 0:
            log(args.work_dir, stage="lcm_lora", step=stage.step, loss=round(loss.item(), 5),
                seconds_per_step=round((time.time() - t0) / 50, 3))
            t0 = time.time()
        if stage.step % args.save_every == 0 or stage.done:
            stage.save()
        if args.eval_every and (stage.step % args.eval_every == 0 or stage.done):
            evaluate()
            t0 = time.time()

    unet.eval()
    checks = {}
    with Swap(live, ema):
        if args.check_seeds:
            ref = Reference(scorer, [s for _ in range(args.check_seeds) for s in data.all_scenes()])
            checks = {f"lcm{n}": lcm_quality(pipe, ref, n, seed=10_000) for n in (2, 4, 8)}
        metadata = {"script": "build_scripts/distill_lcm_lora.py", "options": options, "steps": stage.step,
                    "target_modules": TARGET_MODULES, "shipped": "EMA (target) LoRA weights, fp16",
                    "checks": f"LCMScheduler, guidance 1, every caption {args.check_seeds} time(s), seeds 10000+; FID "
                              "(scorer) against 1200 real images" if checks else "none (--check-seeds 0)", **checks}
        export_lora(args.out, unet, metadata)
    log(args.work_dir, stage="export", out=str(args.out), **checks)


if __name__ == "__main__":
    main()
