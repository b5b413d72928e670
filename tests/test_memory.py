"""Memory features (training/memory, data/text_cache.py): the text-embedding cache, fp8 base weights,
block swap and gradient checkpointing of a frozen denoiser. Each must leave the numbers as they are
(exactly, or within fp8's rounding) while changing what is kept where."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch

from conftest import interrupted_then_resumed, quick_config_dict
from difftune.config.loading import validate_config
from difftune.errors import ConfigError
from difftune.reporting.metrics import read_metrics
from difftune.training import memory
from difftune.training.loop import Trainer, train
from difftune.training.step import batch_loss, step_generator

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = {"type": "lora", "rank": 4}
FP8 = torch.float8_e4m3fn


@pytest.fixture
def make(digits_dir, tmp_path):
    """make(name, **sections) -> a Trainer (closed by the fixture) of quick_config with a LoRA."""
    trainers = []

    def build(name: str = "run", **sections) -> Trainer:
        sections = copy.deepcopy(sections)
        sections.setdefault("network", dict(LORA))
        config = validate_config(quick_config_dict(digits_dir, tmp_path / name, **sections), "test")
        trainer = Trainer(config, show_progress=False)
        trainers.append(trainer)
        return trainer

    yield build
    for trainer in trainers:
        trainer.close()


@pytest.fixture
def cpu_block_swap(monkeypatch):
    monkeypatch.setattr(memory, "CPU_BLOCK_SWAP_FOR_TESTS", True)


def steps(trainer: Trainer, n: int = 2) -> list[float]:
    groups, losses = trainer.step_groups(), []
    for _ in range(n):
        losses.append(trainer.optimizer_step(next(groups)))
        trainer.state.step += 1
    return losses


def lora_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.network.state_dict().items()}


def first_batch_grads(trainer: Trainer) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss of step 0's first micro-batch and the LoRA gradients it gives."""
    batch = next(trainer.step_groups())[0]
    loss = batch_loss(trainer.model, trainer.objective, batch, step_generator(trainer.config.train.seed, 0, 0),
                      device=trainer.accelerator.device, autocast=trainer.accelerator.autocast,
                      text_cache=trainer.text_cache)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.network.net.named_parameters() if p.grad is not None}
    trainer.prepared_optimizer.zero_grad(set_to_none=True)
    return loss.item(), grads


def exactly_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ------------------------------------------------------------------------------- text-embedding cache
@pytest.mark.parametrize("path", ["tiny-sd", "tiny-flux", "tiny-sd3"])
def test_text_cache_trains_exactly_as_encoding_every_step(make, path):
    """Caption dropout 0.5 puts the empty caption in the batches too; validation reads the cache."""
    cached = make("cached", model={"path": path}, data={"cond_dropout": 0.5, "cache_text_embeddings": True})
    live = make("live", model={"path": path}, data={"cond_dropout": 0.5, "cache_text_embeddings": False})
    assert cached.text_cache is not None and live.text_cache is None
    captions = {r.caption for r in cached.plan.train_records + cached.plan.val_records}
    assert len(cached.text_cache) == len(captions | {""}) and "" in cached.text_cache
    encoder_calls = count_calls(cached.model.parts["text_encoder"])

    losses = steps(cached, 3)
    if path == "tiny-sd":
        assert losses == steps(live, 3)
        assert exactly_equal(lora_state(cached), lora_state(live))
        assert cached.validate() == live.validate()
    else:  # a caption's T5 output may differ in its last bits between batches of other sizes (CPU-dependent
        # GEMM blocking; seen on AMD EPYC): equal to float rounding, where a wrong embedding is far off
        assert losses == pytest.approx(steps(live, 3), rel=1e-6)
        a, b = lora_state(cached), lora_state(live)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
        assert cached.validate()["val_loss"] == pytest.approx(live.validate()["val_loss"], rel=1e-6)
    assert encoder_calls == [0]  # the cache answered every step and the validation


def test_text_cache_on_sdxl_is_equal_within_rounding(make):
    """SDXL's pooled projection is a (batch x 1280) matmul, and a CPU matmul may round differently for
    another number of rows (one caption alone gives other last bits than five together): the cache,
    filled in batches of unique captions, is promised equal to the step's encoding to float rounding."""
    cached = make("cached", model={"path": "tiny-sdxl"}, data={"cache_text_embeddings": True})
    live = make("live", model={"path": "tiny-sdxl"})
    assert steps(cached, 2) == pytest.approx(steps(live, 2), rel=1e-6)


def test_text_cache_is_on_by_default_for_flux_only(make):
    assert make("flux", model={"path": "tiny-flux"}).text_cache is not None
    assert make("sd").text_cache is None  # auto: SD/SDXL keep encoding (their encoders are small)
    shuffled = make("shuffled", model={"path": "tiny-flux"}, data={"shuffle_tags": True})
    assert shuffled.text_cache is None  # auto never caches captions that change every step


