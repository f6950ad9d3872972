"""Cut the official ``tiny-imagenet-200.zip`` down to the sample the tests read.

    python tests/make_tiny_imagenet_sample.py tiny-imagenet-200.zip tiny-imagenet-200-sample.zip
    export DLOPS_TINY_IMAGENET_SAMPLE=$PWD/tiny-imagenet-200-sample.zip

Keeps the official layout: ``wnids.txt``, ``words.txt``, the first 50 training images of
each class (``<wnid>_0`` to ``<wnid>_49``) with their ``_boxes.txt`` lines, the first 10
``val/`` images of each class in ``val_annotations.txt`` order with their lines, and
``test_0`` to ``test_199``. The project's shared copy (md5 3aedffe5d8f9734b88a46c4fe71ed6eb)
has exactly this content: run on it, this script keeps all 12,403 files byte for byte. A
zip written here differs from it in its zip bytes (dates, order), not in its files.
"""

from __future__ import annotations

import argparse
import re
import zipfile
from collections import Counter
from pathlib import Path

ROOT = "tiny-imagenet-200/"


def make_sample(
    official: Path, out: Path, train_per_class: int = 50, val_per_class: int = 10, test_images: int = 200
) -> dict[str, int]:
    """Write the sample zip; returns the images kept per split."""
    kept = Counter()
    with zipfile.ZipFile(official) as src, zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        names = set(src.namelist())

        def copy(name: str, data: bytes | None = None) -> None:
            dst.writestr(src.getinfo(name), src.read(name) if data is None else data)

        wnids = src.read(ROOT + "wnids.txt").decode().split()
        copy(ROOT + "wnids.txt")
        copy(ROOT + "words.txt")
        for w in wnids:
            keep = {f"{w}_{k}.JPEG" for k in range(train_per_class)}
            for file in sorted(keep):
                copy(f"{ROOT}train/{w}/images/{file}")
                kept["train"] += 1
            boxes = f"{ROOT}train/{w}/{w}_boxes.txt"
            if boxes in names:
                lines = [ln for ln in src.read(boxes).decode().splitlines() if ln.split("\t")[0] in keep]
                copy(boxes, ("\n".join(lines) + "\n").encode())
        per_class: Counter = Counter()
        lines = []
        for line in src.read(ROOT + "val/val_annotations.txt").decode().splitlines():
            file, wnid = line.split("\t")[:2]
            if per_class[wnid] < val_per_class:
                per_class[wnid] += 1
                lines.append(line)
                copy(f"{ROOT}val/images/{file}")
                kept["val"] += 1
        copy(ROOT + "val/val_annotations.txt", ("\n".join(lines) + "\n").encode())
        tests = sorted(
            (n for n in names if re.fullmatch(rf"{ROOT}test/images/test_\d+\.JPEG", n)),
            key=lambda n: int(re.findall(r"\d+", n.rsplit("/", 1)[1])[0]),
        )
        for name in tests[:test_images]:
            copy(name)
            kept["test"] += 1
    return dict(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("official", type=Path, help="the official tiny-imagenet-200.zip")
    parser.add_argument("out", type=Path, help="the sample zip to write")
    args = parser.parse_args()
    kept = make_sample(args.official, args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{split} {n:,}" for split, n in kept.items()))


if __name__ == "__main__":
    main()
