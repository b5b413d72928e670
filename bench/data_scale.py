"""Data at scale: a generated dataset of mixed-size images through buckets and the latent cache.

A folder of N images (default 2,000) of many sizes and aspect ratios (JPEG and PNG, smooth random
content so they compress like photos) trains the built-in tiny-sd with aspect-ratio buckets. Measured,
each in this one process, one after the other (nothing else should run meanwhile):

- scan: `scan_image_folder` (every image decoded once to verify it, as every run does);
- data path: samples per second of one epoch of batches with nothing trained, from the images
  (load, resize, crop, flip: today's path) and from the latent cache in memory and on disk;
- cache build: encoding every (image, flip) once (data.cache_latents = disk, cold), the same folder
  again (warm: every entry found, every content hash memoised), and again after touching every image
  (each file hashed again, nothing encoded);
- what the cache takes out of a step: the time to make a batch and to encode it with the VAE, against
  the time to read a cached batch and sample its latents, per batch of epoch 0;
- training: optimizer steps per second of the same run (same seed, batches, draws) with
  cache_latents = off, memory and disk, and disk with data.cache_text_embeddings = true, timed after the
  trainer is built (the cache builds excluded; the latent build is reported above, the text build is
  in the trainer's build time). The four runs step side by side, one step each in turn, and the speed-up is
  the median over steps of the uncached step's time over the cached one's: a paired measurement,
  which a shared machine's drift (runs of one mode here varied by 15 %) moves far less.

    python bench/data_scale.py [--images 2000] [--resolution 64] [--steps 60] [--batch-size 8]

Writes bench/results/data_scale.json and .md (the command included); the images and caches live under
bench/work/data_scale/ (gitignored; the images are generated once and reused).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from difftune import __version__
from difftune.config.loading import validate_config

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WORK = ROOT / "work" / "data_scale"
TEXT = "disk + text embeddings"
"""The run that also trains from cached text-encoder outputs (data.cache_text_embeddings)."""
ASPECTS = [(1, 1), (2, 3), (3, 2), (3, 4), (4, 3), (9, 16), (16, 9), (1, 2), (2, 1), (4, 5)]
"""(width, height) ratios of the generated images, as photo and phone formats."""


def generate(folder: Path, count: int, seed: int = 0) -> None:
    """`count` images (each with a caption) of random aspect ratio and size, the long side 64..512 px."""
    marker = folder / f".complete-{count}-{seed}"
    if marker.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
        long_side = int(rng.integers(64, 513))
        scale = long_side / max(aw, ah)
        w, h = max(16, round(aw * scale)), max(16, round(ah * scale))
        # Smooth content (a low-resolution random field upscaled) plus a little noise: photo-like sizes.
        field = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-8, 9, (h, w, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        name = f"img{i:05d}"
        if i % 4 == 3:
            image.save(folder / f"{name}.png")
        else:
            image.save(folder / f"{name}.jpg", quality=90)
        (folder / f"{name}.txt").write_text(f"a picture number {i % 97}, {aw}x{ah}")
    marker.write_text("")


def make_config(images: Path, out: Path, args, **data) -> Any:
    return validate_config({
        "model": {"path": "tiny-sd"},
        "data": {"train_dir": str(images), "resolution": args.resolution, "bucket_reso_steps": 8,
                 "val_split": 0.0, "flip_p": 0.5, "vae_batch_size": args.vae_batch_size, **data},
        "train": {"batch_size": args.batch_size, "lr": 1e-4, "max_steps": args.steps, "seed": 1},
        "output": {"dir": str(out), "tensorboard": False, "overwrite": True},
    }, "bench/data_scale.py")


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def data_path(batches, limit: int) -> dict[str, float]:
    """Samples per second of the first `limit` batches of epoch 0 (nothing trained)."""
    samples, started = 0, time.perf_counter()
    for i, batch in enumerate(batches.epoch(0)):
        samples += len(batch)
        if i + 1 >= limit:
            break
    seconds = time.perf_counter() - started
    return {"samples": samples, "seconds": round(seconds, 3), "samples_per_second": round(samples / seconds, 1)}


def latent_work(model, plain, cached, limit: int) -> dict[str, float]:
    """Milliseconds per batch of what caching replaces: making the batch and encoding it (a latent sample,
    as the step draws it) against reading the cached batch and sampling it, over `limit` batches."""
    from difftune.training.step import step_generator

    def per_batch(batches, latents) -> tuple[float, float]:
        make = encode = 0.0
        iterator = batches.epoch(0)
        for i in range(limit):
            batch, seconds = timed(lambda: next(iterator))
            make += seconds
            generator = step_generator(1, i, 0)
            started = time.perf_counter()
            latents(batch, generator)
            encode += time.perf_counter() - started
        return 1000 * make / limit, 1000 * encode / limit

    with torch.no_grad():
        make_off, encode_off = per_batch(plain, lambda b, g: model.encode_images(b.pixels, g))
        make_on, encode_on = per_batch(cached, lambda b, g: model.latents_from_distribution(b.latent_mean, b.latent_std, g))
    return {"batches": limit, "uncached_make_ms": round(make_off, 2), "uncached_vae_ms": round(encode_off, 2),
            "cached_read_ms": round(make_on, 2), "cached_sample_ms": round(encode_on, 3),
            "removed_ms_per_batch": round(make_off + encode_off - make_on - encode_on, 2)}


def training(configs: dict[str, Any], steps: int) -> dict[str, dict[str, Any]]:
    """The runs of `configs` (mode → config) side by side: each step is taken by every run in turn (the
    same batch and draws in each), so a slow moment of a shared machine slows them all alike. Returns per
    mode the median step time and the median of its per-step ratio to the uncached run's (build and cache
    excluded; one warm-up step each)."""
    import statistics

    from difftune.training.loop import Trainer

    trainers, builds = {}, {}
    try:
        for mode, config in configs.items():
            trainers[mode], builds[mode] = timed(lambda config=config: Trainer(config, show_progress=False))
        groups = {mode: trainer.step_groups() for mode, trainer in trainers.items()}
        times: dict[str, list[float]] = {mode: [] for mode in trainers}
        losses: dict[str, list[float]] = {mode: [] for mode in trainers}
        for step in range(steps + 1):
            for mode, trainer in trainers.items():
                loss, seconds = timed(lambda mode=mode, trainer=trainer: trainer.train_step(next(groups[mode])))
                if step:  # step 0 warms up (first-call allocations)
                    times[mode].append(seconds)
                    losses[mode].append(loss)
        out = {}
        for mode, trainer in trainers.items():
            median = statistics.median(times[mode])
            ratio = statistics.median(o / t for o, t in zip(times["off"], times[mode], strict=True))
            build, text = trainer.latent_build, trainer.text_cache
            out[mode] = {"trainer_build_seconds": round(builds[mode], 2), "steps": steps,
                         "median_step_ms": round(1000 * median, 1), "steps_per_second": round(1 / median, 3),
                         "images_per_second": round(configs[mode].train.batch_size / median, 1),
                         "speedup_over_off": round(ratio, 3), "last_loss": losses[mode][-1],
                         "cache": None if build is None else {"entries": build.entries, "encoded": build.encoded,
                                                              "seconds": round(build.seconds, 2)},
                         "text_embeddings_cached": None if text is None else len(text)}
        return out
    finally:
        for trainer in trainers.values():
            trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60, help="timed optimizer steps per training run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vae-batch-size", type=int, default=8)
    parser.add_argument("--data-batches", type=int, default=100, help="batches read per data-path measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="data_scale", help="result name under bench/results/ (.json, .md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from difftune.data.dataset import TrainBatches
    from difftune.data.latent_cache import CachedBatches, LatentCache
    from difftune.data.records import scan_image_folder
    from difftune.models import load_model

    images = WORK / f"images-{args.images}"
    _, generate_s = timed(lambda: generate(images, args.images))
    records, scan_s = timed(lambda: scan_image_folder(images))
    config = make_config(images, WORK / "run", args)
    batches = TrainBatches(records, config.data, args.batch_size, seed=1)
    buckets: dict[str, int] = {}
    for placement in batches.dataset.placements:
        key = f"{placement.bucket[1]}x{placement.bucket[0]}"
        buckets[key] = buckets.get(key, 0) + 1
    print(f"{len(records)} images in {len(buckets)} buckets, scanned in {scan_s:.1f} s", flush=True)

    model = load_model(config.model)
    cache_dir = WORK / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    builds = {}
    disk = LatentCache(cache_dir)
    stats, _ = timed(lambda: disk.build(model, batches.dataset, args.vae_batch_size))
    builds["disk, cold"] = stats
    stats, _ = timed(lambda: LatentCache(cache_dir).build(model, batches.dataset, args.vae_batch_size))
    builds["disk, warm"] = stats
    now = time.time_ns()
    for record in records:
        os.utime(record.path, ns=(now, now))
    stats, _ = timed(lambda: LatentCache(cache_dir).build(model, batches.dataset, args.vae_batch_size))
    builds["disk, every image touched"] = stats
    memory = LatentCache(None)
    builds["memory"] = memory.build(model, batches.dataset, args.vae_batch_size)
    for name, s in builds.items():
        print(f"cache build {name}: {s.entries} entries, {s.encoded} encoded, {s.hashed} hashed, {s.seconds:.2f} s",
              flush=True)

    paths = {
        "images (load, resize, crop, flip)": data_path(batches, args.data_batches),
        "latent cache in memory": data_path(CachedBatches(batches, memory), args.data_batches),
        "latent cache on disk": data_path(CachedBatches(batches, disk), args.data_batches),
    }
    for name, row in paths.items():
        print(f"data path {name}: {row['samples_per_second']} samples/s", flush=True)

    work = latent_work(model, batches, CachedBatches(batches, memory), min(args.data_batches, 50))
    print(f"per batch: uncached {work['uncached_make_ms']} ms to make + {work['uncached_vae_ms']} ms VAE; cached "
          f"{work['cached_read_ms']} ms to read + {work['cached_sample_ms']} ms to sample", flush=True)

    configs = {}
    for mode in ("off", "memory", "disk"):
        extra = {"latent_cache_dir": str(cache_dir)} if mode == "disk" else {}
        configs[mode] = make_config(images, WORK / f"run-{mode}", args, cache_latents=mode,
                                    cache_text_embeddings=False, **extra)
    configs[TEXT] = make_config(images, WORK / "run-text", args, cache_latents="disk", latent_cache_dir=str(cache_dir),
                                cache_text_embeddings=True)
    runs = training(configs, args.steps)
    for mode, row in runs.items():
        print(f"training {mode}: {row['steps_per_second']} steps/s, x{row['speedup_over_off']}", flush=True)
    step_ms = runs["off"]["median_step_ms"]
    work["share_of_an_uncached_step"] = round(work["removed_ms_per_batch"] / step_ms, 4)
    work["expected_speedup"] = round(step_ms / (step_ms - work["removed_ms_per_batch"]), 3)
    off_loss = runs["off"]["last_loss"]
    apart = max(abs(runs[m]["last_loss"] - off_loss) / abs(off_loss) for m in runs if m != "off")

    results = {
        "what": "buckets and the latent cache on a generated dataset of mixed-size images, tiny-sd on the CPU",
        "command": "python bench/data_scale.py " + " ".join(sys.argv[1:]),
        "dataset": {"images": len(records), "long_side_px": [64, 512], "aspects": [f"{w}:{h}" for w, h in ASPECTS],
                    "formats": "3/4 JPEG (q 90), 1/4 PNG", "generate_seconds": round(generate_s, 1),
                    "scan_seconds": round(scan_s, 2), "buckets": dict(sorted(buckets.items()))},
        "settings": {"resolution": args.resolution, "bucket_reso_steps": 8, "flip_p": 0.5, "steps": args.steps,
                     "batch_size": args.batch_size, "vae_batch_size": args.vae_batch_size,
                     "threads": args.threads},
        "cache_build": {name: {"entries": s.entries, "encoded": s.encoded, "hashed": s.hashed,
                               "seconds": round(s.seconds, 2)} for name, s in builds.items()},
        "data_path": paths,
        "latent_work_per_batch": work,
        "training": runs,
        "cached_vs_uncached_last_loss_relative_difference": apart,
        "difftune_version": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [
        "# Data at scale (bench/data_scale.py)", "",
        f"`{r['command']}` — difftune {r['difftune_version']}, torch {r['torch']}, {s['threads']} thread(s), "
        f"{r['cpu_count']} CPUs.", "",
        f"{r['dataset']['images']} generated images (long side {r['dataset']['long_side_px'][0]}–"
        f"{r['dataset']['long_side_px'][1]} px, aspects {', '.join(r['dataset']['aspects'])}; "
        f"{r['dataset']['formats']}) in {len(r['dataset']['buckets'])} buckets at resolution {s['resolution']} "
        f"(steps {s['bucket_reso_steps']}), flip_p {s['flip_p']}, tiny-sd, batch {s['batch_size']}, "
        f"vae_batch_size {s['vae_batch_size']}. Scan: {r['dataset']['scan_seconds']} s.", "",
        "## Cache build", "", "| build | entries | encoded | hashed | seconds |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, b in r["cache_build"].items():
        lines.append(f"| {name} | {b['entries']} | {b['encoded']} | {b['hashed']} | {b['seconds']} |")
    lines += ["", "## Data path (one epoch's batches, nothing trained)", "", "| source | samples | samples/s |",
              "| --- | ---: | ---: |"]
    for name, p in r["data_path"].items():
        lines.append(f"| {name} | {p['samples']} | {p['samples_per_second']} |")
    w = r["latent_work_per_batch"]
    lines += ["", f"## What the cache takes out of a step (ms per batch, {w['batches']} batches)", "",
              "| | make the batch | latents |", "| --- | ---: | ---: |",
              f"| uncached (load images; VAE encode + sample) | {w['uncached_make_ms']} | {w['uncached_vae_ms']} |",
              f"| cached (read entries; sample mean + std·ε) | {w['cached_read_ms']} | {w['cached_sample_ms']} |", "",
              f"Removed per step: {w['removed_ms_per_batch']} ms, {100 * w['share_of_an_uncached_step']:.1f} % of an "
              f"uncached step here, so the expected speed-up is {w['expected_speedup']}x: on the tiny model the "
              "denoiser's step dominates; the share is what the VAE and the image decoding cost against the "
              "denoiser's forward and backward, so it grows with larger source images and a larger VAE.",
              "", f"## Training ({s['steps']} timed steps, the four runs stepping in turn)", "",
              "| caches | median step ms | steps/s | images/s | speed-up over off (median of paired steps) | "
              "trainer build s |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for mode, t in r["training"].items():
        lines.append(f"| {mode} | {t['median_step_ms']} | {t['steps_per_second']} | {t['images_per_second']} | "
                     f"{t['speedup_over_off']} | {t['trainer_build_seconds']} |")
    lines += ["", "Last loss with the caches vs without, relative difference: "
              f"{r['cached_vs_uncached_last_loss_relative_difference']:.2g} (0 is the same training to the bit; the "
              "VAE's CPU kernels give an image encoded alone other last bits than in a batch, so a bucket's odd image "
              "out in a VAE batch of one can move the last bits of the losses).", "",
              "The data path is one process on one core (data.num_workers = 0); the steps are tiny-sd's on the CPU.",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
