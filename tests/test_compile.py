"""train.compile: the denoiser runs through torch.compile (here with the "eager" backend: dynamo traces
the UNet and the LyCORIS layers into graphs but generates no code, so the test takes seconds), trains
the same numbers, and saves the same keys."""

from __future__ import annotations

import pytest
import torch

from difftune.training import loop
from difftune.training.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_compiled_denoiser_trains_the_same_and_saves_the_same_keys(quick_config, monkeypatch):
    monkeypatch.setattr(loop, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        trainer = Trainer(quick_config(network={"type": "lora", "rank": 4}, train={"compile": compiled},
                                       output={"dir": f"{quick_config().output.dir}-{compiled}"}), show_progress=False)
        try:
            assert (trainer.model.parts["denoiser"]._compiled_call_impl is not None) == compiled
            groups = trainer.step_groups()
            losses = [trainer.train_step(next(groups)) for _ in range(3)]
            runs[compiled] = (losses, trainer.validate()["val_loss"], trainer.network.state_dict())
        finally:
            trainer.close()
    (plain, plain_val, plain_state), (fast, fast_val, fast_state) = runs[False], runs[True]
    assert fast == pytest.approx(plain, rel=1e-5) and fast_val == pytest.approx(plain_val, rel=1e-5)
    assert fast_state.keys() == plain_state.keys()
    assert all(torch.allclose(fast_state[k], plain_state[k], rtol=1e-4, atol=1e-6) for k in plain_state)
    torch._dynamo.reset()
