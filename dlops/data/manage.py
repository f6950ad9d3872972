"""The library behind ``dlops data fetch | prepare | info | show``.

``fetch`` gets an archive (download or local file), checks its md5, extracts it into a
scratch directory, builds the cache from it and only then moves the extracted tree to
``<root>/<name>/raw`` and the cache to ``<root>/<name>/cache``, both or neither. Any failure removes the
scratch files and leaves what was there before (a good cache included) untouched.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import ParseResult, unquote, urlparse
from urllib.request import url2pathname

import numpy as np

from dlops.data import get_dataset
from dlops.data.cache import (
    CACHE_SCRATCH,
    DOWNLOAD_SCRATCH,
    EXTRACT_SCRATCH,
    MANIFEST,
    CacheBuilder,
    cache_dir,
    dataset_dir,
    directory_bytes,
    is_prepared,
    open_split,
    read_manifest,
    remove_stale_scratch,
    resolve_root,
    scratch_path,
    settle_previous,
)
from dlops.data.fetch import download, is_url, md5_file, safe_extract
from dlops.errors import DatasetNotAvailable, DlopsError
from dlops.io import DiskFull, run_lock
from dlops.text import plural

Say = Callable[[str], None]
SOURCE_FILE = "source.json"  # in raw/: where the extracted tree came from


def _quiet(_: str) -> None:
    pass


def cached_module(name: str) -> ModuleType:
    """The module of a dataset that is fetched and cached (tinyimagenet, stl10)."""
    if name == "tiny-imagenet":
        from dlops.data import tinyimagenet

        return tinyimagenet
    if name == "stl10":
        from dlops.data import stl10

        return stl10
    if name == "digits":
        raise DlopsError("digits ships with scikit-learn: there is nothing to fetch or prepare")
    raise DlopsError(f"unknown dataset {name!r} to fetch (tiny-imagenet, stl10)")


def _build(
    module: ModuleType,
    tree: Path,
    root: Path,
    source: dict[str, Any],
    *,
    val_fraction: float,
    seed: int,
    workers: int | None,
    progress: bool,
    also: Sequence[tuple[Path, Path]] = (),
) -> dict[str, Any]:
    """Build the cache of ``tree`` and swap it in, with the folders ``also`` (all or none)."""
    _check_fraction(val_fraction)
    with CacheBuilder(root, module.NAME) as builder:
        entries = module.build_cache(
            tree, builder, val_fraction=val_fraction, seed=seed, workers=workers, progress=progress
        )
        return builder.commit(
            {
                "classes": len(entries["class_ids"]),
                **entries,
                "source": source,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            also,
        )


def _check_fraction(val_fraction: float) -> None:
    if not 0 < val_fraction < 1:
        raise DlopsError(f"validation fraction must be between 0 and 1, got {val_fraction:g}")


def _one_at_a_time(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Run a ``fetch`` or ``prepare`` of ``name`` under :func:`dataset_lock` (a dataset that
    is not fetched, digits, is refused first, before anything is created)."""

    @functools.wraps(fn)
    def locked(name: str, root: Path | str | None = None, *args: Any, **kwargs: Any) -> dict[str, Any]:
        cached_module(name)
        with dataset_lock(resolve_root(root), name):
            try:
                return fn(name, root, *args, **kwargs)
            except OSError as exc:  # the scratch files are gone by now; a previous cache is as it was
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                where = exc.filename or dataset_dir(root, name)
                raise DiskFull(f"no space left on device while writing {where} ({name} needs more room)") from None

    return locked


