"""Several folders with their own settings, regularisation images, float repeats, captions from file
names and mask files: what reaches the records, and how many times each record is used per epoch."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from difftune.config.loading import validate_config
from difftune.data.epoch import epoch_counts, epoch_samples, epoch_size, reg_balance_note
from difftune.data.records import (
    DatasetError,
    ImageRecord,
    SubsetOptions,
    caption_from_filename,
    scan_dataset,
)
from difftune.data.split import split_records
from difftune.errors import ConfigError


def make_image(path: Path, caption: str | None = "a box", size=(12, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def data_config(**data):
    return validate_config({"data": data}, "test").data


def record(name: str, repeats, is_reg: bool = False) -> ImageRecord:
    return ImageRecord(Path(name), "c", repeats, "reg" if is_reg else ".", is_reg=is_reg)


def test_each_subset_brings_its_own_settings_to_its_records(tmp_path):
    make_image(tmp_path / "train" / "a.png")
    make_image(tmp_path / "style" / "2_ink" / "b.png", caption=None)
    (tmp_path / "style" / "2_ink" / "b.caption").write_text("ink, lines")
    make_image(tmp_path / "plain" / "c.png")
    data = data_config(
        train_dir=str(tmp_path / "train"), flip_p=0.5,
        subsets=[
            {"dir": str(tmp_path / "style"), "repeats": 3, "caption_extension": "caption", "shuffle_tags": True,
             "keep_tokens": 1, "flip_p": 0.0, "cond_dropout": 0.2},
            {"dir": str(tmp_path / "plain")},
        ],
    )
    by_name = {r.path.name: r for r in scan_dataset(data)}
    assert by_name["a.png"].options is None and by_name["a.png"].folder == "."  # data.train_dir: as before
    style = by_name["b.png"]
    assert style.caption == "ink, lines" and style.repeats == 6  # the subset's 3 times the folder's 2
    assert style.options == SubsetOptions(flip_p=0.0, cond_dropout=0.2, shuffle_tags=True, keep_tokens=1)
    assert style.folder == f"{tmp_path}/style/2_ink" and not style.is_reg
    assert by_name["c.png"].options == SubsetOptions() and by_name["c.png"].repeats == 1
    assert data_config(subsets=[{"dir": "x", "shuffle_tags": True}]).shuffles_tags


def test_folder_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"repeats = 1.5 with is_reg = true"):
        data_config(subsets=[{"dir": "r", "repeats": 1.5, "is_reg": True}])
    with pytest.raises(ConfigError, match=r"data.subsets\[0\].keep_tokens only has an effect"):
        data_config(subsets=[{"dir": "s", "keep_tokens": 2}])
    with pytest.raises(ConfigError, match="data.mask_dir holds the masks of data.train_dir"):
        data_config(subsets=[{"dir": "s"}], mask_dir="m")
    make_image(tmp_path / "a" / "x.png")
    make_image(tmp_path / "a" / "inner" / "y.png")
    with pytest.raises(DatasetError, match=r"data.train_dir = .* and data.subsets\[0\].dir = .*inner' overlap"):
        scan_dataset(data_config(train_dir=str(tmp_path / "a"), subsets=[{"dir": str(tmp_path / "a" / "inner")}]))
    with pytest.raises(DatasetError, match=r"data.val_dir = .*inner' overlaps data.subsets\[0\].dir"):
        scan_dataset(data_config(subsets=[{"dir": str(tmp_path / "a")}], val_dir=str(tmp_path / "a" / "inner")))
    with pytest.raises(DatasetError, match="only regularisation folders are set"):
        scan_dataset(data_config(reg_dir=str(tmp_path / "a")))


def test_multiply_txt_sets_its_folders_repeats(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "half" / "b.png")
    (tmp_path / "half" / "multiply.txt").write_text("0.5\n")
    make_image(tmp_path / "half" / "deeper" / "c.png")  # EveryDream2: multiply.txt is not inherited
    notes = []
    by_name = {r.path.name: r.repeats for r in scan_dataset(data_config(train_dir=str(tmp_path), repeats=3), notes)}
    assert by_name == {"a.png": 3, "b.png": 1.5, "c.png": 3}
    assert not any("multiply.txt" in n for n in notes)  # not reported as a caption without an image
    (tmp_path / "3_x").mkdir()
    make_image(tmp_path / "3_x" / "d.png")
    (tmp_path / "3_x" / "multiply.txt").write_text("2")
    (tmp_path / "half" / "multiply.txt").write_text("lots")
    with pytest.raises(DatasetError) as err:
        scan_dataset(data_config(train_dir=str(tmp_path)))
    assert "2 problem(s)" in str(err.value)
    assert "3_x/multiply.txt: both this file and the folder name '3_x' set the repeats" in str(err.value)
    assert "half/multiply.txt: expected one number" in str(err.value)


def test_integer_repeats_without_reg_are_todays_expanded_list():
    records = [record("a", 2), record("b", 1), record("c", 5)]
    expected = [0, 0, 1, 2, 2, 2, 2, 2]
    assert all(epoch_samples(records, seed, epoch) == expected for seed in (0, 7) for epoch in range(3))
    assert epoch_size(records) == 8 and reg_balance_note(records) is None


def test_fractional_repeats_use_that_share_of_the_epochs():
    """Four images x 1.5: each epoch uses every image once and two of them twice (6 samples); over 400
    epochs each image's second use comes in about half of them, from (seed, epoch) alone."""
    records = [record(f"{i}.png", 1.5) for i in range(4)] + [record("whole.png", 2)]
    uses = Counter()
    for epoch in range(400):
        counts = epoch_counts(records, 3, epoch)
        assert sum(counts) == 8 and counts[4] == 2 and all(c in (1, 2) for c in counts[:4])
        uses.update(epoch_samples(records, 3, epoch))
    assert [uses[i] for i in range(5)] == [598, 628, 594, 580, 800]  # 1.5 x 400 = 600 each, give or take
    assert epoch_samples(records, 3, 5) == epoch_samples(list(records), 3, 5)  # a pure function
    assert len({tuple(epoch_samples(records, 3, e)) for e in range(8)}) > 1  # the picks change per epoch
    assert any(epoch_samples(records, 3, e) != epoch_samples(records, 4, e) for e in range(8))  # and per seed


