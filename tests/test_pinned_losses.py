"""Today's losses and weights on the tiny model, pinned as exact floats before the objective refactor.

The training step (training/step.py, `Trainer.optimizer_step`, models/sd.py, training/validation.py)
is about to move into per-family objectives. These numbers were produced by the code as it was before
that refactor (the literals were printed by running the helpers below once, with 1 thread, and pasted
here); the refactor must reproduce them bit for bit. Pinned are:

1. the per-sample loss of one fixed batch (the first micro-batch of step 0, with the latent sample,
   noise and timesteps `Trainer.optimizer_step` draws for it) for epsilon, v-prediction, Min-SNR-5 on
   each, and noise offset 0.1 on each; and the step-0 validation loss of both models;
2. the losses of 3 optimizer steps and a summary of the trained weights after them, for a plain run,
   v-prediction, min_snr_gamma, noise_offset, grad_accum (batch 2 x 2, beside batch 4 and plain batch 2),
   clip_grad_norm and a LoRA;
3. for every option, that its numbers differ from the plain run's, so deleting the option's code fails.

Every comparison is exact (`==` on Python floats). If a refactor legitimately reorders a float sum,
loosen only that number, to a relative tolerance of at most 1e-6, and say why next to it. The numbers
are exact for one build of torch on one CPU kind with 1 thread; another CPU changes the last bits
(oneDNN and MKL pick other kernels: AMD EPYC with AVX-512 differs from the machine the literals below
came from). So the literals are the reference, and tests/assets/pinned_losses/<vendor>-<capability>.json
holds the same numbers for another CPU kind: on a kind with a file the comparison is exact against it;
on a kind without one it is exact against the literals if they match, else within a relative 1e-4 (and
part 3's tests, which compare runs measured on this machine with each other, stay exact everywhere).
A file is written by `python tests/test_pinned_losses.py`, run with the code of a commit that
reproduced the literals exactly, never with new code (the file for AMD EPYC AVX-512 came from 3eb9f97,
whose suite passed on the reference machine).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import quick_config_dict
from difftune.config.loading import validate_config
from difftune.training.loop import Trainer
from difftune.training.step import draw_noise, per_sample_loss, step_generator

PINS_DIR = Path(__file__).parent / "assets" / "pinned_losses"
TOLERANCE_ELSEWHERE = 1e-4
"""Relative tolerance against the reference literals on a CPU kind that has no file of its own."""


def cpu_kind() -> str:
    """'<vendor>-<capability>', e.g. 'AuthenticAMD-AVX512': what decides the kernels' last bits."""
    vendor = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{vendor}-{torch.backends.cpu.get_cpu_capability()}"


def assert_pinned(measured, section: str, name: str | None = None) -> None:
    """measured == this CPU kind's pins (exact), or the reference literals (exact, else within
    TOLERANCE_ELSEWHERE where this kind has no file): the module docstring's rule."""
    reference = REFERENCE[section] if name is None else REFERENCE[section][name]
    path = PINS_DIR / f"{cpu_kind()}.json"
    if path.is_file():
        pins = json.loads(path.read_text())[section]
        assert measured == (pins if name is None else pins[name]), f"pins of {path.name}"
        return
    if measured != reference:
        assert close(measured, reference), f"not within {TOLERANCE_ELSEWHERE} of the reference on {cpu_kind()} " \
                                           f"(no {path.name}): {measured} != {reference}"


