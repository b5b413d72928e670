"""Where a training step's time goes: difftune's step against the diffusers example's, on one model.

Builds the bench/throughput.py `sd1-lora` job (the same model folder, images and settings) twice in
this process: difftune's Trainer, and the step of diffusers' train_text_to_image_lora.py written out
(PEFT LoRA rank 4 on to_q/k/v/out.0, randn_like noise, pre-tokenised captions, AdamW). Each takes
`--warmup` steps, then `--steps` steps under cProfile (Python-level: which of difftune's functions
cost what) and under torch.profiler (operator-level), one after the other, nothing else running.

    OMP_NUM_THREADS=1 python bench/profile_step.py [--steps 30] [--out profile_step]

Writes bench/results/<out>.md: per-step milliseconds of each, the top Python functions by cumulative
time inside difftune's step, and the top operators of each side.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from throughput import CPU_JOB, LR, WEIGHT_DECAY, WORK, difftune_config, write_dataset, write_model  # noqa: E402

RANK = CPU_JOB["rank"]


def difftune_stepper(model_dir: Path, data: Path, args):
    from difftune.config.loading import validate_config
    from difftune.training.loop import Trainer

    ns = argparse.Namespace(resolution=args.resolution, batch_size=args.batch_size, workers=0, mixed_precision="no",
                            gradient_checkpointing=False, compile=False, rank=RANK)
    config = difftune_config("sd1-lora", model_dir, data, WORK / "profile" / "difftune", 10_000, ns, args.cache)
    config["output"]["tensorboard"] = args.tensorboard
    trainer = Trainer(validate_config(config, "profile"), show_progress=False)
    groups = trainer.step_groups()

    def step():
        trainer.train_step(next(groups))

    return step, trainer.close


def diffusers_stepper(model_dir: Path, data: Path, args):
    """The example script's step, as it is written there (no accelerate wrapper: one process, no mixed
    precision, where accelerate's prepare and backward are pass-throughs)."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    files = sorted(data.glob("*.png"))
    captions = [f.with_suffix(".txt").read_text() for f in files]

    def load(i):
        image = Image.open(files[i]).convert("RGB").resize((args.resolution, args.resolution))
        return torch.from_numpy(__import__("numpy").asarray(image)).permute(2, 0, 1).float() / 127.5 - 1

    state = {"i": 0}

    def step():
        idx = [(state["i"] + j) % len(files) for j in range(args.batch_size)]
        state["i"] += args.batch_size
        pixels = torch.stack([load(i) for i in idx])
        ids = tokenizer([captions[i] for i in idx], max_length=tokenizer.model_max_length, padding="max_length",
                        truncation=True, return_tensors="pt").input_ids
        unet.train()
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(ids, return_dict=False)[0]
        pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.repeat(args.batch_size).mean().item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step, lambda: None


def measure(name: str, make, model_dir, data, args) -> dict:
    step, close = make(model_dir, data, args)
    try:
        for _ in range(args.warmup):
            step()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        plain_ms = 1000 * (time.perf_counter() - started) / args.steps
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.steps):
            step()
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(args.functions)
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops)
        return {"name": name, "step_ms": plain_ms, "python": text.getvalue(), "ops": ops}
    finally:
        close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--cache", default="off", help="difftune data.cache_latents")
    parser.add_argument("--tensorboard", action="store_true", help="difftune output.tensorboard (default off here)")
    parser.add_argument("--functions", type=int, default=40)
    parser.add_argument("--ops", type=int, default=25)
    parser.add_argument("--model", default="test", choices=["test", "tiny-sd"], help="as throughput.py --sd1")
    parser.add_argument("--sides", default="difftune,diffusers")
    parser.add_argument("--out", default="profile_step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = WORK / "data" / "textures-64"
    write_dataset(data, 64, 64)
    model_dir = write_model("sd1-test" if args.model == "test" else "sd1", "cpu", False)
    makers = {"difftune": difftune_stepper, "diffusers": diffusers_stepper}
    results = [measure(side, makers[side], model_dir, data, args) for side in args.sides.split(",")]
    lines = ["# One training step profiled (bench/profile_step.py)", "",
             f"`python bench/profile_step.py {' '.join(sys.argv[1:])}` — torch {torch.__version__}, 1 thread, "
             f"batch {args.batch_size}, {args.resolution} px, SD1 {args.model}, LoRA rank {RANK} on attention, {args.steps} steps each.", ""]
    for r in results:
        lines.append(f"- {r['name']}: {r['step_ms']:.1f} ms per step")
    for r in results:
        lines += ["", f"## {r['name']}: Python functions by cumulative time", "", "```", r["python"].strip(), "```",
                  "", f"## {r['name']}: operators by self CPU time", "", "```", r["ops"].strip(), "```"]
    out = ROOT / "results" / f"{args.out}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8 + len(results)]))


if __name__ == "__main__":
    main()
