"""The latent cache (issue 15, data.cache_latents): training from cached latent distributions is
training from the images, bit for bit (buckets of several shapes, flips, caption dropout, SDXL's
micro-conditioning, masks, resume), without reading an image after the cache is built; the disk cache
encodes an image again exactly when its content or a setting that changes its latent changes (not
when it is only touched); the families' encode_images is the VAE distribution's sample as diffusers
draws it; a random crop is a config error."""

from __future__ import annotations

import copy
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import quick_config_dict
from difftune.config.loading import validate_config
from difftune.data import dataset as dataset_module
from difftune.data.dataset import TrainDataset
from difftune.data.latent_cache import HASHES, LatentCache, vae_identity
from difftune.data.records import scan_image_folder
from difftune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

# (width, height): three buckets at 32 px in steps of 8, an even number of images each, so neither a
# training batch of 2 nor a VAE batch of 2 holds a single image (the CPU's VAE computes one image alone
# with other kernels than two: see test 1).
SHAPES = {**{f"sq{i}": (32 + i, 33 + i) for i in range(4)}, **{f"tall{i}": (20, 50 + i) for i in range(4)},
          **{f"wide{i}": (60 + i, 22) for i in range(2)}}
VAL_SHAPES = {"val_sq": (40, 40), "val_tall": (21, 55)}


