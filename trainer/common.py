"""What both reference trainers (scikit-learn and PyTorch) read the same way: hparams and settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any


def known_hparams(hparams: dict[str, Any], defaults: dict[str, Any], logger: logging.Logger) -> dict[str, Any]:
    """``defaults`` overridden by the hparams they name; any other hparam is warned about and ignored."""
    unknown = set(hparams) - set(defaults)
    if unknown:
        # A typo in the combinations file would otherwise silently train with a default.
        logger.warning("ignoring unknown hparams: %s", sorted(unknown))
    return {**defaults, **{k: v for k, v in hparams.items() if k in defaults}}


@dataclass(frozen=True)
class EpochSettings:
    """The spec's `settings` both reference trainers understand."""

    epochs: int = 10
    seed: int = 0
    average: str = "macro"  # how F1 averages over classes
    sleep_s: float = 0.0  # a pause after each epoch's checkpoint (tests kill trials mid-run)

    @classmethod
    def read(cls, settings: dict[str, Any]) -> "EpochSettings":
        default = cls()
        return cls(epochs=int(settings.get("epochs", default.epochs)), seed=int(settings.get("seed", default.seed)),
                   average=str(settings.get("average", default.average)),
                   sleep_s=float(settings.get("epoch_sleep_s", default.sleep_s)))
