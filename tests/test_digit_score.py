"""The sample digit score: a classifier reads the demo's digits, and runs on digit prompts record it."""

from __future__ import annotations

import pytest
from PIL import Image

from difftune.demo import export_digits
from difftune.reporting.digit_score import digit_score, prompted_digit
from difftune.reporting.metrics import read_metrics
from difftune.training.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a handwritten digit seven", "a handwritten digit two"]


def test_the_classifier_reads_the_bundled_digits_and_not_noise_or_the_wrong_digit(tmp_path):
    export_digits(tmp_path, size=32, limit=100)
    paths = sorted(tmp_path.glob("*.png"))
    images = [Image.open(p) for p in paths]
    captions = [p.with_suffix(".txt").read_text() for p in paths]
    assert digit_score(images, captions) == 1.0
    shifted = [c.replace(w, n) for c in captions for w, n in [(c.split()[-1], "one" if "one" not in c else "two")]]
    assert digit_score(images, shifted) <= 0.2  # mostly not the digit the prompt names
    assert digit_score([Image.effect_noise((32, 32), 60) for _ in range(50)], PROMPTS[:1] * 50) <= 0.2
    assert digit_score(images[:2], ["a photo of a cat", PROMPTS[0]]) is None  # only when every prompt names a digit
    assert prompted_digit("A handwritten DIGIT Nine") == 9 and prompted_digit("nine lives") is None


def test_training_on_digit_prompts_records_the_score_and_find_steps_plots_it(quick_config):
    config = quick_config(sample={"prompts": PROMPTS, "every_n_steps": 3, "steps": 2}, train={"max_steps": 3})
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    [record] = [r for r in read_metrics(trainer.run_dir.metrics) if "sample_digit_score" in r]
    assert record["step"] == 3 and record["sample_digit_score"] in (0.0, 0.5, 1.0)  # 2 prompts

    other = quick_config(sample={"prompts": ["a photo"], "every_n_steps": 3, "steps": 2}, train={"max_steps": 3},
                         output={"dir": str(trainer.run_dir.root.parent / "other")})
    trainer = Trainer(other, show_progress=False)
    trainer.run()
    assert not any("sample_digit_score" in r for r in read_metrics(trainer.run_dir.metrics))

    from difftune.tuning.step_finder import find_steps

    result = find_steps(quick_config(sample={"prompts": PROMPTS, "steps": 2}, train={"max_steps": 4},
                                     find_steps={"every_n_steps": 2}), 1e-3, show_progress=False)
    assert [row["step"] for row in result["curve"] if "sample_digit_score" in row] == [2, 4]
