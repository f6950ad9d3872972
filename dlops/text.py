"""Wording shared by every message: counts with the right plural."""

from __future__ import annotations

_ES_ENDINGS = ("s", "x", "z", "ch", "sh")
_PLAIN_S = ("epoch",)  # -ch said as k: epochs, not epoches


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 seed"``, ``"2 seeds"``, ``"0 trials"``; ``many`` where English has its own form.

    The last word of ``word`` takes the plural (``"finished trial"`` -> ``"finished trials"``);
    ``-s/-x/-ch/-sh`` take ``-es`` (``process``, ``class``), consonant + ``y`` takes ``-ies``
    (``study``)."""
    if n == 1:
        return f"1 {word}"
    if many is None:
        if word.endswith(_PLAIN_S):
            many = word + "s"
        elif word.endswith(_ES_ENDINGS):
            many = word + "es"
        elif word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
            many = word[:-1] + "ies"
        else:
            many = word + "s"
    return f"{n:,} {many}"