@_one_at_a_time
def fetch_dataset(
    name: str,
    root: Path | str | None = None,
    source: str | None = None,
    md5: str | None = None,
    *,
    force: bool = False,
    keep_archive: bool = False,
    val_fraction: float | None = None,
    seed: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    say: Say = _quiet,
) -> dict[str, Any]:
    """Download (or take) the archive of ``name``, verify, extract and cache it; the manifest.

    ``source`` is a URL or a local archive (default: the official URL). A download must
    match ``md5`` (default: the official md5). A local file must match ``md5`` when one is
    given; otherwise one that differs from the official md5 (a repack, a sample) is
    used only if its layout checks out. A download goes to a scratch folder and is deleted
    once the cache is built unless ``keep_archive``; an archive of that name already in
    ``downloads/`` is replaced by it only then (a failed fetch leaves it as it was). An
    existing cache is kept (the manifest comes back with ``"reused": True``) unless ``force``.
    """
    module = cached_module(name)
    root = resolve_root(root)
    _remove_stale_scratch(dataset_dir(root, name))
    if not force and is_prepared(root, name):
        manifest = read_manifest(root, name)
        if source is not None or md5 is not None:
            _check_same_source(name, manifest.get("source") or {}, source or module.URL, md5)
        choose_holdout(root, name, val_fraction, seed, rebuild=False)
        say(f"{name} is already prepared in {cache_dir(root, name)} (--force fetches it again)")
        return {**manifest, "reused": True}
    val_fraction, seed = choose_holdout(root, name, val_fraction, seed, rebuild=True, say=say)
    _check_fraction(val_fraction)
    home = dataset_dir(root, name)
    src = source or module.URL
    fresh: Path | None = None  # the scratch folder a download goes to
    kept: Path | None = None  # where a downloaded archive stays (--keep-archive, or one was there)
    # A file:// URL names a local file: read in place, as a path is (never copied onto itself).
    local = _local_file(src)
    if is_url(src) and local is None:
        expected = md5 or module.MD5
        filename = _archive_name(src, module.ARCHIVE)
        target = home / "downloads" / filename
        # A file already there (kept by --keep-archive) stays until the new download has been
        # checked and its cache built: a download that fails leaves it as it was.
        kept = target if keep_archive or target.exists() else None
        fresh = scratch_path(home / "downloads", DOWNLOAD_SCRATCH)
        archive = fresh / filename
        say(f"downloading {src}")
        try:
            actual = download(src, archive, expected, progress=progress)
        except BaseException:
            shutil.rmtree(fresh, ignore_errors=True)
            _remove_empty(home / "downloads", home)
            raise
    else:
        archive = (local or Path(src)).expanduser().absolute()
        if archive.is_dir():
            raise DlopsError(
                f"{name}: {archive} is a directory, not an archive: for an extracted tree run "
                f"`dlops data prepare {name} --raw {archive}`"
            )
        if not archive.is_file():
            raise DlopsError(f"{name}: source archive not found: {archive}")
        actual = md5_file(archive)
        if md5 is not None and actual != md5.lower():
            raise DlopsError(f"md5 mismatch for {archive}: got {actual}, expected {md5}")
        if md5 is None and actual != module.MD5:
            say(
                f"note: {archive.name} has md5 {actual}, not the official {module.MD5} "
                "(a repack or a sample?): using it only if its layout checks out"
            )
    info = {
        "archive": archive.name,
        "location": src,
        "md5": actual,
        "official_md5": module.MD5,
        "official": actual == module.MD5,
    }

    settle_previous(home / "raw")
    scratch = scratch_path(home, EXTRACT_SCRATCH)
    try:
        say(f"extracting {archive.name}")
        count = safe_extract(archive, scratch, progress=progress)
        tree = module.find_tree(scratch)
        (scratch / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        say(f"extracted {plural(count, 'member')}; building the cache")
        manifest = _build(
            module,
            tree,
            root,
            {**info, "tree": str(home / "raw" / tree.relative_to(scratch))},
            val_fraction=val_fraction,
            seed=seed,
            workers=workers,
            progress=progress,
            also=[(scratch, home / "raw")],  # the cache and the tree it came from: both or neither
        )
        if kept is not None:  # checked and built from: it takes the kept archive's place
            os.replace(archive, kept)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True)
        _remove_empty(home / "downloads", home)
    return manifest


@contextlib.contextmanager
def dataset_lock(root: Path, name: str) -> Iterator[Path]:
    """One ``fetch`` or ``prepare`` of a dataset at a time: a second one, which would build
    its own cache and swap it in over the first one's, is refused in one line. The lock is
    ``<root>/.<name>.lock``, there only while a fetch or prepare runs."""
    with run_lock(root / f".{name}.lock", f"another `dlops data fetch` or `prepare` of {name}", remove=True) as path:
        yield path