def close(a, b) -> bool:
    """Nested dicts and lists of numbers equal within TOLERANCE_ELSEWHERE (integers exactly)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(close, a, b))
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return a == pytest.approx(b, rel=TOLERANCE_ELSEWHERE)


STEPS = 3
# train.seed of every run and of the fixed batch. Not quick_config's 7: with seed 7 the 12 timesteps of
# steps 0-2 all have SNR < 5, where Min-SNR-5 weights an epsilon loss by exactly 1, so the option would
# change nothing. With seed 2 the fixed batch's timesteps are [113, 868, 734, 611] and each of the 3 steps
# draws exactly one timestep with SNR > 5 (t < 147): both sides of the clamp are exercised.
SEED = 2
FULL_PARAM = "denoiser.conv_out.weight"  # a full fine-tune's state_dict keys are "<role>.<parameter>"
LORA_PARAM = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"  # starts at zero

# name -> config sections of the training runs (on top of quick_config_dict: tiny-sd, 16 px, batch 4).
RUNS: dict[str, dict] = {
    "plain": {},
    "v_prediction": {"model": {"path": "tiny-sd-v"}},
    "min_snr_gamma": {"train": {"min_snr_gamma": 5.0}},
    "noise_offset": {"train": {"noise_offset": 0.1}},
    "grad_accum": {"train": {"batch_size": 2, "grad_accum": 2}},  # the same 4 images per step as plain
    "batch_2": {"train": {"batch_size": 2}},  # what grad_accum 2 would be without accumulation
    "clip_grad_norm": {"train": {"clip_grad_norm": 0.01}},  # gradient norms 3.0, 2.5, 2.2: it clips every step
    "lora": {"network": {"type": "lora", "rank": 4}},
}

# ------------------------------------------------------------------------------------ pinned numbers
# 1. The fixed batch: step 0, micro-batch 0 of train.seed 2 (the first 4 training images in epoch order),
# its latent sample, noise and timesteps; the offset noise's extra draw shifts the timesteps too.
PINNED_DRAW = {
    "noise_offset=0.0": {
        "latents_sum": -30.008636061334983,
        "noise_sum": -25.423894432839006,
        "timesteps": [113, 868, 734, 611],
    },
    "noise_offset=0.1": {
        "latents_sum": -30.008636061334983,
        "noise_sum": -38.42318307352252,
        "timesteps": [172, 678, 840, 763],
    },
}
# Per-sample losses of the fixed batch. Min-SNR-5 changes only sample 0 of the epsilon loss (t = 113 is the
# only timestep with SNR > 5); for v-prediction it weights every sample (min(snr, 5) / (snr + 1) < 1).
PINNED_PER_SAMPLE = {
    "epsilon": [1.1522164344787598, 1.1699459552764893, 1.1698576211929321, 1.1772671937942505],
    "epsilon+min_snr_gamma=5": [
        0.8021315932273865,
        1.1699459552764893,
        1.1698576211929321,
        1.1772671937942505,
    ],
    "epsilon+noise_offset=0.1": [
        1.168047308921814,
        1.145559549331665,
        1.1580218076705933,
        1.1673513650894165,
    ],
    "v_prediction": [1.0334383249282837, 0.20236189663410187, 0.25268810987472534, 0.38100677728652954],
    "v_prediction+min_snr_gamma=5": [
        0.6315149664878845,
        0.003958508372306824,
        0.016114944592118263,
        0.05728985369205475,
    ],
    "v_prediction+noise_offset=0.1": [
        0.9681587815284729,
        0.26112058758735657,
        0.20777074992656708,
        0.2742176651954651,
    ],
}
PINNED_VAL_LOSS = {"epsilon": 1.1456466317176819, "v_prediction": 0.5089607586463293}
# The untrained tiny UNet (identical for tiny-sd and tiny-sd-v), summarised as the runs below.
PINNED_INITIAL_WEIGHTS = {
    "sum": 1628.029754544068,
    "sumsq": 3327.3842938815546,
    "first": [0.04751656949520111, -0.008880523964762688, 0.010620584711432457, -0.04420877620577812],
}
# 2. 3 optimizer steps of each run: the losses `optimizer_step` returned, then the sum and sum of squares
# of every trained tensor (the UNet for a full fine-tune, the LoRA parameters for the LoRA) and the first 4
# values of FULL_PARAM (LORA_PARAM for the LoRA). grad_accum's micro_losses are the per-sample losses of
# step 0's two micro-batches, each with its own (step, micro-batch) draw.
PINNED_RUNS = {
    "plain": {
        "losses": [1.167321801185608, 1.0929111242294312, 0.929608941078186],
        "sum": 1625.418257843396,
        "sumsq": 3329.928622736577,
        "first": [0.050076354295015335, -0.006335866637527943, 0.01326863281428814, -0.04627873748540878],
    },
    "v_prediction": {
        "losses": [0.467373788356781, 0.536112904548645, 0.42339006066322327],
        "sum": 1627.688769867176,
        "sumsq": 3329.6917851443477,
        "first": [0.04470006749033928, -0.01154418382793665, 0.00858833733946085, -0.04613332450389862],
    },
    "min_snr_gamma": {
        "losses": [1.0798006057739258, 0.826175332069397, 0.7563140392303467],
        "sum": 1625.8757493720304,
        "sumsq": 3329.862735709789,
        "first": [0.04993538185954094, -0.006487928330898285, 0.013350768946111202, -0.04699300602078438],
    },
    "noise_offset": {
        "losses": [1.1597449779510498, 1.1011040210723877, 0.9528393745422363],
        "sum": 1626.2897305767403,
        "sumsq": 3329.740857616731,
        "first": [0.050336211919784546, -0.00725156906992197, 0.013217090629041195, -0.04701365903019905],
    },
    "grad_accum": {
        "losses": [1.1226556301116943, 1.0880329608917236, 1.0062644481658936],
        "sum": 1621.6607966406073,
        "sumsq": 3329.821608858308,
        "first": [0.04707838594913483, -0.008534695953130722, 0.007906071841716766, -0.045875370502471924],
        "micro_losses": [[1.294480800628662, 1.192090630531311], [0.9715582132339478, 1.032492995262146]],
    },
    "batch_2": {
        "losses": [1.2432856559753418, 1.0661406517028809, 1.0651156902313232],
        "sum": 1624.4957617359314,
        "sumsq": 3330.0232072969284,
        "first": [0.04703430086374283, -0.011384036391973495, 0.007791449781507254, -0.046269483864307404],
    },
    "clip_grad_norm": {
        "losses": [1.167321801185608, 1.09299635887146, 0.9297714233398438],
        "sum": 1625.0695243160299,
        "sumsq": 3329.7495740305203,
        "first": [0.05005135014653206, -0.0064021688885986805, 0.01332005299627781, -0.046203065663576126],
    },
    "lora": {
        "losses": [1.167321801185608, 1.203305721282959, 1.158388376235962],
        "sum": 1.1682295325445011,
        "sumsq": 63.25413633031994,
        "first": [
            0.002485905773937702,
            0.002534229541197419,
            -0.00028215948259457946,
            -0.0004285770992282778,
        ],
    },
}


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Module-scoped so it is in force before the module-scoped measurements below (see test_optim.py:
    the tiny model's ops are too small to split, and 1 thread is also what the literals were made with)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_trainer(digits_dir: Path, out_dir: Path, **sections) -> Trainer:
    sections = copy.deepcopy(sections)
    sections.setdefault("train", {}).update(seed=SEED, max_steps=STEPS)
    config = validate_config(quick_config_dict(digits_dir, out_dir, **sections), "test")
    return Trainer(config, show_progress=False)


def weights_summary(tensors: dict[str, torch.Tensor], key: str) -> dict:
    """Sum and sum of squares (float64, in sorted key order) of all tensors, and 4 values of one."""
    names = sorted(tensors)
    return {
        "sum": sum(tensors[k].double().sum().item() for k in names),
        "sumsq": sum(tensors[k].double().square().sum().item() for k in names),
        "first": tensors[key].flatten()[:4].tolist(),
    }


def micro_batch_draw(trainer: Trainer, batch, step: int = 0, micro: int = 0, noise_offset: float = 0.0):
    """Latents, conditioning, noise and timesteps of one micro-batch, drawn as `Trainer.optimizer_step`
    draws them (same generator, same order of draws, same grad and autocast modes)."""
    model = trainer.model
    generator = step_generator(trainer.config.train.seed, step, micro)
    latents = model.encode_images(batch.pixels.to(trainer.accelerator.device), generator)
    with trainer.accelerator.autocast():
        with torch.no_grad():  # the loop's torch.set_grad_enabled(train_text_encoder = False)
            conditioning = model.condition(model.encode_text(batch.captions), batch)
        noise = draw_noise(latents, generator, noise_offset)
        timesteps = trainer.objective.sample_t(latents.shape[0], generator)
    return latents, conditioning, noise, timesteps


def micro_batch_losses(trainer: Trainer, batch, step: int = 0, micro: int = 0, noise_offset: float = 0.0,
                       min_snr_gamma: float | None = None) -> list[float]:
    latents, conditioning, noise, timesteps = micro_batch_draw(trainer, batch, step, micro, noise_offset)
    objective = trainer.model.make_objective(trainer.config.train.model_copy(update={"min_snr_gamma": min_snr_gamma}))
    with trainer.accelerator.autocast():
        loss = per_sample_loss(trainer.model, objective, latents, conditioning, noise, timesteps)
    return loss.detach().tolist()


def measure_fixed_batch(digits_dir: Path, root: Path) -> dict:
    """Part 1: the draw, the per-sample losses of the fixed batch and the step-0 validation loss."""
    out = {"draw": {}, "per_sample": {}, "val_loss": {}, "batches": {}}
    for kind, path in (("epsilon", "tiny-sd"), ("v_prediction", "tiny-sd-v")):
        trainer = make_trainer(digits_dir, root / f"fixed-{kind}", model={"path": path})
        try:
            batch = next(trainer.step_groups())[0]
            out["batches"][kind] = batch
            if kind == "epsilon":
                out["initial_weights"] = weights_summary(trainer.network.state_dict(), FULL_PARAM)
                for offset in (0.0, 0.1):
                    latents, _, noise, timesteps = micro_batch_draw(trainer, batch, noise_offset=offset)
                    out["draw"][f"noise_offset={offset}"] = {
                        "latents_sum": latents.double().sum().item(),
                        "noise_sum": noise.double().sum().item(),
                        "timesteps": timesteps.tolist(),
                    }
            per_sample = out["per_sample"]
            per_sample[kind] = micro_batch_losses(trainer, batch)
            per_sample[f"{kind}+min_snr_gamma=5"] = micro_batch_losses(trainer, batch, min_snr_gamma=5.0)
            per_sample[f"{kind}+noise_offset=0.1"] = micro_batch_losses(trainer, batch, noise_offset=0.1)
            out["val_loss"][kind] = trainer.validate()["val_loss"]
        finally:
            trainer.close()
    return out


def measure_run(digits_dir: Path, root: Path, name: str) -> dict:
    """Part 2: drive `Trainer.optimizer_step` for 3 steps as test_optim.run_steps does."""
    trainer = make_trainer(digits_dir, root / name, **RUNS[name])
    try:
        out = {}
        if name == "grad_accum":  # step 0's loss from its two micro-batches, by hand, before any step
            first = next(trainer.step_groups())
            out["micro_losses"] = [micro_batch_losses(trainer, batch, micro=i) for i, batch in enumerate(first)]
        groups = trainer.step_groups()
        losses, images = [], []
        for _ in range(STEPS):
            group = next(groups)
            images.append((torch.cat([b.pixels for b in group]), [c for b in group for c in b.captions]))
            losses.append(trainer.optimizer_step(group))
            trainer.state.step += 1
        lora = trainer.config.network.type is not None
        out.update(losses=losses, **weights_summary(trainer.network.state_dict(), LORA_PARAM if lora else FULL_PARAM))
        out["images"] = images
        if lora:
            out["unet"] = weights_summary({f"denoiser.{k}": v for k, v in trainer.model.unet.state_dict().items()},
                                          FULL_PARAM)
        return out
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def fixed(digits_dir, tmp_path_factory) -> dict:
    return measure_fixed_batch(digits_dir, tmp_path_factory.mktemp("pinned-fixed"))


@pytest.fixture(scope="module")
def runs(digits_dir, tmp_path_factory):
    """Each run is measured once, the first time a test asks for it."""
    root = tmp_path_factory.mktemp("pinned-runs")
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = measure_run(digits_dir, root, name)
        return cache[name]

    return get


PINNED_KEYS = ("losses", "sum", "sumsq", "first", "micro_losses")
SUMMARY = ("losses", "sum", "sumsq", "first")


def pinned_part(measured: dict) -> dict:
    """The numbers of a run that PINNED_RUNS holds (micro_losses only for grad_accum)."""
    return {k: measured[k] for k in PINNED_KEYS if k in measured}


def differs(a: dict, b: dict) -> bool:
    """Every summary number of run a differs from run b's: the losses, the sums, the 4 values."""
    return all(a[k] != b[k] for k in SUMMARY)


