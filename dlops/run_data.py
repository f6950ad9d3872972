"""What data a reference run was measured on, in words for the reports: the dataset, the
subset of it (``--subset-classes`` / ``--subset-per-class``), the split sizes, and what
guessing would score, which with few classes is far from 0 (top-5 of 10 classes: 0.5).
From ``final.json`` alone."""

from __future__ import annotations

from typing import Any


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def subset_text(final: dict[str, Any]) -> str:
    """``"the first 10 classes, 20 training images each"``, or ``""`` for all the data."""
    config = final.get("config")
    config = config if isinstance(config, dict) else {}
    classes, per_class = _positive_int(config.get("subset_classes")), _positive_int(config.get("subset_per_class"))
    if classes and per_class:
        return f"the first {classes} classes, {per_class} training images each"
    if classes:
        return f"the first {classes} classes"
    if per_class:
        return f"the first {per_class} training images of each class"
    return ""


def chance_text(num_classes: int) -> str:
    """What a model that guesses scores in expectation: top-k = k / classes."""
    top1, top5 = 1 / num_classes, min(5, num_classes) / num_classes
    return f"chance: top-1 {top1:.2f}, top-5 {top5:.2f}"


def data_text(final: dict[str, Any]) -> str:
    """The report's dataset row: name, subset, classes, split sizes and chance level."""
    ds = final["dataset"]
    sizes = ds["splits"]
    subset = subset_text(final)
    return (
        f"{ds['name']}{f', subset: {subset}' if subset else ''} ({ds['num_classes']} classes; train {sizes['train']}, "
        f"validation {sizes['val']}, test {sizes['test']}); {chance_text(ds['num_classes'])}"
    )


def data_key(final: dict[str, Any]) -> tuple[Any, ...]:
    """What must match for two runs' test figures to compare: dataset, classes, subset, test size."""
    ds = final["dataset"]
    return (ds["name"], ds["num_classes"], subset_text(final), ds["splits"]["test"])


def short_data_text(final: dict[str, Any]) -> str:
    """The index table's dataset cell: ``tiny-imagenet, the first 10 classes, ...; test 100; chance ...``."""
    ds = final["dataset"]
    subset = subset_text(final)
    return (
        f"{ds['name']}{f', {subset}' if subset else ''} ({ds['num_classes']} classes, test {ds['splits']['test']}); "
        f"{chance_text(ds['num_classes'])}"
    )