def make_images(folder, shapes=SHAPES, seed=0, mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, (w, h) in shapes.items():
        channels = {"RGB": 3, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        if mode == "RGBA":
            pixels[..., 3] = 255
            pixels[: h // 2, :, 3] = 0  # the top half does not train
        Image.fromarray(pixels, mode).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} picture, with, tags")
    return folder


def config_for(folder, out, **sections):
    sections = copy.deepcopy(sections)
    sections.setdefault("data", {}).update({"resolution": 32, "bucket_reso_steps": 8, "val_split": 0.2,
                                            **sections.get("data", {})})
    return validate_config(quick_config_dict(folder, out, **sections), "t")


def run(trainer, steps, check=lambda trainer: None):
    """Losses of `steps` optimizer steps, the validation loss and the trained weights."""
    try:
        check(trainer)
        groups = trainer.step_groups()
        losses = [trainer.train_step(next(groups)) for _ in range(steps)]
        return losses, trainer.validate()["val_loss"], trainer.network.state_dict()
    finally:
        trainer.close()


def _refuse(*args, **kwargs):
    raise AssertionError("a training sample read its image although its latents are cached")


# ----------------------------------------------------------------------------------- 1. training
@pytest.mark.parametrize("case", ["sdxl-flips", "sd-alpha-mask"])
def test_training_from_cached_latents_equals_training_from_images(tmp_path, monkeypatch, case):
    """Exact: the same batches, captions, crops, flips and masks, the same latent sample mean + std·ε
    (ε from the step generator) and the VAE's own memory layout (oneDNN's channels-last output makes
    the denoiser's kernels round otherwise). Exact needs the VAE's kernels to give an image the same
    distribution in the cache's batches as in the step's: true on this CPU for batches of 2 or more
    (vae_batch_size = 2 here; a batch of one is computed otherwise, ~1e-6 apart)."""
    from difftune.training.loop import Trainer

    mode = "RGB" if case == "sdxl-flips" else "RGBA"
    folder, val = make_images(tmp_path / "images", mode=mode), make_images(tmp_path / "val", VAL_SHAPES, 1, mode)
    if case == "sdxl-flips":
        common = {"model": {"path": "tiny-sdxl"}, "train": {"batch_size": 2},
                  "data": {"flip_p": 0.5, "cond_dropout": 0.3, "shuffle_tags": True}}
    else:
        common = {"train": {"batch_size": 2}, "data": {"alpha_mask": True}}
    common["data"].update(val_dir=str(val), vae_batch_size=2)
    steps, seen = 5, {}

    def check(trainer):  # built: from here on no sample reads its image
        monkeypatch.setattr(dataset_module, "load_placed", _refuse)
        seen["batches"] = list(trainer.batches.epoch(0))
        seen["build"], seen["lines"] = trainer.latent_build, trainer._memory_lines()

    plain = run(Trainer(config_for(folder, tmp_path / "plain", **common), show_progress=False), steps)
    cached_config = config_for(folder, tmp_path / "cached", **common)
    cached_config.data.cache_latents = "memory"
    cached = run(Trainer(cached_config, show_progress=False), steps, check)
    assert cached[0] == plain[0] and cached[1] == plain[1]
    assert all(torch.equal(cached[2][k], plain[2][k]) for k in plain[2])
    batches, flips = seen["batches"], 2 if case == "sdxl-flips" else 1
    assert (seen["build"].entries, seen["build"].encoded) == (10 * flips, 10 * flips)
    line = seen["lines"]["latents"]
    assert line.startswith("cached in memory") and f"{10 * flips} images/flips, {10 * flips} encoded" in line
    assert all(b.pixels is None for b in batches)
    assert {tuple(b.latent_mean.shape[-2:]) for b in batches} == {(16, 16), (24, 8), (8, 24)}  # 3 buckets, VAE / 2
    if case == "sd-alpha-mask":  # at latent resolution; the top half (alpha 0) does not train
        assert all(b.masks.shape[-2:] == b.latent_mean.shape[-2:] for b in batches)
        assert all(m[0, 0].min() == 0 and m[0, -1].min() > 0 for b in batches for m in b.masks)


def test_a_resumed_run_reuses_the_disk_cache_and_continues_exactly(tmp_path):
    from difftune.training.loop import Trainer, train

    folder = make_images(tmp_path / "images")
    common = {"train": {"batch_size": 2, "max_steps": 4}, "validation": {"every_n_steps": 2},
              "data": {"cache_latents": "disk", "flip_p": 0.5, "vae_batch_size": 2}}
    whole = train(config_for(folder, tmp_path / "whole", **common), show_progress=False)
    part = config_for(folder, tmp_path / "part", **common, output={"save_every_n_steps": 2})
    part.train.max_steps = 2
    train(part, show_progress=False)
    part.train.max_steps = 4
    resumed = train(part, resume=tmp_path / "part", show_progress=False)
    assert resumed["final_val_loss"] == whole["final_val_loss"]
    assert "16 images/flips, 0 encoded" in resumed["memory"]["latents"]
    assert (tmp_path / "part/latent_cache" / HASHES).is_file()
    trainer = Trainer(config_for(folder, tmp_path / "again", **common), show_progress=False)
    trainer.close()
    assert trainer.latent_build.encoded == 16  # its own folder: <output.dir>/latent_cache


# ------------------------------------------------------------------------------ 2. the disk cache
@pytest.fixture(scope="module")
def tiny_sd():
    from difftune.config.schema import ModelConfig
    from difftune.models import load_model

    return load_model(ModelConfig(path="tiny-sd"))


def build(model, folder, cache_dir, **data):
    config = config_for(folder, cache_dir.parent / "unused", data={"val_split": 0.0, **data})
    dataset = TrainDataset(scan_image_folder(folder), config.data, seed=1)
    cache = LatentCache(cache_dir)
    return cache.build(model, dataset), cache, dataset


def test_the_disk_cache_encodes_an_image_again_exactly_when_it_changed(tiny_sd, tmp_path):
    folder, cache_dir = make_images(tmp_path / "images"), tmp_path / "cache"
    first, cache, dataset = build(tiny_sd, folder, cache_dir)
    assert (first.entries, first.encoded, first.hashed) == (10, 10, 10)
    files = sorted(cache_dir.glob("*/*.safetensors"))
    assert len(files) == 10 and not list(cache_dir.glob("**/.tmp-*"))
    # What is stored is the VAE's distribution of the crop the dataset makes (raw VAE space, its dtype).
    index = [r.path.name for r in dataset.records].index("tall1.png")
    pixels = dataset_module.load_placed(dataset.records[index].path, dataset.spec.place).pixels
    mean, std = tiny_sd.encode_latent_distribution(pixels[None])
    stored = cache.entry(index, False).read()
    assert torch.equal(stored["mean"], mean[0]) and torch.equal(stored["std"], std[0]) and stored["std"].min() > 0

    again, _, _ = build(tiny_sd, folder, cache_dir)
    assert (again.encoded, again.hashed, again.reused) == (0, 0, 10)  # unchanged: neither read nor encoded

    touched = folder / "sq1.png"
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    after_touch, _, _ = build(tiny_sd, folder, cache_dir)
    assert (after_touch.encoded, after_touch.hashed) == (0, 1)  # hashed again, the same bytes: no encoding

    index = [r.path.name for r in dataset.records].index("wide1.png")
    before = cache.entry(index, False).read()["mean"]
    Image.fromarray(np.full((22, 61, 3), 7, dtype=np.uint8)).save(folder / "wide1.png")  # same size, new content
    after_change, cache, _ = build(tiny_sd, folder, cache_dir)
    assert (after_change.encoded, after_change.hashed) == (1, 1)
    assert len(list(cache_dir.glob("*/*.safetensors"))) == 11  # the old entry stays, unused
    assert not torch.equal(load_file(cache.entry(index, False).path)["mean"], before)

    # Settings: a flip adds the mirrored variants only; another bucket size encodes everything again.
    flipped, _, _ = build(tiny_sd, folder, cache_dir, flip_p=0.5)
    assert (flipped.entries, flipped.encoded, flipped.hashed) == (20, 10, 0)
    mirrored, _, _ = build(tiny_sd, folder, cache_dir, flip_p=1.0)
    assert (mirrored.entries, mirrored.encoded) == (10, 0)
    other_size, _, _ = build(tiny_sd, folder, cache_dir, resolution=24)
    assert (other_size.entries, other_size.encoded) == (10, 10)


def test_the_vae_identity_follows_weights_config_and_dtype_not_the_copy(tiny_sd):
    vae = tiny_sd.vae
    same = copy.deepcopy(vae)
    assert vae_identity(same) == vae_identity(vae)
    with torch.no_grad():
        same.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3  # one evenly spaced value: index 0
    assert vae_identity(same) != vae_identity(vae)
    assert vae_identity(copy.deepcopy(vae).to(torch.bfloat16)) != vae_identity(vae)
    other = copy.deepcopy(vae)
    other.register_to_config(scaling_factor=0.5, _name_or_path="/elsewhere")  # applied after the cache: same
    assert vae_identity(other) == vae_identity(vae)
    other.register_to_config(latent_channels=8)
    assert vae_identity(other) != vae_identity(vae)


def test_an_interrupted_write_is_cleaned_up_once_it_is_old(tiny_sd, tmp_path):
    folder, cache_dir = make_images(tmp_path / "images", {"a": (32, 32), "b": (33, 32)}), tmp_path / "cache"
    (cache_dir / "ab").mkdir(parents=True)
    old, fresh = cache_dir / "ab/.tmp-x.safetensors-1", cache_dir / "ab/.tmp-y.safetensors-2"
    old.write_bytes(b"half"), fresh.write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    build(tiny_sd, folder, cache_dir)
    assert not old.exists() and fresh.exists()  # a fresh one may be another run's write in progress


# ------------------------------------------------------------------------------- 3. the families
@pytest.mark.parametrize("path", ["tiny-sd", "tiny-flux"])
def test_encode_images_is_the_stored_distribution_sampled_as_diffusers_samples_it(path):
    from difftune.config.schema import ModelConfig
    from difftune.models import load_model

    model = load_model(ModelConfig(path=path))
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    dist = model.vae.encode(pixels).latent_dist
    config = model.vae.config
    expected = (dist.sample(generator=torch.Generator().manual_seed(5)) - (config.shift_factor or 0.0)) \
        * config.scaling_factor
    mean, std = model.encode_latent_distribution(pixels)
    assert torch.equal(model.latents_from_distribution(mean, std, torch.Generator().manual_seed(5)), expected)
    assert torch.equal(model.encode_images(pixels, torch.Generator().manual_seed(5)), expected)
    assert torch.equal(model.latents_from_distribution(mean, std), model.encode_images(pixels))  # the mean
    assert not torch.equal(model.encode_images(pixels), expected)


# --------------------------------------------------------------------------------- 4. the config
def test_a_random_crop_or_a_folder_without_the_disk_cache_is_a_config_error(tmp_path):
    folder = tmp_path / "images"
    with pytest.raises(ConfigError, match="cache_latents needs data.center_crop = true: a random crop changes every"):
        config_for(folder, tmp_path / "r", data={"cache_latents": "memory", "center_crop": False})
    with pytest.raises(ConfigError, match="latent_cache_dir is the folder of cache_latents = 'disk'"):
        config_for(folder, tmp_path / "r", data={"cache_latents": "memory", "latent_cache_dir": str(tmp_path)})
    assert config_for(folder, tmp_path / "r", data={"cache_latents": "disk", "flip_p": 0.5}).data.vae_batch_size == 1


# ------------------------------------------------------------------------ 5. doctor and the tuners
def test_doctor_says_what_the_latent_cache_holds_before_any_model_loads(tmp_path):
    from difftune.doctor import diagnose

    folder = make_images(tmp_path / "images")
    lines = {mode: diagnose(config_for(folder, tmp_path / "r", data={"cache_latents": mode, "flip_p": 0.5}))["extra"]
             for mode in ("off", "memory", "disk")}
    assert lines["off"]["latents"].startswith("encoded by the VAE every step")
    # 8 training images (val_split 0.2 of 10), flip_p 0.5: each cached as it is and mirrored
    assert lines["memory"]["latents"] == ("cached in memory when training starts: 16 images/flips; on a GPU the "
                                          "VAE then waits on the CPU (data.offload_encoders)")
    assert lines["disk"]["latents"].startswith(f"cached on disk in {tmp_path / 'r' / 'latent_cache'}: 16 images/flips "
                                               "needed, 0 entries there now")
    config = config_for(folder, tmp_path / "r", train={"batch_size": 2, "max_steps": 1},
                        data={"cache_latents": "disk", "offload_encoders": False})
    from difftune.training.loop import train

    train(config, show_progress=False)
    assert diagnose(config)["extra"]["latents"].endswith("8 images/flips needed, 8 entries there now; the VAE "
                                                         "stays on the device")


def test_the_tuners_sub_runs_share_the_parents_disk_cache(tmp_path):
    from difftune.training.loop import Trainer
    from difftune.tuning.common import sub_config

    folder = make_images(tmp_path / "images")
    config = config_for(folder, tmp_path / "auto", data={"cache_latents": "disk", "flip_p": 0.5, "vae_batch_size": 2})
    builds = []
    for name in ("find-lr", "find-steps", "final"):
        sub = sub_config(config, name)
        assert sub.data.latent_cache_dir == str(tmp_path / "auto" / "latent_cache")
        trainer = Trainer(sub, show_progress=False)
        trainer.close()
        builds.append(trainer.latent_build.encoded)
    assert builds == [16, 0, 0]
    own = config_for(folder, tmp_path / "auto2", data={"cache_latents": "disk", "latent_cache_dir": str(tmp_path / "c")})
    assert sub_config(own, "find-lr").data.latent_cache_dir == str(tmp_path / "c")  # a named folder stays
