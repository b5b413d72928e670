"""Masked training (issue 15): the mask (an image's alpha channel, or a same-name grey image under
data.mask_dir) is resized, cropped and flipped exactly as the image, weights the loss at latent
resolution (kohya's apply_masked_loss: not divided by the mask's area), reaches the validation probe;
regularisation samples are weighted by train.prior_loss_weight."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import quick_config_dict
from difftune.config.loading import validate_config
from difftune.data.batch import Batch
from difftune.data.buckets import resolve
from difftune.data.dataset import SampleKey, TrainBatches, TrainDataset
from difftune.data.records import scan_image_folder
from difftune.data.transforms import load_placed
from difftune.models.objectives import FlowMatchObjective
from difftune.training.step import batch_loss, latent_mask, per_sample_loss, sample_weights

pytestmark = pytest.mark.usefixtures("one_thread")


class Pointwise:
    """A stand-in model whose latents and prediction at a latent pixel depend on that pixel's 2x2 image
    block only, so the pixels under a zero mask can reach nothing the loss sees."""

    vae_scale_factor = 2

    def encode_images(self, pixels, generator=None):
        return torch.nn.functional.avg_pool2d(pixels, 2)

    def encode_text(self, captions):
        return {}

    def condition(self, text, batch):
        return {}

    def predict(self, noisy, t, cond):
        return 0.5 * noisy + noisy**2


def loss_of(pixels, masks, model=None, objective=None, seed=0, **kw):
    batch = Batch(pixels=pixels, captions=[""] * len(pixels), original_sizes=[(16, 24)] * len(pixels),
                  crop_top_lefts=[(0, 0)] * len(pixels), target_sizes=[(16, 24)] * len(pixels), masks=masks,
                  is_reg=kw.pop("is_reg", []))
    return batch_loss(model or Pointwise(), objective or FlowMatchObjective(sampling="uniform"), batch,
                      torch.Generator().manual_seed(seed), device=torch.device("cpu"),
                      autocast=contextlib.nullcontext, **kw)


# ------------------------------------------------------------------------------------------ loss
def test_pixels_under_a_zero_mask_do_not_change_the_loss_and_under_a_one_mask_they_do():
    pixels = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    masks = torch.ones(2, 1, 16, 24)
    masks[:, :, :, :10] = 0.0  # the left 10 columns (5 latent columns) do not train
    changed = pixels.clone()
    changed[:, :, :, :10] = torch.rand(2, 3, 16, 10, generator=torch.Generator().manual_seed(2))
    base = loss_of(pixels, masks)
    assert loss_of(changed, masks) == base
    trained = pixels.clone()
    trained[:, :, :, 12:] = -pixels[:, :, :, 12:]
    assert loss_of(trained, masks) != base
    # without a mask every pixel counts; a mask of ones is exactly no mask; a zero mask trains nothing
    assert loss_of(changed, None) != loss_of(pixels, None)
    assert loss_of(pixels, torch.ones(2, 1, 16, 24)) == loss_of(pixels, None)
    assert loss_of(pixels, torch.zeros(2, 1, 16, 24)) == 0.0


def test_the_mask_is_area_averaged_to_latents_and_not_divided_by_its_area():
    mask = torch.zeros(1, 1, 4, 6)
    mask[0, 0, :2, :2] = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    down = latent_mask(mask, torch.zeros(1, 4, 2, 3))
    assert down.tolist() == [[[[0.75, 0.0, 0.0], [0.0, 0.0, 0.0]]]]
    # per_sample_loss: mean over every latent pixel of mask x squared error (kohya's apply_masked_loss)
    latents, noise = torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 3)
    objective, t = FlowMatchObjective(sampling="uniform"), torch.tensor([0.5])
    error = (Pointwise().predict(objective.noisy(latents, noise, t), t, {}) - objective.target(latents, noise, t)) ** 2
    masked = per_sample_loss(Pointwise(), objective, latents, {}, noise, t, mask=down)
    torch.testing.assert_close(masked, (error * down).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(masked, (error[..., 0, 0].mean() * 0.75 / 6).reshape(1))


def test_reg_samples_are_weighted_by_prior_loss_weight():
    pixels = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ones, zeros = torch.ones(1, 1, 16, 24), torch.zeros(1, 1, 16, 24)
    first = loss_of(pixels, torch.cat([ones, zeros]))  # the training sample's share of the batch mean
    second = loss_of(pixels, torch.cat([zeros, ones]))  # the reg sample's
    plain = loss_of(pixels, None, is_reg=[False, True])
    assert loss_of(pixels, None, is_reg=[False, True], prior_loss_weight=1.0) == plain
    torch.testing.assert_close(plain, first + second)
    torch.testing.assert_close(loss_of(pixels, None, is_reg=[False, True], prior_loss_weight=0.25), first + 0.25 * second)
    torch.testing.assert_close(loss_of(pixels, None, is_reg=[False, True], prior_loss_weight=0.0), first)
    assert loss_of(pixels, None, is_reg=[False, False], prior_loss_weight=0.25) == loss_of(pixels, None)
    assert sample_weights(Batch(None, ["", ""], [], [], [], is_reg=[False, True]), 0.25).tolist() == [1.0, 0.25]
    assert sample_weights(Batch(None, ["", ""], [], [], [], is_reg=[False, False]), 0.25) is None


# ---------------------------------------------------------------------------------------- masks
def pattern(width, height, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


@pytest.fixture
def masked_folder(tmp_path):
    """Non-square images whose alpha channel equals their grey value, the same values as mask files."""
    images, masks = tmp_path / "imgs", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i, (w, h) in enumerate([(52, 36), (24, 60), (40, 40)]):
        grey = pattern(w, h, i)
        rgba = np.stack([grey, grey, grey, grey], axis=-1)
        Image.fromarray(rgba, "RGBA").save(images / f"img{i}.png")
        Image.fromarray(grey, "L").save(masks / f"img{i}.png")
        (images / f"img{i}.txt").write_text(f"picture {i}")
    return images, masks


def test_the_mask_is_resized_cropped_and_flipped_as_the_image(masked_folder, tmp_path):
    images, masks = masked_folder
    spec, _ = resolve(32, steps=8)
    for i in range(3):
        for position, flip in ((None, False), (0.0, True), (1.0, False), (0.7, True)):
            alpha = load_placed(images / f"img{i}.png", spec.place, position, flip, alpha_mask=True)
            from_file = load_placed(images / f"img{i}.png", spec.place, position, flip, mask_path=masks / f"img{i}.png")
            assert alpha.mask.shape == (1, *alpha.bucket) and torch.equal(alpha.mask, from_file.mask)
            # the grey RGB image through the same resize, crop and flip gives the same values
            Image.fromarray(pattern(*Image.open(images / f"img{i}.png").size, i), "L").convert("RGB").save(tmp_path / "g.png")
            grey = load_placed(tmp_path / "g.png", spec.place, position, flip)
            assert grey.crop_top_left == alpha.crop_top_left
            assert torch.allclose((grey.pixels[:1] + 1) / 2, alpha.mask, atol=1e-6)
    # an image without alpha trains everywhere; no mask setting: no mask
    Image.new("RGB", (30, 20), "red").save(tmp_path / "opaque.png")
    opaque = load_placed(tmp_path / "opaque.png", spec.place, alpha_mask=True)
    assert opaque.bucket == (24, 40) and torch.equal(opaque.mask, torch.ones(1, 24, 40))
    assert load_placed(images / "img0.png", spec.place).mask is None


def test_alpha_mask_and_mask_dir_reach_the_batches_and_the_loss(masked_folder, tmp_path):
    from difftune.models import load_model

    images, masks = masked_folder
    base = {"resolution": 32, "bucket_reso_steps": 8, "val_split": 0.0, "flip_p": 0.5, "center_crop": False}
    by_alpha = validate_config(quick_config_dict(images, tmp_path / "a", data={**base, "alpha_mask": True}), "t")
    plain = validate_config(quick_config_dict(images, tmp_path / "p", data=base), "t")
    records = scan_image_folder(images)
    with_files = scan_image_folder(images, mask_dir=masks)
    assert [r.mask_path.name for r in with_files] == ["img0.png", "img1.png", "img2.png"]
    alpha_batches = list(TrainBatches(records, by_alpha.data, 1, seed=3).epoch(0))
    file_batches = list(TrainBatches(with_files, plain.data, 1, seed=3).epoch(0))
    plain_batches = list(TrainBatches(records, plain.data, 1, seed=3).epoch(0))
    assert all(b.masks is None for b in plain_batches)
    model = load_model(plain.model)
    objective = model.make_objective(plain.train)
    for a, f, p in zip(alpha_batches, file_batches, plain_batches, strict=True):
        assert a.masks.shape == (1, 1, *a.pixels.shape[-2:]) and torch.equal(a.masks, f.masks)
        assert torch.equal(a.pixels, p.pixels)  # the same crop and flip (alpha composited on white as always)
        losses = [batch_loss(model, objective, b, torch.Generator().manual_seed(0), device=torch.device("cpu"),
                             autocast=contextlib.nullcontext) for b in (a, f, p)]
        assert losses[0] == losses[1] and losses[0] != losses[2] and losses[0] < losses[2]
    # a sample's mask is the one of its key's crop and flip
    dataset = TrainDataset(records, by_alpha.data, seed=3)
    sample = dataset[SampleKey(0, 0, 0)]
    assert sample.mask is not None and sample.mask.shape[-2:] == sample.pixels.shape[-2:]


def test_the_probe_is_masked_when_a_mask_is_set(masked_folder, tmp_path):
    from difftune.models import load_model
    from difftune.training.validation import FixedProbe

    images, masks = masked_folder
    base = {"resolution": 32, "bucket_reso_steps": 8, "val_split": 0.0}
    by_alpha = validate_config(quick_config_dict(images, tmp_path / "a", data={**base, "alpha_mask": True}), "t")
    plain = validate_config(quick_config_dict(images, tmp_path / "p", data=base), "t")
    model = load_model(plain.model)
    objective = model.make_objective(plain.train)
    records = scan_image_folder(images)
    masked = FixedProbe(records, by_alpha.data, seed=4, batch_size=2)
    from_files = FixedProbe(scan_image_folder(images, mask_dir=masks), plain.data, seed=4, batch_size=2)
    unmasked = FixedProbe(records, plain.data, seed=4, batch_size=2)
    a, f, u = (p.evaluate(model, objective) for p in (masked, from_files, unmasked))
    assert np.array_equal(a.item_losses, f.item_losses) and np.array_equal(a.item_losses, masked.evaluate(model, objective).item_losses)
    assert not np.array_equal(a.item_losses, u.item_losses) and np.array_equal(a.timesteps, u.timesteps)
    assert all(g.meta.masks.shape[-2:] == g.latents.shape[-2:] for g in masked._groups)
    assert all(g.meta.masks is None for g in unmasked._groups)


def test_a_mask_of_another_shape_is_refused(masked_folder, tmp_path):
    from difftune.errors import DatasetError

    images, _ = masked_folder
    Image.new("L", (10, 10), 255).save(tmp_path / "square_mask.png")
    Image.new("L", (26, 18), 255).save(tmp_path / "half_mask.png")  # img0 at half scale: resized
    spec, _ = resolve(32, steps=8)
    with pytest.raises(DatasetError, match="mask is 10x10 but its image .*img0.png is 52x36"):
        load_placed(images / "img0.png", spec.place, mask_path=tmp_path / "square_mask.png")
    half = load_placed(images / "img0.png", spec.place, mask_path=tmp_path / "half_mask.png")
    assert torch.equal(half.mask, torch.ones_like(half.mask))


def test_doctor_says_which_images_train_with_a_mask(masked_folder, tmp_path):
    from difftune.doctor import diagnose

    images, masks = masked_folder
    base = {"resolution": 32, "bucket_reso_steps": 8, "val_split": 0.0}
    by_file = validate_config(quick_config_dict(images, tmp_path / "f", data={**base, "mask_dir": str(masks)}), "t")
    by_alpha = validate_config(quick_config_dict(images, tmp_path / "a", data={**base, "alpha_mask": True}), "t")
    plain = validate_config(quick_config_dict(images, tmp_path / "p", data=base), "t")
    assert diagnose(by_file)["extra"]["masked loss"] == "3 of 3 training images weight their loss by a mask file (mask_dir)"
    assert diagnose(by_alpha)["extra"]["masked loss"].startswith("each image's alpha channel weights its loss")
    assert "masked loss" not in diagnose(plain)["extra"]