# ------------------------------------------------------------------------- 1. the fixed batch
def test_fixed_batch_draw_and_per_sample_losses(fixed):
    eps, v = fixed["batches"]["epsilon"], fixed["batches"]["v_prediction"]
    assert torch.equal(eps.pixels, v.pixels) and eps.captions == v.captions  # the same batch
    assert_pinned(fixed["draw"], "draw")
    assert_pinned(fixed["per_sample"], "per_sample")


def test_step_zero_validation_loss(fixed):
    assert_pinned(fixed["val_loss"], "val_loss")


def test_untrained_weights(fixed):
    assert_pinned(fixed["initial_weights"], "initial_weights")


# ---------------------------------------------------------------------------- 2. training runs
@pytest.mark.parametrize("name", list(RUNS))
def test_three_optimizer_steps(runs, name):
    measured = runs(name)
    assert_pinned(pinned_part(measured), "runs", name)
    # The weights moved away from the untrained model's.
    assert measured["sum"] != PINNED_INITIAL_WEIGHTS["sum"] or name == "lora"


def test_first_step_loss_is_the_fixed_batch_loss(fixed, runs):
    """Step 0 of a run sees the fixed batch of part 1, so its loss is that batch's mean per-sample loss."""
    means = {k: torch.tensor(v).mean().item() for k, v in fixed["per_sample"].items()}
    assert runs("plain")["losses"][0] == means["epsilon"]
    assert runs("v_prediction")["losses"][0] == means["v_prediction"]
    assert runs("min_snr_gamma")["losses"][0] == means["epsilon+min_snr_gamma=5"]
    assert runs("noise_offset")["losses"][0] == means["epsilon+noise_offset=0.1"]
    # Clipping acts on the gradient after the loss, and a LoRA's up weights start at zero.
    assert runs("clip_grad_norm")["losses"][0] == runs("plain")["losses"][0]
    assert runs("lora")["losses"][0] == runs("plain")["losses"][0]


