"""What a spec's ``trainer`` names: a config dataclass and the ``fit`` that runs it.

A trainer's ``fit(config, report=None, *, checkpoint_path=None, on_epoch_end=None)``
returns an object with ``history`` (dict of per-epoch lists) and ``metrics`` (the last
epoch's values); ``report(epoch, metrics)`` is called once per epoch with the keys that
the trainer module lists in ``metrics_attribute`` (``HISTORY_KEYS``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from dlops.errors import SpecError


@dataclass(frozen=True)
class Trainer:
    name: str
    module: str  # imported lazily: the autoencoder need not load for ResNet studies
    config_class: str
    fit_function: str = "fit"
    validate_function: str | None = None
    metrics_attribute: str = "HISTORY_KEYS"  # the module's tuple of the keys ``report`` gets each epoch

    def _module(self):
        return importlib.import_module(self.module)

    @property
    def config_cls(self) -> type:
        return getattr(self._module(), self.config_class)

    @property
    def fit(self) -> Callable[..., Any]:
        return getattr(self._module(), self.fit_function)

    @property
    def metrics(self) -> tuple[str, ...]:
        """What the trainer reports after every epoch: a spec's ``metric`` is one of these."""
        return tuple(getattr(self._module(), self.metrics_attribute))

    def validate(self, config: Any) -> None:
        if self.validate_function:
            getattr(self._module(), self.validate_function)(config)


TRAINERS: dict[str, Trainer] = {
    "resnet18": Trainer("resnet18", "dlops.train", "TrainConfig", validate_function="validate_config"),
    "autoencoder": Trainer("autoencoder", "dlops.autoencoder", "AEConfig", validate_function="validate_config"),
}


def get_trainer(name: str) -> Trainer:
    if name not in TRAINERS:
        raise SpecError(f"unknown trainer {name!r} (known: {', '.join(sorted(TRAINERS))})")
    return TRAINERS[name]
