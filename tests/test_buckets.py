"""Aspect-ratio buckets (issue 15): kohya's bucket list and assignment, crop boxes on images of every
shape, bucket_no_upscale, batches of one bucket in an order that is a pure function of (seed, epoch)
and exactly the pre-bucket order with one bucket, short buckets counted as the plan counts them,
bit-exact resume on mixed shapes (tiny-sd, tiny-sdxl), the per-bucket validation probe, doctor's table."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import quick_config_dict
from difftune.config.loading import validate_config
from difftune.data.buckets import BucketSpec, resolve, square_spec
from difftune.data.dataset import TrainBatches, epoch_order
from difftune.data.records import scan_image_folder
from difftune.data.transforms import load_cropped, load_placed
from difftune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

# (width, height) of generated images: square, tall, wide, tiny, huge, extreme
SHAPES = {"square": (40, 40), "tall": (24, 72), "wide": (90, 30), "tiny": (6, 6), "huge": (800, 480),
          "strip": (300, 20), "portrait": (30, 40), "landscape": (52, 36)}


def make_images(folder, shapes, seed=0, mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, (w, h) in shapes.items():
        channels = {"RGB": 3, "RGBA": 4}[mode]
        Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} picture")
    return folder


def old_square_crop(path, resolution, crop_position=None):
    """The square crop difftune made before buckets (transforms.load_cropped as it was), for comparison."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    fraction = 0.5 if crop_position is None else crop_position
    left, top = round((image.width - resolution) * fraction), round((image.height - resolution) * fraction)
    cropped = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1), (top, left)


# ------------------------------------------------------------------------------------- bucket list
def test_the_bucket_list_is_kohyas_and_always_holds_the_square():
    spec, notes = resolve(512)
    assert (spec.steps, spec.min_side, spec.max_side) == (64, 256, 1024) and notes == []
    # kohya's make_bucket_resolutions((512, 512), 256, 1024, 64), as (width, height)
    assert sorted((w, h) for h, w in spec.predefined()) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]
    for resolution in (8, 16, 24, 40, 96, 200, 512, 768, 1024):
        spec, _ = resolve(resolution)
        buckets = spec.predefined()
        assert (resolution, resolution) in buckets and resolution % spec.steps == 0
        assert all(h % spec.steps == 0 and w % spec.steps == 0 and h * w <= resolution**2 for h, w in buckets)
        assert all(spec.min_side <= side <= spec.max_side for b in buckets for side in b)
    assert resolve(16)[0].predefined() == [(16, 16)]  # the tests' resolution: one bucket, today's numbers
    assert resolve(96)[0].steps == 32
    assert resolve(512, enabled=False)[0].predefined() == [(512, 512)]


def test_bucket_settings_that_cannot_work_are_config_errors(digits_dir, tmp_path):
    def config(**data):
        return validate_config(quick_config_dict(digits_dir, tmp_path / "r", data=data), "t")

    with pytest.raises(ConfigError, match="bucket_reso_steps = 64 does not divide data.resolution = 96.*to 32"):
        config(resolution=96, bucket_reso_steps=64)
    with pytest.raises(ConfigError, match="bucket_reso_steps = 12 is not a multiple of 8"):
        config(resolution=96, bucket_reso_steps=12)
    with pytest.raises(ConfigError, match="min_bucket_reso = 128 is above data.resolution = 64"):
        config(resolution=64, min_bucket_reso=128)
    with pytest.raises(ConfigError, match="max_bucket_reso = 32 is below data.resolution = 64"):
        config(resolution=64, bucket_reso_steps=16, max_bucket_reso=32)
    config(resolution=64, bucket_reso_steps=64, enable_bucket=False)  # ignored without buckets
    # kohya rounds min down and max up to the step, and says so
    spec, notes = resolve(512, min_side=300, max_side=1000)
    assert (spec.min_side, spec.max_side) == (256, 1024) and len(notes) == 2 and "using 256" in notes[0]