def test_resume_with_the_text_cache_is_bit_exact(digits_dir, tmp_path):
    sections = {"model": {"path": "tiny-flux"}, "network": LORA, "train": {"max_steps": 4},
                "data": {"cond_dropout": 0.3}, "output": {"save_every_n_steps": 2}}
    whole = validate_config(quick_config_dict(digits_dir, tmp_path / "whole", **sections), "test")
    train(whole, show_progress=False)
    part = validate_config(quick_config_dict(digits_dir, tmp_path / "part", **sections), "test")
    interrupted_then_resumed(part, "step-000002", tmp_path / "part")

    def record(run):
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(tmp_path / run / "metrics.jsonl")]

    assert record("whole") == record("part") and len(record("whole")) == 5
    import json

    summary = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert summary["memory"]["text embeddings"].startswith("cached once per caption")


def test_text_cache_refuses_what_it_cannot_store(quick_config):
    with pytest.raises(ConfigError, match=r"data\.cache_text_embeddings = true and data\.shuffle_tags = true"):
        memory.memory_plan(quick_config(data={"cache_text_embeddings": True, "shuffle_tags": True}), cuda=False)
    with pytest.raises(ConfigError, match=r"data\.cache_text_embeddings = true and train\.train_text_encoder"):
        memory.memory_plan(quick_config(data={"cache_text_embeddings": True}, train={"train_text_encoder": True}),
                           cuda=False)
    auto = memory.memory_plan(quick_config(model={"path": "tiny-flux"}, train={"train_text_encoder": True}), cuda=False)
    assert not auto.cache_text