def test_grad_accum_differs_from_batch_4_only_as_documented(runs):
    """docs/design.md: noise and timesteps are drawn per (step, micro-batch), and micro-batch losses are
    averaged. So batch 2 x grad_accum 2 trains on the same 4 images per step as batch 4, its step-0 loss
    is the mean of two micro-batch losses with their own draws, and only those draws make it differ."""
    accum, plain = runs("grad_accum"), runs("plain")
    for (pixels, captions), (plain_pixels, plain_captions) in zip(accum["images"], plain["images"], strict=True):
        assert torch.equal(pixels, plain_pixels) and captions == plain_captions
    total = 0.0
    for losses in accum["micro_losses"]:  # the loop's arithmetic: loss.item() / len(group), summed
        assert len(losses) == 2
        total += torch.tensor(losses).mean().item() / 2
    assert accum["losses"][0] == total


def test_lora_trains_only_the_lora(runs):
    """The UNet under a LoRA keeps its untrained weights; only the LoRA parameters (pinned above) move."""
    assert_pinned(runs("lora")["unet"], "initial_weights")


# ------------------------------------------------------------- 3. every option changes the numbers
# Each test compares today's measurements (equal to the pins above), so deleting the option's code makes
# the option's numbers equal the plain ones and fails here as well as in the pins.
def test_v_prediction_changes_the_numbers(fixed, runs):
    # Deleting v-prediction (loss_target's get_velocity branch, or tiny-sd-v's prediction type) makes the
    # v numbers equal the epsilon ones.
    assert fixed["per_sample"]["v_prediction"] != fixed["per_sample"]["epsilon"]
    assert fixed["val_loss"]["v_prediction"] != fixed["val_loss"]["epsilon"]
    assert differs(runs("v_prediction"), runs("plain"))


