"""A file too large for one device call, sent in parts over several calls and joined there.

The device tool takes at most 64 MiB of files per call and keeps what a call leaves on the
machine for the next call while the machine stays warm. So a 231 MiB archive goes as parts of
a few dozen MiB, one call after another, and the last call joins them and checks the whole.
Standard library only: it runs on the GPU machine before anything is installed.

    python benchmarks/device_parts.py split ZIP DIR [--part-mib 48]
        DIR/part-01, part-02, ... and DIR/MANIFEST.json (name, size and md5 of the whole and
        of each part)
    python benchmarks/device_parts.py collect SRC DEST
        move the parts that came with this call from SRC into DEST (with the manifest); a
        part whose size or md5 is wrong is deleted and named, the others are kept
    python benchmarks/device_parts.py join DEST OUT_FILE
        exit 0: OUT_FILE is whole (joined now or earlier) and matches the manifest's md5;
        exit 3: parts are missing (named); exit 1: the joined file does not match
    python benchmarks/device_parts.py plan DIR [--extra PATH ...] [--limit-mib 63]
        the carry list of each call (as JSON lines), the EXTRA paths (wheels) with the last
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

MANIFEST = "MANIFEST.json"
MiB = 1024 * 1024
MISSING = 3


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise SystemExit(f"error: no {MANIFEST} in {folder}")
    return json.loads(path.read_text())


def split(source: Path, dest: Path, part_mib: float) -> dict[str, Any]:
    """Cut ``source`` into parts of ``part_mib`` MiB (the last one smaller) under ``dest``."""
    if not source.is_file():
        raise SystemExit(f"error: {source}: no such file")
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("part-*"):
        old.unlink()
    size = source.stat().st_size
    step = int(part_mib * MiB)
    parts = []
    whole = hashlib.md5()
    with source.open("rb") as f:
        for k in range(1, -(-size // step) + 1):
            name = f"part-{k:02d}"
            chunk = f.read(step)
            whole.update(chunk)
            (dest / name).write_bytes(chunk)
            parts.append({"name": name, "size": len(chunk), "md5": hashlib.md5(chunk).hexdigest()})
    manifest = {"name": source.name, "size": size, "md5": whole.hexdigest(), "parts": parts}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _part_ok(path: Path, part: dict[str, Any]) -> bool:
    return path.is_file() and path.stat().st_size == part["size"] and md5_of(path) == part["md5"]


def collect(source: Path, dest: Path) -> tuple[list[str], list[str]]:
    """Move this call's parts from ``source`` into ``dest``; returns (kept, rejected)."""
    manifest = read_manifest(source)
    dest.mkdir(parents=True, exist_ok=True)
    if (dest / MANIFEST).is_file() and read_manifest(dest)["md5"] != manifest["md5"]:
        # Parts of another file: start over rather than join a mixture.
        for old in dest.iterdir():
            old.unlink()
    shutil.copyfile(source / MANIFEST, dest / MANIFEST)
    kept, rejected = [], []
    for part in manifest["parts"]:
        came = source / part["name"]
        if not came.is_file():
            continue
        if _part_ok(came, part):
            shutil.move(came, dest / part["name"])  # across file systems too
            kept.append(part["name"])
        else:
            came.unlink()
            rejected.append(part["name"])
    return kept, rejected


def join(parts_dir: Path, out: Path) -> tuple[int, str]:
    """Join the parts into ``out`` once all are there; (exit code, message)."""
    manifest = read_manifest(parts_dir)
    if out.is_file() and out.stat().st_size == manifest["size"] and md5_of(out) == manifest["md5"]:
        return 0, f"{out}: whole, md5 {manifest['md5']}"
    names = [p["name"] for p in manifest["parts"]]
    have = [n for n in names if (parts_dir / n).is_file()]
    if len(have) < len(names):
        missing = [n for n in names if n not in have]
        return MISSING, f"waiting for parts: {len(have)} of {len(names)} here; missing {', '.join(missing)}"
    tmp = out.with_name(out.name + ".joining")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("wb") as f:
        for n in names:
            with (parts_dir / n).open("rb") as part:
                shutil.copyfileobj(part, f, 8 * MiB)
    got = md5_of(tmp)
    if got != manifest["md5"]:
        tmp.unlink()
        return 1, f"joined {len(names)} parts, md5 {got}, expected {manifest['md5']}: parts from different files?"
    tmp.replace(out)
    for n in names:  # the whole file replaces them (the machine's disk holds one copy)
        (parts_dir / n).unlink()
    return 0, f"{out}: joined {len(names)} parts, {manifest['size']:,} bytes, md5 {got}"


def plan(folder: Path, extra: list[Path], limit_mib: float, base_bytes: int = 0) -> list[list[str]]:
    """Calls, each a carry list within ``limit_mib`` (``base_bytes``: what else travels, the
    tracked tree). The manifest goes with every call; the extra paths with the last part."""
    manifest = read_manifest(folder)
    limit = int(limit_mib * MiB) - base_bytes - (folder / MANIFEST).stat().st_size

    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size

    calls: list[list[str]] = []
    used = 0
    for part in manifest["parts"]:
        if not calls or used + part["size"] > limit:
            calls.append([])
            used = 0
        calls[-1].append(str(folder / part["name"]))
        used += part["size"]
    extra_bytes = sum(size(p) for p in extra)
    if extra and used + extra_bytes > limit:
        calls.append([])
    for call in calls:
        call.append(str(folder / MANIFEST))
    calls[-1] += [str(p) for p in extra]
    if any(size(Path(p)) + base_bytes > limit_mib * MiB for call in calls for p in call):
        raise SystemExit(f"error: a single path is over {limit_mib} MiB: split with a smaller --part-mib")
    return calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split")
    s.add_argument("source", type=Path)
    s.add_argument("dest", type=Path)
    s.add_argument("--part-mib", type=float, default=48)
    c = sub.add_parser("collect")
    c.add_argument("source", type=Path)
    c.add_argument("dest", type=Path)
    j = sub.add_parser("join")
    j.add_argument("parts", type=Path)
    j.add_argument("out", type=Path)
    pl = sub.add_parser("plan")
    pl.add_argument("folder", type=Path)
    pl.add_argument("--extra", type=Path, action="append", default=[])
    pl.add_argument("--limit-mib", type=float, default=63)
    pl.add_argument("--base-bytes", type=int, default=0)
    args = p.parse_args(argv)

    if args.command == "split":
        m = split(args.source, args.dest, args.part_mib)
        print(f"{m['name']}: {m['size']:,} bytes, md5 {m['md5']}, {len(m['parts'])} parts in {args.dest}")
        return 0
    if args.command == "collect":
        if not (args.source / MANIFEST).is_file():
            print(f"no parts came with this call ({args.source / MANIFEST} absent)")
            return 0
        kept, rejected = collect(args.source, args.dest)
        print(
            f"parts this call: {', '.join(kept) or 'none'}"
            + (f"; REJECTED (size or md5): {', '.join(rejected)}" if rejected else "")
        )
        return 1 if rejected else 0
    if args.command == "join":
        code, message = join(args.parts, args.out)
        print(message, file=sys.stderr if code == 1 else sys.stdout)
        return code
    for call in plan(args.folder, args.extra, args.limit_mib, args.base_bytes):
        print(json.dumps(call))
    return 0


if __name__ == "__main__":
    sys.exit(main())