# -------------------------------------------------------------------------------------- fp8 base
def test_fp8_base_trains_a_lora_with_float8_storage(make):
    reference = make("fp32")
    fp8 = make("fp8", model={"base_precision": "fp8"})
    unet = fp8.model.parts["denoiser"]
    linears = [m for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert linears and all(m.weight.dtype == FP8 for m in linears)
    norms = [m for m in unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert all(m.weight.dtype == torch.float32 for m in norms)  # diffusers' skip patterns: norms stay out
    assert all(p.dtype == torch.float32 for p in fp8.network.net.parameters())
    before = lora_state(fp8)

    losses, reference_losses = steps(fp8, 2), steps(reference, 2)
    assert losses[0] == pytest.approx(reference_losses[0], rel=1e-2) and losses[0] != reference_losses[0]
    assert not exactly_equal(lora_state(fp8), before)  # it trained
    assert all(m.weight.dtype == FP8 for m in linears)  # and the weights are stored in fp8 still
    # Backward rebuilt the weights it needed from the float8 storage instead of keeping compute copies.
    assert fp8.saved_weights.rebuilt > 0
    assert fp8.validate()["val_loss"] == pytest.approx(reference.validate()["val_loss"], rel=1e-2)


def test_fp8_stores_flux_modulation_in_float8_as_kohya_does(make):
    """The blocks' modulation Linears (a quarter of Flux's weights) are fp8 too; only the input/output layers
    and position embeddings stay out (diffusers' default "norm" skip would keep them in bf16)."""
    trainer = make("fp8-flux", model={"path": "tiny-flux", "base_precision": "fp8"})
    named = dict(trainer.model.parts["denoiser"].named_modules())
    modulation = [n for n in named if n.endswith(("norm1.linear", "norm1_context.linear", "norm.linear"))]
    assert modulation and all(named[n].weight.dtype == FP8 for n in modulation)
    assert named["proj_out"].weight.dtype != FP8 and named["norm_out.linear"].weight.dtype != FP8
    assert steps(trainer, 1)[0] == pytest.approx(steps(make("fp32-flux", model={"path": "tiny-flux"}), 1)[0], rel=2e-2)


def forward_loss(trainer: Trainer) -> torch.Tensor:
    batch = next(trainer.step_groups())[0]
    return batch_loss(trainer.model, trainer.objective, batch, step_generator(trainer.config.train.seed, 0, 0),
                      device=trainer.accelerator.device, autocast=trainer.accelerator.autocast,
                      text_cache=trainer.text_cache)


def test_fp8_keeps_no_compute_copy_until_backward(make, monkeypatch):
    """Each layer's weight is cast up for its forward; the graph keeps a recipe, not that copy."""
    trainer = make("fp8", model={"base_precision": "fp8"})
    fp8 = {id(p) for p in trainer.fp8_params}
    copies = []
    linear = torch.nn.functional.linear

    def watch(x, weight, bias=None):
        if id(weight._base) in fp8:
            copies.append(weakref.ref(weight.untyped_storage()))
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", watch)
    loss = forward_loss(trainer)
    assert copies and all(copy() is None for copy in copies)  # freed when each layer's forward ended
    loss.backward()
    assert trainer.saved_weights.rebuilt > 0


def test_fp8_with_gradient_checkpointing_and_bf16_compute(make):
    plain = make("plain", model={"base_precision": "fp8"})
    checkpointed = make("ckpt", model={"base_precision": "fp8"}, train={"gradient_checkpointing": True})
    assert steps(plain, 2) == steps(checkpointed, 2)
    bf16 = make("bf16", model={"base_precision": "fp8"}, train={"mixed_precision": "bf16"})
    assert bf16.fp8_params and bf16.memory.compute_precision == "bf16"
    assert all(torch.isfinite(torch.tensor(steps(bf16, 1))))


@pytest.mark.parametrize(("sections", "message"), [
    ({"network": {"type": None}}, "full fine-tune of the denoiser"),
    ({"network": {"type": "lora", "dora": True}}, "network.type = 'lora' with network.dora = true"),
    ({"network": {"type": "boft"}}, "network.type = 'boft'"),
    ({"network": {"type": "ia3"}}, "network.type = 'ia3'"),
])
def test_fp8_refuses_what_reads_the_stored_weight(quick_config, sections, message):
    config = quick_config(model={"base_precision": "fp8"}, **sections)
    with pytest.raises(ConfigError, match=r"model\.base_precision = 'fp8'.*" + message.replace(".", r"\.")):
        memory.memory_plan(config, cuda=True)


def test_explicit_precisions(make, quick_config):
    trainer = make("bf16", model={"base_precision": "bf16", "vae_precision": "fp32"}, train={"mixed_precision": "bf16"})
    parts = trainer.model.parts
    assert parts["denoiser"].dtype == torch.bfloat16 and parts["text_encoder"].dtype == torch.bfloat16
    assert parts["vae"].dtype == torch.float32  # kohya's no_half_vae
    assert torch.isfinite(torch.tensor(steps(trainer, 1)))
    with pytest.raises(ConfigError, match=r"base_precision = 'bf16' needs train\.mixed_precision"):
        memory.memory_plan(quick_config(model={"base_precision": "bf16"}), cuda=True)


def test_samples_decode_with_a_vae_stored_otherwise(make):
    """A bf16 model beside an fp32 VAE: the pipeline's bf16 latents are cast to the VAE's dtype."""
    from difftune.config.schema import SampleConfig
    from difftune.reporting.samples import render_samples

    trainer = make("vae", model={"base_precision": "bf16", "vae_precision": "fp32"}, train={"mixed_precision": "bf16"})
    images = render_samples(trainer.model, SampleConfig(prompts=["a digit"], steps=1), 16)
    assert images[0].size == (16, 16)
    assert "decode" not in trainer.model.parts["vae"].__dict__  # the cast is undone afterwards


# ------------------------------------------------------------------------------------- block swap
def tiny_flux_blocks() -> int:
    from difftune.config.schema import ModelConfig
    from difftune.models import load_model

    return len(load_model(ModelConfig(path="tiny-flux")).denoiser_blocks())


def swapped_block(trainer: Trainer) -> torch.nn.Module:
    return trainer.block_swap.blocks[0]


def on_device(block: torch.nn.Module) -> bool:
    """Stand-in residency: a swapped-out weight is an empty tensor."""
    frozen = [p for p in block.parameters() if not p.requires_grad]
    states = {p.numel() > 0 for p in frozen}
    assert len(states) == 1, "a block is in or out as a whole"
    return states.pop()


@pytest.mark.usefixtures("cpu_block_swap")
@pytest.mark.parametrize("extra", [{}, {"gradient_checkpointing": True}], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("base", ["auto", "fp8"])
@pytest.mark.parametrize("path", ["tiny-flux", "tiny-sd3"])
def test_block_swap_equals_no_swap(make, path, extra, base):
    model = {"path": path, "base_precision": base}
    reference = make("ref", model=model, train=dict(extra))
    swapped = make("swap", model=model, train={**extra, "blocks_to_swap": 1})
    swap = swapped.block_swap
    block = swapped_block(swapped)
    assert block is swapped.model.denoiser_blocks()[-1] and not on_device(block)

    # The block's weights are on the "device" exactly while one of its layers runs, and those copies are
    # freed when its forward ends (no saved tensor keeps them for backward).
    seen, copies = [], []

    def check(layer, args):
        seen.append(on_device(block))
        copies.append(weakref.ref(layer.weight.untyped_storage()))

    for layer in block.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.register_forward_pre_hook(check)
    swap.trace = []
    loss = forward_loss(swapped)
    assert copies and all(copy() is None for copy in copies)  # the graph holds no copy of the block's weights
    loss.backward()
    swapped.prepared_optimizer.zero_grad(set_to_none=True)
    swap.trace, seen = [], []
    loss, grads = first_batch_grads(swapped)
    reference_loss, reference_grads = first_batch_grads(reference)
    assert loss == reference_loss and exactly_equal(grads, reference_grads) and grads
    assert seen and all(seen) and not on_device(block) and swap.resident == set()
    if extra:  # checkpointing runs the block again in backward, and it stays in for that backward
        assert swap.trace == [(0, "in"), (0, "out"), (0, "in"), (0, "out")]
    else:  # backward rebuilds the weights it saved from their CPU copies; the block stays out
        assert swap.trace == [(0, "in"), (0, "out")] and swapped.saved_weights.rebuilt > 0

    assert steps(swapped, 2) == steps(reference, 2)
    assert exactly_equal(lora_state(swapped), lora_state(reference))
    assert swapped.validate() == reference.validate()


def test_block_swap_errors(quick_config, make, cpu_block_swap, monkeypatch):
    with pytest.raises(ConfigError, match="blocks_to_swap is for the transformer families"):
        make("sd", train={"blocks_to_swap": 1})
    n = tiny_flux_blocks()
    with pytest.raises(ConfigError, match=rf"blocks_to_swap = {n}: the model has {n} transformer blocks.*at most {n - 1}"):
        make("flux", model={"path": "tiny-flux"}, train={"blocks_to_swap": n})
    with pytest.raises(ConfigError, match="blocks_to_swap = 1 with a full fine-tune"):
        memory.memory_plan(quick_config(model={"path": "tiny-flux"}, train={"blocks_to_swap": 1}), cuda=True)
    monkeypatch.setattr(memory, "CPU_BLOCK_SWAP_FOR_TESTS", False)
    with pytest.raises(ConfigError, match="blocks_to_swap = 1 needs a CUDA GPU"):
        memory.memory_plan(quick_config(model={"path": "tiny-flux"}, network=LORA, train={"blocks_to_swap": 1}),
                           cuda=False)


# -------------------------------------------------------------------------- gradient checkpointing
def saved_bytes_and_grads(trainer: Trainer) -> tuple[int, float, dict]:
    """Bytes the autograd graph holds after the forward of one batch (what checkpointing saves)."""
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, grads = first_batch_grads(trainer)
    return total[0], loss, grads


@pytest.mark.parametrize("path", ["tiny-sd", "tiny-flux", "tiny-sd3"])
def test_gradient_checkpointing_on_a_lora_run(make, path):
    plain = make("plain", model={"path": path})
    checkpointed = make("ckpt", model={"path": path}, train={"gradient_checkpointing": True})
    denoiser = checkpointed.model.parts["denoiser"]
    assert any(getattr(m, "gradient_checkpointing", False) for m in denoiser.modules())
    plain_bytes, plain_loss, plain_grads = saved_bytes_and_grads(plain)
    bytes_, loss, grads = saved_bytes_and_grads(checkpointed)
    assert bytes_ < 0.8 * plain_bytes  # the blocks' activations are recomputed, not kept
    assert loss == plain_loss
    assert grads.keys() == plain_grads.keys()
    assert all(torch.allclose(grads[k], plain_grads[k], rtol=1e-5, atol=1e-7) for k in grads)


def test_gradient_checkpointing_reaches_a_frozen_denoiser(make):
    """Only a text encoder's LoRA trains: gradients still flow through the denoiser, so it is checkpointed."""
    trainer = make(train={"gradient_checkpointing": True, "train_unet": False, "train_text_encoder": True})
    assert trainer.network.trained_roles() == ["text_encoder"]
    assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.parts["denoiser"].modules())


# ------------------------------------------------------------------------------------------ doctor
def test_doctor_shows_the_memory_plan(quick_config):
    from difftune.doctor import diagnose, format_report

    config = quick_config(model={"path": "tiny-flux", "base_precision": "fp8"}, network=LORA,
                          train={"blocks_to_swap": 1, "gradient_checkpointing": True})
    report = diagnose(config)
    extra = report["extra"]
    assert extra["text embeddings"].startswith("cached once per caption")
    assert extra["frozen weights"].startswith("denoiser fp8 e4m3 storage, fp32 compute")
    assert extra["blocks swapped"] == f"1 of {tiny_flux_blocks()} transformer blocks kept in CPU memory"
    assert any("applies to the denoiser only" in w for w in report["warnings"])
    assert "blocks swapped" in format_report(report)
    plain = diagnose(quick_config())["extra"]
    assert plain["text embeddings"] == "encoded every step" and "blocks swapped" not in plain