def test_fractions_that_do_not_sum_to_a_whole_round_to_nearest_and_cap_at_one():
    """0.9 + 0.3 + 0.3 = 1.5 -> 2 picks per epoch: 0.9's share (1.2) is capped, so it is always used and
    the other two share the remaining pick (each in half the epochs). A lone 0.5 is used every epoch
    rather than never (EveryDream2's floor would drop it)."""
    records = [record("a", 0.9), record("b", 0.3), record("c", 0.3)]
    uses = Counter(i for epoch in range(200) for i in epoch_samples(records, 1, epoch))
    assert all(epoch_size(records) == 2 == len(epoch_samples(records, 1, e)) for e in range(5))
    assert uses[0] == 200 and uses[1] + uses[2] == 200 and abs(uses[1] - 100) < 20
    assert epoch_samples([record("lone", 0.5)], 1, 0) == [0]


def test_groups_whose_fractions_sum_to_a_whole_keep_their_count_fixed():
    records = [record(f"{i}", 1.5) for i in range(4)]
    groups = ["wide", "wide", "tall", "tall"]
    for epoch in range(20):
        counts = epoch_counts(records, 2, epoch, groups)
        assert counts[0] + counts[1] == 3 and counts[2] + counts[3] == 3


def test_fractions_are_pooled_across_groups_so_every_record_keeps_its_share():
    """Three 0.5 images, each alone in its bucket: 2 samples per epoch (round(1.5)), each image in about
    two epochs of three; drawn per bucket, each would round up to 1 and train every epoch."""
    records = [record(f"{i}", 0.5) for i in range(3)]
    groups = ["tall", "square", "wide"]
    uses = Counter()
    for epoch in range(300):
        counts = epoch_counts(records, 5, epoch, groups)
        assert sum(counts) == 2 and max(counts) == 1
        uses.update(i for i, c in enumerate(counts) if c)
    assert [uses[i] for i in range(3)] == [203, 200, 197]  # 2/3 x 300 = 200 each, give or take
    # ten 0.1 images in ten buckets: one sample per epoch, each image in about one epoch of ten
    records = [record(f"{i}", 0.1) for i in range(10)]
    uses = Counter()
    for epoch in range(500):
        counts = epoch_counts(records, 1, epoch, list(range(10)))
        assert sum(counts) == 1
        uses.update(i for i, c in enumerate(counts) if c)
    assert sum(uses.values()) == 500 and max(uses.values()) < 80 and min(uses.values()) > 20


def test_reg_images_are_balanced_by_kohyas_rule():
    train = [record(f"t{i}", 3) for i in range(4)]  # 12 training samples per epoch
    # too few reg samples (1+2+5+1+1 = 10): one more use each, in order, until 12
    reg = [record(f"r{i}", n, is_reg=True) for i, n in enumerate([1, 2, 5, 1, 1])]
    assert epoch_counts(train + reg, 0, 0)[4:] == [2, 3, 5, 1, 1]
    # exactly 5 x 1: 12 = 5 + 5 + 2
    reg = [record(f"r{i}", 1, is_reg=True) for i in range(5)]
    assert epoch_counts(train + reg, 0, 0)[4:] == [3, 3, 2, 2, 2]
    # too many: the first ones in order until 12 is reached (the last keeps all its repeats), the rest unused
    reg = [record(f"r{i}", n, is_reg=True) for i, n in enumerate([4, 4, 3, 4, 4, 1])]
    counts = epoch_counts(train + reg, 5, 9)
    assert counts[4:] == [4, 4, 3, 4, 0, 0] and epoch_size(train + reg) == 12 + 15
    assert "2 of 6 regularisation images are never used" in reg_balance_note(train + reg)