# ------------------------------------------------------------------------------ assignment and crops
def test_each_shape_goes_to_the_nearest_aspect_bucket_and_is_cropped_to_it(tmp_path):
    folder = make_images(tmp_path / "imgs", SHAPES)
    spec, _ = resolve(32, steps=8)
    buckets = spec.predefined()
    for name, (w, h) in SHAPES.items():
        placement = spec.place((h, w))
        bh, bw = placement.bucket
        assert placement.bucket == min(buckets, key=lambda b: abs(b[1] / b[0] - w / h)), name
        rh, rw = placement.resized
        # resized to cover the bucket: one side fits exactly, the other overhangs, the aspect ratio kept
        assert rh >= bh and rw >= bw and (rh == bh or rw == bw), name
        assert abs(rw / rh - w / h) < 0.1 * (w / h), name
        loaded = load_placed(folder / f"{name}.png", spec.place)
        assert loaded.pixels.shape == (3, bh, bw) and loaded.original_size == (h, w) and loaded.bucket == (bh, bw)
        assert loaded.crop_top_left == (round((rh - bh) / 2), round((rw - bw) / 2)), name
        # the crop is the box of the resized image: compare with PIL directly
        with Image.open(folder / f"{name}.png") as image:
            scale = max(bh / h, bw / w)
            resized = image.resize((rw, rh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
        top, left = loaded.crop_top_left
        expected = np.asarray(resized.crop((left, top, left + bw, top + bh)), dtype=np.float32) / 127.5 - 1
        assert torch.equal(loaded.pixels, torch.from_numpy(expected).permute(2, 0, 1)), name
        # a random crop ranges over the overhang; a flip measures left from the other side
        first, last = load_placed(folder / f"{name}.png", spec.place, 0.0), load_placed(folder / f"{name}.png", spec.place, 1.0)
        assert first.crop_top_left == (0, 0) and last.crop_top_left == (rh - bh, rw - bw)
        flipped = load_placed(folder / f"{name}.png", spec.place, 0.0, flip=True)
        assert torch.equal(flipped.pixels, first.pixels.flip(-1)) and flipped.crop_top_left == (0, rw - bw)
    assert spec.place((72, 24)).bucket == (48, 16) and spec.place((30, 90)).bucket == (16, 48)
    assert spec.place((480, 800)).bucket == (24, 40) and spec.place((20, 300)).bucket == (16, 64)
    assert spec.place((6, 6)) == spec.place((40, 40)) == type(spec.place((6, 6)))((32, 32), (32, 32))


def test_a_square_image_gets_exactly_the_pre_bucket_square_crop(tmp_path):
    folder = make_images(tmp_path / "imgs", SHAPES)
    for resolution, steps in ((32, 8), (16, None), (64, 16)):
        spec, _ = resolve(resolution, steps=steps)
        for name in ("square", "tiny", "huge", "wide"):
            path = folder / f"{name}.png"
            w, h = SHAPES[name]
            if w == h:
                assert spec.place((h, w)).bucket == (resolution, resolution)
                loaded = load_placed(path, spec.place)
                expected, crop = old_square_crop(path, resolution)
                assert torch.equal(loaded.pixels, expected) and loaded.crop_top_left == crop
            # load_cropped (one square bucket) is the old crop for every shape, random positions too
            for position in (None, 0.0, 0.3, 1.0):
                pixels, original, crop = load_cropped(path, resolution, position)
                expected, expected_crop = old_square_crop(path, resolution, position)
                assert torch.equal(pixels, expected) and crop == expected_crop and original == (h, w)


def test_bucket_no_upscale_keeps_small_images_at_their_own_size(tmp_path):
    shapes = {"small": (40, 24), "odd": (30, 21), "big": (200, 100), "speck": (5, 3)}
    folder = make_images(tmp_path / "imgs", shapes)
    spec, _ = resolve(32, steps=8, no_upscale=True)
    assert spec.predefined() == []
    # at most 32² px: the own size rounded down to the step, cropped from the unresized image
    for name, bucket in (("small", (24, 40)), ("odd", (16, 24))):
        w, h = shapes[name]
        placement = spec.place((h, w))
        assert placement == type(placement)(bucket, (h, w)), name
        loaded = load_placed(folder / f"{name}.png", spec.place)
        raw = np.asarray(Image.open(folder / f"{name}.png"), dtype=np.float32) / 127.5 - 1
        top, left = loaded.crop_top_left
        assert torch.equal(loaded.pixels, torch.from_numpy(raw[top : top + bucket[0], left : left + bucket[1]]).permute(2, 0, 1))
    # larger: scaled down to about 32² px keeping the aspect ratio (kohya's rounding), never up
    big = spec.place((100, 200))
    assert big.bucket == big.resized == (16, 32)
    # below one step: one step (upscaled; doctor warns)
    assert spec.place((3, 5)).bucket == (8, 8)


# --------------------------------------------------------------------------------------- batches
@pytest.fixture
def mixed(tmp_path):
    """Images of five shapes in uneven numbers (one alone in its bucket), 32 px buckets in steps of 8."""
    shapes = {}
    for i in range(7):
        shapes[f"sq{i}"] = (32 + i, 32 + i)
    for i in range(5):
        shapes[f"tall{i}"] = (20, 50 + i)
    for i in range(3):
        shapes[f"wide{i}"] = (60 + i, 22)
    shapes["strip"] = (120, 18)
    folder = make_images(tmp_path / "mixed", shapes)
    return folder


def mixed_config(folder, out, **sections):
    sections.setdefault("data", {}).update({"resolution": 32, "bucket_reso_steps": 8, "val_split": 0.0,
                                            **sections.get("data", {})})
    return validate_config(quick_config_dict(folder, out, **sections), "t")


def test_every_batch_is_one_bucket_in_an_order_fixed_by_seed_and_epoch(mixed, tmp_path):
    config = mixed_config(mixed, tmp_path / "r", train={"batch_size": 2})
    records = scan_image_folder(mixed)
    batches = TrainBatches(records, config.data, 2, seed=7)
    again = TrainBatches(records, config.data, 2, seed=7)
    buckets = [p.bucket for p in batches.dataset.placements]
    assert len(set(buckets)) == 4
    for epoch in range(3):
        keys = batches.epoch_keys(epoch)
        assert keys == again.epoch_keys(epoch)  # a pure function of (seed, epoch)
        assert len(keys) == batches.batches_per_epoch == 3 + 2 + 1 + 1  # 7 sq, 5 tall, 3 wide: 1 left over each; strip: short
        for batch in keys:
            assert len({buckets[k.record] for k in batch}) == 1
        assert [k.position for batch in keys for k in batch] == list(range(sum(map(len, keys))))
    assert batches.epoch_keys(0) != batches.epoch_keys(1)
    assert TrainBatches(records, config.data, 2, seed=8).epoch_keys(0) != batches.epoch_keys(0)
    # the batches the loader builds carry their bucket, crop and size
    for batch, batch_keys in zip(batches.epoch(1), batches.epoch_keys(1), strict=True):
        bucket = buckets[batch_keys[0].record]
        assert batch.pixels.shape[-2:] == bucket and batch.target_sizes == [bucket] * len(batch)
        assert batch.original_sizes == [(records[k.record].size[1], records[k.record].size[0]) for k in batch_keys]
    # resuming inside the epoch continues exactly there
    assert [b.captions for b in batches.epoch(1, start_batch=4)] == [b.captions for b in list(batches.epoch(1))[4:]]


def test_fractional_repeats_keep_every_epoch_as_long_as_the_plan_says(mixed, tmp_path):
    from dataclasses import replace

    config = mixed_config(mixed, tmp_path / "r", train={"batch_size": 2})
    records = [replace(r, repeats=1.5) if i % 3 == 0 else r for i, r in enumerate(scan_image_folder(mixed))]
    batches = TrainBatches(records, config.data, 2, seed=7)
    buckets = [p.bucket for p in batches.dataset.placements]
    per_epoch = []
    for epoch in range(6):
        keys = batches.epoch_keys(epoch)
        assert len(keys) == batches.batches_per_epoch
        per_epoch.append(sorted(k.record for batch in keys for k in batch))
        assert all(len({buckets[k.record] for k in batch}) == 1 for batch in keys)
    assert len({tuple(p) for p in per_epoch}) > 1  # the extra uses move between epochs


def test_a_folders_own_settings_override_the_data_settings(mixed, tmp_path):
    from dataclasses import replace

    from difftune.data.dataset import SampleKey, TrainDataset
    from difftune.data.records import SubsetOptions

    config = mixed_config(mixed, tmp_path / "r")
    records = scan_image_folder(mixed)
    own = [replace(r, options=SubsetOptions(flip_p=1.0, cond_dropout=1.0)) for r in records]
    plain, flipped = TrainDataset(records, config.data, 7)[SampleKey(0, 0, 0)], TrainDataset(own, config.data, 7)[SampleKey(0, 0, 0)]
    assert torch.equal(flipped.pixels, plain.pixels.flip(-1)) and flipped.caption == "" and plain.caption != ""
    assert TrainDataset([replace(r, options=SubsetOptions()) for r in records], config.data, 7)[SampleKey(0, 0, 0)].caption \
        == plain.caption  # unset options use the data settings


def test_one_bucket_gives_exactly_the_pre_bucket_order(digits_dir, quick_config):
    config = quick_config(train={"batch_size": 5})
    records = scan_image_folder(digits_dir)
    for batch_size in (5, 4, 200):  # a remainder, an even split, a dataset smaller than one batch (wraps)
        batches = TrainBatches(records, config.data, batch_size, seed=7)
        expanded = [i for i, r in enumerate(records) for _ in range(int(r.repeats))]
        count = max(1, len(expanded) // batch_size)
        assert batches.batches_per_epoch == count
        for epoch in range(2):
            order = epoch_order(len(expanded), 7, epoch)
            before = [(expanded[order[pos % len(order)]], pos) for pos in range(count * batch_size)]
            got = [(k.record, k.position) for batch in batches.epoch_keys(epoch) for k in batch]
            assert got == before


def test_the_plan_counts_the_batches_the_dataset_makes_and_doctor_shows_them(mixed, tmp_path):
    from difftune.doctor import format_report
    from difftune.training.plan import make_plan

    make_images(mixed, {"speck": (8, 6)}, seed=3)
    config = mixed_config(mixed, tmp_path / "r", train={"batch_size": 2, "grad_accum": 2, "max_steps": None,
                                                        "max_epochs": 3})
    plan = make_plan(config)
    batches = TrainBatches(plan.train_records, config.data, 2, config.train.seed)
    assert plan.batches_per_epoch == batches.batches_per_epoch == len(batches.epoch_keys(2)) == 8
    assert plan.steps_per_epoch == 4 and plan.total_steps == 12
    rows = {tuple(row["resolution"]): (row["images"], row["samples"], row["batches"]) for row in plan.buckets}
    assert rows == {(32, 32): (8, 8, 4), (16, 48): (5, 5, 2), (48, 16): (3, 3, 1), (64, 16): (1, 1, 1)}
    text = format_report({"plan": plan.to_json(), "warnings": plan.warnings, "extra": {}})
    assert "buckets (width x height: images, batches per epoch):" in text
    assert "  16x48       images 5      batches 2" in text and "  64x16       images 1      batches 1" in text
    warnings = " | ".join(plan.warnings)
    assert "1 bucket(s) hold a single image" in warnings and "64x16" in warnings
    assert "1 bucket(s) have fewer samples per epoch than train.batch_size (2) and train as one short batch" in warnings
    assert "2 sample(s) per epoch do not fill a batch of their bucket" in warnings
    assert "1 image(s) have fewer pixels than the smallest bucket (48x16)" in warnings and "speck.png (8x6)" in warnings


def test_doctor_prints_the_bucket_table(mixed, tmp_path):
    from difftune.doctor import diagnose, format_report

    text = format_report(diagnose(mixed_config(mixed, tmp_path / "r", train={"batch_size": 2})))
    assert "buckets (width x height: images, batches per epoch):\n  16x48       images 5      batches 2\n" \
           "  32x32       images 7      batches 3\n  48x16       images 3      batches 1\n" \
           "  64x16       images 1      batches 1" in text
    assert "bucket(s) hold a single image" in text


# ------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_training_on_mixed_shapes_resumes_bit_exactly(mixed, tmp_path, model):
    from difftune.training.loop import Trainer, train

    common = {"model": {"path": model}, "train": {"batch_size": 2, "max_steps": 4, "lr": 1e-3},
              "data": {"val_split": 0.2, "center_crop": False, "flip_p": 0.5}, "validation": {"every_n_steps": 2}}
    whole = train(mixed_config(mixed, tmp_path / "whole", **common), show_progress=False)
    part = mixed_config(mixed, tmp_path / "part", **common, output={"dir": str(tmp_path / "part"), "save_every_n_steps": 2})
    part.train.max_steps = 2
    train(part, show_progress=False)
    part.train.max_steps = 4
    resumed = train(part, resume=tmp_path / "part", show_progress=False)
    assert resumed["final_val_loss"] == whole["final_val_loss"]
    a = load_file(tmp_path / "whole/checkpoints/final/unet/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "part/checkpoints/final/unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the steps trained on buckets of several shapes
    trainer = Trainer(mixed_config(mixed, tmp_path / "look", **common), show_progress=False)
    shapes = {tuple(b.pixels.shape[-2:]) for b in trainer.batches.epoch(0)}
    trainer.close()
    assert {(32, 32), (48, 16), (16, 48)} <= shapes


# --------------------------------------------------------------------------------- the probe
def test_the_probe_keeps_each_images_bucket_and_is_deterministic(mixed, digits_dir, tmp_path, quick_config):
    from difftune.models import load_model
    from difftune.training.validation import FixedProbe

    config = mixed_config(mixed, tmp_path / "r")
    model = load_model(config.model)
    objective = model.make_objective(config.train)
    records = scan_image_folder(mixed)
    probe = FixedProbe(records, config.data, seed=3, draws_per_image=2, batch_size=3)
    first = probe.evaluate(model, objective)
    second = probe.evaluate(model, objective)
    assert np.array_equal(first.item_losses, second.item_losses) and first.loss == second.loss
    assert probe.num_items == 32 and len(first.item_losses) == 32
    sizes = [tuple(s) for g in probe._groups for s in g.meta.target_sizes]
    assert sizes == sorted(sizes) and set(sizes) == {(32, 32), (48, 16), (16, 48), (16, 64)}
    assert [tuple(g.latents.shape[-2:]) for g in probe._groups] == [(8, 24), (8, 32), (16, 16), (24, 8)]
    again = FixedProbe(list(reversed(records)), config.data, seed=3, draws_per_image=2, batch_size=3)
    assert np.array_equal(again.evaluate(model, objective).item_losses, first.item_losses)
    # one square bucket: exactly the probe of a plain resolution (the pre-bucket probe)
    digits = quick_config()
    digit_records = scan_image_folder(digits_dir)[:10]
    bucketed = FixedProbe(digit_records, digits.data, seed=3, batch_size=4).evaluate(model, objective)
    square = FixedProbe(digit_records, 16, seed=3, batch_size=4).evaluate(model, objective)
    assert np.array_equal(bucketed.item_losses, square.item_losses) and np.array_equal(bucketed.timesteps, square.timesteps)


def test_the_flow_probe_draws_each_buckets_sigma_at_its_latent_size(mixed, tmp_path):
    """Flux's shift grows with the image's tokens: the same stratified quantile is a larger σ in a
    larger bucket; every item keeps its quantile (the draw is shared)."""
    from difftune.models.objectives import FlowMatchObjective
    from difftune.training.validation import FixedProbe

    class Pooling:  # a stand-in model: the probe only encodes while preparing
        vae_scale_factor = 2

        def encode_images(self, pixels, generator=None):
            return torch.nn.functional.avg_pool2d(pixels, 2)

    spec_data = mixed_config(mixed, tmp_path / "r", data={"resolution": 64, "bucket_reso_steps": 16}).data
    records = scan_image_folder(mixed)
    objective = FlowMatchObjective(sampling="flux_shift")
    probe = FixedProbe(records, spec_data, seed=5, batch_size=4)
    probe._prepare(Pooling(), objective)
    generator = torch.Generator().manual_seed(5)
    for group in probe._groups:
        assert torch.equal(group.noise, torch.randn(group.latents.shape, generator=generator))
    for group in probe._groups:
        expected = objective.probe_t(probe.num_items, torch.Generator().set_state(generator.get_state()), group.latent_hw)
        got = probe._timesteps[group.start : group.start + len(group.latents)]
        assert torch.equal(got, expected[group.start : group.start + len(group.latents)])
    levels = torch.cat([objective.level(probe._timesteps[g.start : g.start + len(g.latents)], g.latent_hw)
                        for g in probe._groups])
    n = probe.num_items
    assert torch.allclose(torch.sort(levels).values, (torch.arange(n, dtype=torch.float64) + 0.5) / n)  # stratified
    tokens = [g.latent_hw[0] * g.latent_hw[1] for g in probe._groups]
    assert len(set(tokens)) > 1


def test_a_patch_model_refuses_buckets_its_patches_do_not_fit():
    from difftune.data.batch import Batch
    from difftune.models.objectives import FlowMatchObjective
    from difftune.training.step import check_latent_size

    class Model:
        vae_scale_factor = 8

    check_latent_size(Model(), FlowMatchObjective(), torch.zeros(1, 16, 64, 96))
    with pytest.raises(ConfigError, match="multiple of 16 px.*data.bucket_reso_steps to multiples of 16"):
        check_latent_size(Model(), FlowMatchObjective(), torch.zeros(1, 16, 65, 96))
    assert Batch  # the DDPM objective has no patches: any latent size passes
    check_latent_size(Model(), object(), torch.zeros(1, 4, 65, 97))


def test_bucket_spec_of_a_resolution_is_the_square():
    assert square_spec(24) == BucketSpec(24, enabled=False, steps=24, min_side=24, max_side=24)
    assert square_spec(24).place((10, 50)).bucket == (24, 24)
    assert math.isclose(square_spec(24).place((10, 50)).resized[1], 120)


def test_a_resume_names_the_images_added_removed_or_edited_since_the_run_started(mixed, tmp_path):
    from difftune.training.loop import Trainer, train

    config = mixed_config(mixed, tmp_path / "run", train={"batch_size": 2, "max_steps": 2},
                          output={"dir": str(tmp_path / "run"), "save_every_n_steps": 2})
    train(config, show_progress=False)

    def resume_notes():
        trainer = Trainer(config, resuming=True, show_progress=False)
        trainer.close()
        return [n for n in trainer.notes if n.startswith("the dataset changed")]

    assert resume_notes() == []  # unchanged
    make_images(mixed, {"new": (40, 40)}, seed=5)
    (mixed / "sq0.png").unlink()
    (mixed / "sq0.txt").unlink()
    make_images(mixed, {"sq1": (70, 70)}, seed=6)  # edited: another size
    os.utime(mixed / "tall0.png")  # only touched: not a change
    assert resume_notes() == [
        "the dataset changed since this run last started: 1 train image(s) added (new.png); 1 train image(s) removed "
        "(sq0.png); 1 train image(s) edited (sq1.png). The resumed run trains on the dataset as it is now, so it is "
        "not the run it would have been, and its epochs are counted anew"]
    assert resume_notes() == []  # the manifest follows the dataset the run continued with
