"""Progress bar showing step, it/s, ETA, loss and LR (tqdm on a terminal, periodic lines otherwise)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total: int, initial: int = 0, description: str = "train", enabled: bool = True):
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=description,
            unit="step",
            disable=not enabled,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 10.0,
        )

    def update(self, loss: float, lr: float, val_loss: float | None = None) -> None:
        postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
        if val_loss is not None:
            postfix["val"] = f"{val_loss:.4f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
