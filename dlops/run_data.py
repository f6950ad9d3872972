"""What data a reference run or a study was measured on, in words for the reports and
``dlops study show`` / ``list``: the dataset, the subset of it (``--subset-classes`` /
``--subset-per-class``), the split sizes, and what guessing would score, which with few
classes is far from 0 (top-5 of 10 classes: 0.5). A reference run's from ``final.json``
alone, a study's from the config it records."""

from __future__ import annotations

from typing import Any


def positive_int(value: Any) -> int | None:
    """``value`` where it is a positive integer (not a bool), else None: a recorded count."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def subset_of(config: Any) -> tuple[int | None, int | None]:
    """The subset a run's config trains on: (classes, training images per class), each None
    for all of them (also where ``config`` is not a config at all)."""
    config = config if isinstance(config, dict) else {}
    return positive_int(config.get("subset_classes")), positive_int(config.get("subset_per_class"))


def subset_text(config: Any) -> str:
    """``"the first 10 classes, 20 training images each"``, or ``""`` for all the data."""
    classes, per_class = subset_of(config)
    if classes and per_class:
        return f"the first {classes} classes, {per_class} training images each"
    if classes:
        return f"the first {classes} classes"
    if per_class:
        return f"the first {per_class} training images of each class"
    return ""


def short_subset_text(config: Any) -> str:
    """:func:`subset_text` for a table cell: ``"10 classes x 20"``, ``"10 classes"``,
    ``"20 per class"``, or ``""`` for all the data."""
    classes, per_class = subset_of(config)
    if classes and per_class:
        return f"{classes} classes x {per_class}"
    return f"{classes} classes" if classes else f"{per_class} per class" if per_class else ""


def chance_text(num_classes: int) -> str:
    """What a model that guesses scores in expectation: top-k = k / classes."""
    top1, top5 = 1 / num_classes, min(5, num_classes) / num_classes
    return f"chance: top-1 {top1:.2f}, top-5 {top5:.2f}"


def data_text(final: dict[str, Any]) -> str:
    """The report's dataset row: name, subset, classes, split sizes and chance level."""
    ds = final["dataset"]
    sizes = ds["splits"]
    subset = subset_text(final.get("config"))
    return (
        f"{ds['name']}{f', subset: {subset}' if subset else ''} ({ds['num_classes']} classes; train {sizes['train']}, "
        f"validation {sizes['val']}, test {sizes['test']}); {chance_text(ds['num_classes'])}"
    )


def data_key(final: dict[str, Any]) -> tuple[Any, ...]:
    """What must match for two runs' test figures to compare: dataset, classes, subset, test size."""
    ds = final["dataset"]
    return (ds["name"], ds["num_classes"], subset_text(final.get("config")), ds["splits"]["test"])


def short_data_text(final: dict[str, Any]) -> str:
    """The index table's dataset cell: ``tiny-imagenet, the first 10 classes, ...; test 100; chance ...``."""
    ds = final["dataset"]
    subset = subset_text(final.get("config"))
    return (
        f"{ds['name']}{f', {subset}' if subset else ''} ({ds['num_classes']} classes, test {ds['splits']['test']}); "
        f"{chance_text(ds['num_classes'])}"
    )


def study_data_text(dataset: str, config: Any, num_classes: int | None) -> str:
    """``dlops study show``'s dataset row: name, subset, classes and chance level (the
    classes where the study records them: ``num_classes``, those of the subset)."""
    subset = subset_text(config)
    known = f" ({num_classes} classes); {chance_text(num_classes)}" if num_classes else ""
    return f"{dataset}{f', subset: {subset}' if subset else ''}{known}"