def test_min_snr_gamma_changes_the_numbers(fixed, runs):
    # Deleting the Min-SNR weighting (per_sample_loss's `if min_snr_gamma`, or the loop passing it) makes
    # these equal the plain numbers; deleting min_snr_weight's v-prediction denominator (snr + 1) makes
    # the v weights equal the epsilon weights.
    per_sample = fixed["per_sample"]
    weights = {}
    for kind in ("epsilon", "v_prediction"):
        assert per_sample[f"{kind}+min_snr_gamma=5"] != per_sample[kind]
        weights[kind] = [w / x for w, x in zip(per_sample[f"{kind}+min_snr_gamma=5"], per_sample[kind], strict=True)]
    assert weights["v_prediction"] != pytest.approx(weights["epsilon"], rel=1e-3)
    assert differs(runs("min_snr_gamma"), runs("plain"))


def test_noise_offset_changes_the_numbers(fixed, runs):
    # Deleting the offset noise (draw_noise_and_timesteps's `if noise_offset > 0`, or the loop passing it)
    # makes the draw, the losses and the weights equal the plain ones.
    assert fixed["draw"]["noise_offset=0.1"]["noise_sum"] != fixed["draw"]["noise_offset=0.0"]["noise_sum"]
    for kind in ("epsilon", "v_prediction"):
        assert fixed["per_sample"][f"{kind}+noise_offset=0.1"] != fixed["per_sample"][kind]
    assert differs(runs("noise_offset"), runs("plain"))


