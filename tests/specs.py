"""Study specs shared by several test modules."""

from __future__ import annotations

from pathlib import Path


def tiny_workers_spec(
    tmp_path: Path, *, name: str = "tiny-workers", epochs: int = 1, per_class: int = 10, n_trials: int = 3
) -> Path:
    """A digits study small enough for many worker processes: ResNet18 width 8, no pruner."""
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
name = "{name}"
trainer = "resnet18"
metric = "val_top5"
direction = "maximize"
n_trials = {n_trials}

[train]
dataset = "digits"
loss = "ce"
width = 8
subset_per_class = {per_class}
epochs = {epochs}
batch_size = 32
eval_batch_size = 256
lr = 1e-2

[search.lr]
type = "float"
low = 1e-3
high = 1e-1
log = true

[baseline]
lr = 1e-2

[pruner]
type = "none"

[sampler]
type = "tpe"
seed = 0
""")
    return path
