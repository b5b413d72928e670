"""Data: scanning, kohya repeats, errors listing every bad file, deterministic split, augmentation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from difftune.data.records import DatasetError, scan_image_folder
from difftune.data.split import split_records
from difftune.data.transforms import load_image, process_caption


def make_image(path, size=(20, 12), color=(255, 0, 0), caption="a red box"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def test_scan_reads_captions_and_kohya_repeats(tmp_path):
    make_image(tmp_path / "a.png", caption="  a red   box \n")
    make_image(tmp_path / "5_style" / "b.jpg", caption="style")
    make_image(tmp_path / "5_style" / "c.webp", caption="style two")
    records = scan_image_folder(tmp_path, repeats=2)
    by_name = {r.path.name: r for r in records}
    assert set(by_name) == {"a.png", "b.jpg", "c.webp"}
    assert by_name["a.png"].caption == "a red box" and by_name["a.png"].repeats == 2
    assert by_name["b.jpg"].repeats == 10 and by_name["b.jpg"].folder == "5_style"


def test_every_problem_is_listed_before_training(tmp_path):
    make_image(tmp_path / "ok.png")
    make_image(tmp_path / "nocap.png", caption=None)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "corrupt.txt").write_text("x")
    truncated = tmp_path / "cut.jpg"
    make_image(truncated, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(DatasetError) as err:
        scan_image_folder(tmp_path)
    message = str(err.value)
    assert "3 problem(s)" in message
    assert "nocap.png: missing caption file nocap.txt" in message
    assert "corrupt.png: unreadable image" in message
    assert "cut.jpg: unreadable image" in message


def test_unusable_files_and_repeat_folders_stop_the_run_together(tmp_path):
    make_image(tmp_path / "ok.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "anim.gif")
    make_image(tmp_path / "0_char" / "a.png")
    (tmp_path / "3_style").mkdir()
    (tmp_path / "3_style" / "only_caption.txt").write_text("x")
    with pytest.raises(DatasetError) as err:
        scan_image_folder(tmp_path)
    message = str(err.value)
    assert "3 problem(s)" in message
    assert "anim.gif: .gif images are not supported" in message
    assert "0_char: repeat count 0" in message
    assert "3_style: no images in this repeat folder" in message


def test_other_files_are_reported_not_skipped_and_linked_folders_are_followed(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    make_image(data / "a.bmp")
    make_image(data / "b.jfif")
    (data / "orphan.txt").write_text("no image")
    (data / "notes.docx").write_text("x")
    make_image(data / "blank.png", caption="")
    (data / ".DS_Store").write_text("x")  # hidden: ignored
    make_image(elsewhere / "c.png", caption="\ufefflinked, tag")  # a BOM from a Windows editor
    (data / "2_linked").symlink_to(elsewhere, target_is_directory=True)
    notes = []
    records = scan_image_folder(data, notes=notes)
    by_name = {r.path.name: r for r in records}
    assert set(by_name) == {"a.bmp", "b.jfif", "blank.png", "c.png"}
    assert by_name["c.png"].repeats == 2 and by_name["c.png"].caption == "linked, tag"
    assert any("1 caption file(s) without an image" in n and "orphan.txt" in n for n in notes)
    assert any("1 file(s) that are not images" in n and "notes.docx" in n for n in notes)
    assert any("1 caption file(s)" in n and "are empty" in n and "blank.txt" in n for n in notes)


def test_exif_rotation_and_16_bit_grey_load_as_a_viewer_shows_them(tmp_path):
    """Phone photos store their rotation in EXIF; 16-bit PNGs would clip to white in a plain convert."""
    stored = Image.new("RGB", (32, 16), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 16))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display: the red half ends up on top
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    (tmp_path / "phone.txt").write_text("x")
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    (tmp_path / "grey16.txt").write_text("x")
    records = {r.path.name: r for r in scan_image_folder(tmp_path)}
    assert records["phone.jpg"].size == (16, 32)
    pixels = load_image(tmp_path / "phone.jpg", 16, crop_position=0.0)  # the top square
    assert pixels[0].mean() > 0.8 and pixels[2].mean() < -0.8  # red, not half blue
    grey = (load_image(tmp_path / "grey16.png", 16) + 1) * 127.5
    assert abs(grey.mean().item() - 128) < 2


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DatasetError, match="no images found"):
        scan_image_folder(tmp_path)
    with pytest.raises(DatasetError, match=r"data.val_dir = '.*nope' \(/.*nope\): folder not found"):
        scan_image_folder(tmp_path / "nope", key="data.val_dir")


def test_odd_image_modes_load_and_small_images_are_reported(tmp_path, quick_config):
    """Grayscale, palette, CMYK and 16-bit images train like RGB ones; upscaled ones get a warning."""
    from difftune.training.plan import make_plan

    tmp_path = tmp_path / "images"  # beside the run directory quick_config writes to, not around it
    tmp_path.mkdir()
    make_image(tmp_path / "rgb.png", size=(40, 30))
    for name, mode in [("gray.jpg", "L"), ("palette.png", "P"), ("cmyk.jpg", "CMYK")]:
        Image.new("RGB", (40, 30), (10, 200, 30)).convert(mode).save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text(mode)
    Image.fromarray(np.full((24, 24), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    (tmp_path / "deep.txt").write_text("16 bit")
    make_image(tmp_path / "small.png", size=(8, 8))
    for record in scan_image_folder(tmp_path):
        pixels = load_image(record.path, 16)
        assert pixels.shape == (3, 16, 16) and torch.isfinite(pixels).all()
    plan = make_plan(quick_config(data={"train_dir": str(tmp_path), "val_split": 0.0}))
    assert any("1 image(s) are smaller than data.resolution" in w and "small.png (8x8)" in w for w in plan.warnings)


def test_split_is_deterministic_and_depends_only_on_seed_and_names(tmp_path):
    for i in range(20):
        make_image(tmp_path / f"img{i:02d}.png", caption=f"c{i}")
    records = scan_image_folder(tmp_path)
    train1, val1 = split_records(records, tmp_path, 0.2, seed=3)
    train2, val2 = split_records(list(reversed(records)), tmp_path, 0.2, seed=3)
    _, val3 = split_records(records, tmp_path, 0.2, seed=4)
    assert len(val1) == 4 and len(train1) == 16
    assert {r.key for r in val1} == {r.key for r in val2}
    assert {r.key for r in val1} != {r.key for r in val3}
    assert not {r.key for r in val1} & {r.key for r in train1}


def test_load_image_resizes_and_center_crops(tmp_path):
    path = tmp_path / "wide.png"
    array = np.zeros((10, 30, 3), dtype=np.uint8)
    array[:, 10:20] = 255  # a white band in the middle third
    Image.fromarray(array).save(path)
    pixels = load_image(path, 8)
    assert pixels.shape == (3, 8, 8)
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert pixels[:, :, 3:5].mean() > 0.9  # the centre crop is the white band
    left = load_image(path, 8, crop_position=0.0)
    assert left[:, :, 0].mean() < -0.9  # cropping at the left edge starts in black


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)
    assert torch.allclose(load_image(path, 8), torch.ones(3, 8, 8))


def test_caption_dropout_and_tag_shuffle_keep_tokens():
    rng = random.Random(0)
    assert process_caption("a, b", rng, cond_dropout=1.0, shuffle_tags=False, keep_tokens=0) == ""
    caption = "sks person, red hat, smiling, outdoors, blue sky, grass"
    outputs = {process_caption(caption, random.Random(s), cond_dropout=0, shuffle_tags=True, keep_tokens=1) for s in range(20)}
    assert len(outputs) > 1
    for out in outputs:
        tags = out.split(", ")
        assert tags[0] == "sks person" and sorted(tags) == sorted(caption.split(", "))


def test_flip_and_order_are_seeded(digits_dir, quick_config):
    from difftune.data.dataset import SampleKey, TrainDataset, epoch_order
    from difftune.training.plan import make_plan

    config = quick_config(data={"flip_p": 1.0})
    plan = make_plan(config)
    dataset = TrainDataset(plan.train_records, config.data, seed=7)
    item = dataset[SampleKey(0, 0, 0)]
    plain = load_image(plan.train_records[0].path, 16)
    assert torch.equal(item.pixels, plain.flip(-1))
    assert epoch_order(50, 7, 0) == epoch_order(50, 7, 0)
    assert epoch_order(50, 7, 0) != epoch_order(50, 7, 1)