def test_grad_accum_changes_the_numbers(runs):
    # Deleting gradient accumulation (one micro-batch of 2 per optimizer step) makes batch 2 x 2 equal the
    # batch_2 run; it also differs from batch 4 (plain), through its per-micro-batch draws (test above).
    assert differs(runs("grad_accum"), runs("batch_2"))
    assert differs(runs("grad_accum"), runs("plain"))


def test_clip_grad_norm_changes_the_numbers(runs):
    # Deleting the clipping (the loop's `if cfg.train.clip_grad_norm`) makes these equal the plain run's.
    # AdamW is nearly invariant to a constant gradient scale, so the difference is small but exact: the
    # first loss is the same (clipping comes after it), the later losses and the weights are not.
    clipped, plain = runs("clip_grad_norm"), runs("plain")
    assert clipped["losses"][1:] != plain["losses"][1:]
    assert all(clipped[k] != plain[k] for k in ("sum", "sumsq", "first"))


REFERENCE = {"draw": PINNED_DRAW, "per_sample": PINNED_PER_SAMPLE, "val_loss": PINNED_VAL_LOSS,
             "initial_weights": PINNED_INITIAL_WEIGHTS, "runs": PINNED_RUNS}


def write_pins(folder: Path) -> Path:
    """Measure every pinned number on this machine and write this CPU kind's file (see the docstring)."""
    from difftune.demo import export_digits

    torch.set_num_threads(1)
    digits = folder / "digits"
    export_digits(digits / "2_digits", size=16, limit=48)
    fixed = measure_fixed_batch(digits, folder / "fixed")
    pins = {key: fixed[key] for key in ("draw", "per_sample", "val_loss", "initial_weights")}
    pins["runs"] = {name: pinned_part(measure_run(digits, folder / "runs", name)) for name in RUNS}
    PINS_DIR.mkdir(parents=True, exist_ok=True)
    path = PINS_DIR / f"{cpu_kind()}.json"
    path.write_text(json.dumps(pins, indent=1) + "\n")
    return path


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as tmp:
        print(write_pins(Path(tmp)))