def test_reg_dir_images_take_their_class_and_are_never_validated(tmp_path):
    for i in range(10):
        make_image(tmp_path / "train" / f"t{i}.png", caption=f"sks dog {i}")
    for i in range(6):
        make_image(tmp_path / "reg" / "1_dog" / f"r{i}.png", caption=None)  # kohya: the class is the caption
    make_image(tmp_path / "reg" / "1_dog" / "captioned.png", caption="a brown dog")
    data = data_config(train_dir=str(tmp_path / "train"), reg_dir=str(tmp_path / "reg"), val_split=0.5)
    records = scan_dataset(data)
    reg = [r for r in records if r.is_reg]
    assert len(reg) == 7 and {r.caption for r in reg} == {"dog", "a brown dog"}
    assert {r.folder for r in reg} == {f"{tmp_path}/reg/1_dog"}
    for seed in range(20):
        train, val = split_records(records, None, 0.5, seed)
        assert len(val) == 5 and not any(r.is_reg for r in val)  # half of the 10 training images only
        assert sum(r.is_reg for r in train) == 7
    train, _ = split_records(records, None, 0.5, 0)
    assert sorted(epoch_counts(train, 0, 0)[5:]) == [0, 0, 1, 1, 1, 1, 1]  # 5 training samples: 5 reg ones


def test_the_union_of_folders_is_split_and_train_dir_alone_splits_as_before(tmp_path):
    import hashlib

    for i in range(10):
        make_image(tmp_path / "train" / "3_a" / f"t{i}.png")
        make_image(tmp_path / "more" / f"t{i}.png")
    alone = scan_dataset(data_config(train_dir=str(tmp_path / "train")))
    both = scan_dataset(data_config(train_dir=str(tmp_path / "train"), subsets=[{"dir": str(tmp_path / "more")}]))
    _, val_alone = split_records(alone, tmp_path / "train", 0.2, 4)
    _, val_union = split_records(both, None, 0.2, 4)
    assert len(val_alone) == 2 and len(val_union) == 4  # the union is split, not each folder

    def before(r):  # the split's score before subsets existed: the path relative to data.train_dir
        relative = r.path.relative_to(tmp_path / "train").as_posix()
        return int.from_bytes(hashlib.sha256(f"4:{relative}".encode()).digest()[:8], "big")

    assert {r.key for r in val_alone} == {r.key for r in sorted(alone, key=before)[:2]}


def test_caption_from_filename(tmp_path):
    assert caption_from_filename(Path("a red box_03.png")) == "a red box"
    assert caption_from_filename(Path("person_ (2).jpg")) == "person"
    assert caption_from_filename(Path("a red box (2).png")) == "a red box"
    assert caption_from_filename(Path("cat.png")) == "cat"
    make_image(tmp_path / "a dog_1.png", caption=None)
    make_image(tmp_path / "two cats (3).jpg", caption=None)
    make_image(tmp_path / "captioned_9.png", caption="from the file")
    with pytest.raises(DatasetError) as err:  # off (the default): a missing caption is an error
        scan_dataset(data_config(train_dir=str(tmp_path)))
    assert "2 problem(s)" in str(err.value) and "a dog_1.png: missing caption file a dog_1.txt" in str(err.value)
    assert "data.caption_from_filename = true" in str(err.value)
    records = scan_dataset(data_config(train_dir=str(tmp_path), caption_from_filename=True))
    assert {r.path.name: r.caption for r in records} == {
        "a dog_1.png": "a dog", "two cats (3).jpg": "two cats", "captioned_9.png": "from the file",
    }
    make_image(tmp_path / "_007.png", caption=None)
    with pytest.raises(DatasetError, match="_007.png: no caption file _007.txt, and the file name gives an empty"):
        scan_dataset(data_config(train_dir=str(tmp_path), caption_from_filename=True))