def _check_same_source(name: str, built_from: dict[str, Any], source: str, md5: str | None) -> None:
    """A fetch of ``source`` (``md5``) over a cache built from another archive is refused: it
    would do nothing while the user thinks the data is theirs. Same archive: md5 equal (a
    local file is hashed) or, for a URL, the same URL."""
    if built_from.get("md5"):
        was = f"{built_from.get('archive', '?')} (md5 {built_from['md5']})"
    else:
        was = f"the extracted tree {built_from.get('tree', '?')} (no archive recorded)"
    again = f"add --force to rebuild {name} from {source}"
    local = _local_file(source)  # file:///x.zip is the file /x.zip
    if local is not None:
        source = str(local)
    if is_url(source):
        same = source == built_from.get("location") and md5 in (None, built_from.get("md5"))
        if not same:
            raise DlopsError(f"{name} is already prepared from {was}, not from {source}: {again}")
        return
    path = Path(source).expanduser().absolute()
    if not path.is_file():
        raise DlopsError(f"{name}: source archive not found: {path} ({name} is already prepared from {was})")
    actual = md5_file(path)
    if md5 is not None and actual != md5.lower():
        raise DlopsError(f"md5 mismatch for {path}: got {actual}, expected {md5}")
    if actual != built_from.get("md5"):
        raise DlopsError(f"{name} is already prepared from {was}, not from {path} (md5 {actual}): {again}")


DEFAULT_HOLDOUT = (0.1, 0)  # fraction of each training class held out for validation, its seed


