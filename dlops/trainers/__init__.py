"""The trainers a spec's ``trainer`` names, one module each: ``get_trainer(name)``.

Each module in :data:`TRAINER_MODULES` defines ``TRAINER``, a
:class:`dlops.trainers.base.Trainer`. Modules are imported on first use, so importing
this package loads no torch, and a ResNet study never loads the autoencoder. Adding a
trainer: one module with its ``TRAINER``, and one entry here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dlops.errors import SpecError

if TYPE_CHECKING:
    from dlops.trainers.base import Trainer

TRAINER_MODULES: dict[str, str] = {
    "resnet18": "dlops.trainers.resnet",
    "autoencoder": "dlops.trainers.autoencoder",
}


def get_trainer(name: str) -> Trainer[Any]:
    """The trainer called ``name``; an unknown name is a :class:`SpecError`."""
    if not isinstance(name, str) or name not in TRAINER_MODULES:  # a list would be unhashable
        raise SpecError(f"unknown trainer {name!r} (known: {', '.join(sorted(TRAINER_MODULES))})")
    return importlib.import_module(TRAINER_MODULES[name]).TRAINER