def test_mask_dir_finds_each_images_mask_and_reports_a_missing_one(tmp_path):
    make_image(tmp_path / "train" / "a.png")
    make_image(tmp_path / "train" / "5_x" / "b.jpg")
    make_image(tmp_path / "masks" / "a.jpg", caption=None)  # any image extension
    make_image(tmp_path / "masks" / "5_x" / "b.png", caption=None)
    make_image(tmp_path / "masks" / "stray.png", caption=None)
    notes = []
    data = data_config(train_dir=str(tmp_path / "train"), mask_dir=str(tmp_path / "masks"))
    masks = {r.path.name: r.mask_path for r in scan_dataset(data, notes)}
    assert masks == {"a.png": tmp_path / "masks" / "a.jpg", "b.jpg": tmp_path / "masks" / "5_x" / "b.png"}
    assert notes == [f"1 mask(s) in {tmp_path}/masks have no image in {tmp_path}/train and are not used; "
                     f"e.g. {tmp_path}/masks/stray.png"]
    make_image(tmp_path / "train" / "5_x" / "c.png")
    (tmp_path / "masks" / "a.jpg").unlink()
    make_image(tmp_path / "masks" / "a.png", caption=None, size=(6, 8))
    with pytest.raises(DatasetError) as err:
        scan_dataset(data, notes)
    message = str(err.value)
    assert "2 problem(s)" in message
    assert f"5_x/c.png: no mask c.* in {tmp_path}/masks/5_x (data.mask_dir;" in message
    assert "masks/a.png: the mask is 6x8, its image a.png is 12x8 (a mask must have its image's shape" in message
    make_image(tmp_path / "masks" / "a.png", caption=None, size=(6, 4))  # the same shape at half the scale
    make_image(tmp_path / "masks" / "5_x" / "c.png", caption=None, size=(24, 16))
    assert {r.path.name: r.mask_path.name for r in scan_dataset(data)} == {"a.png": "a.png", "b.jpg": "b.png",
                                                                           "c.png": "c.png"}
    subset = data_config(subsets=[{"dir": str(tmp_path / "train"), "mask_dir": str(tmp_path / "train" / "5_x")}])
    with pytest.raises(DatasetError, match=r"data.subsets\[0\].mask_dir = .* overlaps"):
        scan_dataset(subset)


def test_folders_kohya_users_may_expect_to_count_are_named(tmp_path):
    make_image(tmp_path / "5_char" / "a.png")
    (tmp_path / "5_char" / "empty").mkdir()
    (tmp_path / "5_char" / "captions_only").mkdir()
    (tmp_path / "5_char" / "captions_only" / "x.txt").write_text("x")
    notes = []
    records = scan_dataset(data_config(train_dir=str(tmp_path / "5_char")), notes)
    assert [r.repeats for r in records] == [1]  # as kohya: N_ counts in the subfolders only
    assert any(f"data.train_dir = '{tmp_path / '5_char'}' is itself a repeat folder ('5_char'): its 5 is not "
               "applied" in n for n in notes)
    assert f"2 subfolder(s) of {tmp_path / '5_char'} hold no images and are not used: captions_only, empty" in notes


@pytest.mark.parametrize("inside", ["output", "cache"])
def test_a_run_or_cache_inside_a_dataset_folder_is_refused(tmp_path, inside):
    from difftune.training.plan import make_plan

    make_image(tmp_path / "data" / "a.png")
    make_image(tmp_path / "data" / "b.png")
    config = {"data": {"train_dir": str(tmp_path / "data"), "val_split": 0},
              "output": {"dir": str(tmp_path / ("data/run" if inside == "output" else "run"))}}
    if inside == "cache":
        config["data"].update(cache_latents="disk", latent_cache_dir=str(tmp_path / "data" / "cache"))
    key = "output.dir" if inside == "output" else "data.latent_cache_dir"
    with pytest.raises(DatasetError, match=f"{key} = .* is inside data.train_dir = .*: the run would write its "
                                           "files among your images"):
        make_plan(validate_config(config, "t"))
    config["output"]["dir"] = str(tmp_path / "run")
    config["data"].pop("latent_cache_dir", None)
    assert make_plan(validate_config(config, "t")).total_steps > 0  # beside the dataset is fine


def test_an_unknown_subset_key_lists_the_subset_keys():
    with pytest.raises(ConfigError, match=r"data.subsets.0.flip: unknown key; did you mean 'data.subsets.0.flip_p'\?; "
                                          r"valid keys here: dir, repeats, caption_extension"):
        data_config(subsets=[{"dir": "x", "flip": 0.5}])


def test_a_mask_that_is_black_everywhere_is_named(tmp_path):
    make_image(tmp_path / "train" / "a.png")
    make_image(tmp_path / "train" / "b.png")
    (tmp_path / "masks").mkdir()
    Image.new("L", (12, 8), 0).save(tmp_path / "masks" / "a.png")
    Image.new("L", (12, 8), 255).save(tmp_path / "masks" / "b.png")
    notes = []
    scan_dataset(data_config(train_dir=str(tmp_path / "train"), mask_dir=str(tmp_path / "masks")), notes)
    assert f"1 mask(s) in {tmp_path / 'masks'} are black everywhere, so their images train nothing (they still " \
           f"take their place in batches); e.g. {tmp_path / 'masks' / 'a.png'}" in notes