def _cached_holdout(root: Path, name: str) -> tuple[float, int] | None:
    """The validation hold-out (fraction, seed) the present cache of ``name`` was built with,
    read from its manifest even where an array file is damaged (a rebuild that repairs it
    keeps the split); None where no manifest records one."""
    try:
        manifest = read_manifest(root, name)
    except DatasetNotAvailable:
        try:
            manifest = json.loads((cache_dir(root, name) / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    holdout = manifest.get("holdout") if isinstance(manifest, dict) else None
    if not isinstance(holdout, dict):
        return None
    fraction, seed = holdout.get("fraction"), holdout.get("seed")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        return None
    return float(fraction), seed


def _describe(holdout: tuple[float, int]) -> str:
    return f"fraction {holdout[0]:g}, seed {holdout[1]}"


def choose_holdout(
    root: Path,
    name: str,
    val_fraction: float | None,
    seed: int | None,
    *,
    rebuild: bool,
    say: Say = _quiet,
) -> tuple[float, int]:
    """The validation hold-out a fetch or prepare builds with. What is not given is the
    present cache's (a rebuild keeps the split its studies were measured on), else the
    default (0.1, seed 0). Without ``rebuild`` (no --force) a present cache is kept, so a
    hold-out given that differs from its own is refused rather than silently ignored."""
    previous = _cached_holdout(root, name)
    base = previous or DEFAULT_HOLDOUT
    chosen = (base[0] if val_fraction is None else float(val_fraction), base[1] if seed is None else seed)
    if previous is None or chosen == previous:
        if previous is not None and rebuild and (val_fraction is None or seed is None):
            say(f"keeping the validation hold-out of the present cache ({_describe(previous)})")
        return chosen
    if not rebuild:
        raise DlopsError(
            f"{name} is already prepared with the validation hold-out {_describe(previous)}: "
            f"add --force to rebuild it with {_describe(chosen)}"
        )
    say(
        f"note: the validation hold-out changes from {_describe(previous)} to {_describe(chosen)}: "
        "studies measured on the old one will not continue on this cache"
    )
    return chosen


def _local_file(source: str) -> Path | None:
    """The file a ``file://`` URL names (None for any other source). A host other than
    localhost is refused: ``file://data/x.zip`` names host ``data``, not a relative path."""
    if source[:7].lower() != "file://":
        return None
    parts = _parse_url(source)
    if parts.netloc not in ("", "localhost"):
        raise DlopsError(
            f"--source {source} names the host {parts.netloc!r}: a local file is file:///ABSOLUTE/PATH "
            "(three slashes), or give the path itself"
        )
    return Path(url2pathname(parts.path))


def _parse_url(url: str) -> ParseResult:
    """``url`` split into its parts; one that cannot be (``http://[::1``) is a one-line error."""
    try:
        return urlparse(url)
    except ValueError as exc:
        raise DlopsError(f"--source {url} is not a valid URL ({' '.join(str(exc).split())})") from None


def _archive_name(url: str, default: str) -> str:
    """The file name a download of ``url`` is saved under (``default`` where the URL's path
    ends in ``/``); a URL whose last part is ``.`` or ``..`` names a folder, not a file."""
    last = unquote(_parse_url(url).path.rsplit("/", 1)[-1])
    if last in (".", "..") or "/" in last or "\\" in last or "\0" in last:
        raise DlopsError(f"cannot download {url}: its path does not end in a file name (it ends in {last!r})")
    return last or default


def _remove_stale_scratch(home: Path) -> None:
    """Remove the scratch folders a fetch or prepare killed hard (SIGKILL, a power cut) left
    under ``home``; those of a process still running stay."""
    remove_stale_scratch(home, EXTRACT_SCRATCH, CACHE_SCRATCH)
    remove_stale_scratch(home / "downloads", DOWNLOAD_SCRATCH)
    _remove_empty(home / "downloads", home)


def _remove_empty(*folders: Path) -> None:
    """Remove folders this fetch created and left empty (innermost first)."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@_one_at_a_time
def prepare_dataset(
    name: str,
    root: Path | str | None = None,
    *,
    raw: Path | str | None = None,
    force: bool = False,
    val_fraction: float | None = None,
    seed: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    say: Say = _quiet,
) -> dict[str, Any]:
    """Build the cache of ``name`` from an extracted tree (default ``<root>/<name>/raw``).
    The hold-out not given is the present cache's, else 10% with seed 0 (:func:`choose_holdout`)."""
    module = cached_module(name)
    root = resolve_root(root)
    _remove_stale_scratch(dataset_dir(root, name))
    if not force and is_prepared(root, name):
        choose_holdout(root, name, val_fraction, seed, rebuild=False)
        say(f"{name} is already prepared in {cache_dir(root, name)} (--force rebuilds it)")
        return {**read_manifest(root, name), "reused": True}
    val_fraction, seed = choose_holdout(root, name, val_fraction, seed, rebuild=True, say=say)
    _check_fraction(val_fraction)
    where = Path(raw).expanduser().absolute() if raw is not None else dataset_dir(root, name) / "raw"
    if not where.is_dir():
        raise DatasetNotAvailable(
            f"no extracted {name} tree at {where}: run `dlops data fetch {name}` "
            "(or give --raw DIR); `--dataset digits` works now"
        )
    tree = module.find_tree(where)
    source: dict[str, Any] = {"tree": str(tree)}
    for candidate in (where / SOURCE_FILE, tree / SOURCE_FILE):
        if candidate.is_file():
            source = {**_read_source(candidate), **source}
            break
    return _build(module, tree, root, source, val_fraction=val_fraction, seed=seed, workers=workers, progress=progress)


def _read_source(path: Path) -> dict[str, Any]:
    """The record of where an extracted tree came from (``source.json``, written by ``fetch``)."""
    fix = "fix it or remove it (it only records where the tree came from)"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DlopsError(f"{path} is not readable JSON ({' '.join(str(exc).split())}): {fix}") from None
    if not isinstance(record, dict):
        kind = {"list": "list", "str": "string", "NoneType": "null", "bool": "boolean"}.get(
            type(record).__name__, "number"
        )
        raise DlopsError(f"{path} holds a JSON {kind}, not an object: {fix}")
    return record


def dataset_info(name: str, root: Path | str | None = None) -> dict[str, Any]:
    """Counts per split, classes, image shape, cache place and size (JSON-ready)."""
    if name in ("tiny-imagenet", "stl10"):
        manifest = read_manifest(root, name)
        directory = cache_dir(root, name)
        for split in manifest["splits"]:  # labels that are not class indices: one line, as a study would say
            if split != "unlabeled":
                open_split(root, name, split, len(manifest["class_ids"]))
        return {
            "name": name,
            "classes": manifest["classes"],
            "splits": manifest["splits"],
            "image_shape": manifest["image_shape"],
            "cache_dir": str(directory),
            "cache_bytes": directory_bytes(directory),
            "format_version": manifest["format_version"],
            "holdout": manifest.get("holdout"),
            "source": manifest.get("source"),
            "build": manifest.get("build"),
            "class_ids": manifest["class_ids"],
            "class_names": manifest["class_names"],
        }
    ds = get_dataset(name, None if root is None else Path(root))  # in-memory datasets (digits) have no cache
    return {
        "name": name,
        "classes": ds.num_classes,
        "splits": {"train": len(ds.train), "val": len(ds.val), "test": len(ds.test())},
        "image_shape": list(ds.image_shape),
        "cache_dir": None,
        "cache_bytes": 0,
        "class_ids": ds.class_ids,
        "class_names": ds.class_names,
    }


# --------------------------------------------------------------------------- show


def dataset_figure(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    counts: dict[str, np.ndarray],
    title: str,
    columns: int = 8,
):
    """A grid of ``images`` (uint8 N x C x H x W) titled by class, above a per-class
    histogram of ``counts`` (split -> count per class, stacked). Returns the Figure."""
    from matplotlib.figure import Figure

    rows = -(-len(images) // columns)
    fig = Figure(figsize=(1.5 * columns, 1.6 * rows + 3.2), layout="constrained")
    grid = fig.add_gridspec(rows + 2, columns, height_ratios=[1.0] * rows + [0.15, 1.6])
    for k, (image, label) in enumerate(zip(images, labels, strict=True)):
        ax = fig.add_subplot(grid[k // columns, k % columns])
        picture = image.transpose(1, 2, 0)
        ax.imshow(
            picture[:, :, 0] if picture.shape[2] == 1 else picture,
            cmap="gray",
            vmin=0,
            vmax=255,
            interpolation="nearest",
        )
        name = class_names[int(label)]
        ax.set_title(name if len(name) <= 16 else name[:15] + "…", fontsize=8)
        ax.set_axis_off()
    hist = fig.add_subplot(grid[rows + 1, :])
    x = np.arange(len(class_names))
    bottom = np.zeros(len(class_names))
    for split, c in counts.items():
        hist.bar(x, c, bottom=bottom, width=1.0 if len(x) > 50 else 0.8, label=f"{split} ({int(c.sum()):,})")
        bottom += c
    hist.set_xlabel("class index")
    hist.set_ylabel("images")
    hist.set_xlim(-0.5, len(x) - 0.5)
    hist.set_ylim(0, max(1.0, bottom.max()) * 1.3)  # headroom for the legend
    hist.legend(fontsize=8, loc="upper center", ncols=len(counts), frameon=False)
    hist.set_title("images per class", fontsize=9)
    fig.suptitle(title)
    return fig


def show_dataset(
    name: str, root: Path | str | None = None, out: Path | str | None = None, *, count: int = 32, seed: int = 0
) -> Path:
    """Write a PNG of ``count`` training images (distinct classes when there are enough)
    and the per-class histogram of every split; returns its path."""
    from dlops.paths import reports_dir

    path = Path(out) if out is not None else reports_dir() / "data" / f"{name}.png"
    if path.is_dir():
        path = path / f"{name}.png"  # --out a folder: the default file name in it
    elif path.suffix.lower() != ".png":
        raise DlopsError(f"--out {out}: give a .png path or an existing folder (the figure is a PNG)")
    ds = get_dataset(name, None if root is None else Path(root))
    labels = np.asarray(ds.train.labels)
    rng = np.random.default_rng(seed)
    classes = rng.permutation(ds.num_classes)[:count]
    picks = []
    for k in range(count):
        pool = np.flatnonzero(labels == classes[k % len(classes)])
        if len(pool):
            picks.append(int(rng.choice(pool)))
    chosen = np.sort(np.asarray(picks, dtype=np.int64))
    test = ds.test()
    counts = {
        split: np.bincount(np.asarray(s.labels), minlength=ds.num_classes)
        for split, s in (("train", ds.train), ("val", ds.val), ("test", test))
    }
    total = sum(len(s) for s in (ds.train, ds.val, test))
    title = f"{name}: {plural(ds.num_classes, 'class')}, {plural(total, 'image')} {list(ds.image_shape)}"
    fig = dataset_figure(np.asarray(ds.train.images[chosen]), labels[chosen], ds.class_names, counts, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
