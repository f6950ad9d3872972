"""Getting an archive onto disk: download with a progress bar, md5 check, safe extraction.

Everything here fails with a one-line :class:`~dlops.errors.DlopsError` for input a user
can cause (a bad URL, a wrong checksum, a corrupt or malicious archive) and leaves no
partial file behind that could later pass for a good one: downloads go to ``*.part``
and are renamed only once their md5 matches; extraction goes into a directory the
caller throws away on failure.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from dlops.errors import DlopsError

if TYPE_CHECKING:
    from rich.progress import Progress

CHUNK = 1 << 20


def is_url(source: str) -> bool:
    """A URL, not a path: its scheme is one dlops reads (in any case: ``HTTP://`` too)."""
    return source[:8].lower().startswith(("http://", "https://", "ftp://", "file://"))


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# The progress bars (rich) load only when a dataset is prepared: a run that merely reads
# the prepared data never imports rich.


def byte_progress(enabled: bool) -> Progress:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )


def count_progress(enabled: bool) -> Progress:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )


def _one_line(reason: object) -> str:
    return " ".join(str(reason).split())


def download(url: str, dest: Path, expected_md5: str | None, *, progress: bool = True, timeout: float = 60.0) -> str:
    """Download ``url`` to ``dest`` and return its md5.

    The bytes go to ``dest.part`` first; a network error or an md5 other than
    ``expected_md5`` removes it and raises, so ``dest`` only ever holds a complete,
    verified file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5()
    try:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)  # the user-given URL, any scheme urllib opens
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:  # urllib gave up following redirects: its reason runs over three lines
                raise DlopsError(
                    f"cannot download {url}: too many redirects (HTTP {exc.code}; a redirect loop?)"
                ) from None
            raise DlopsError(f"cannot download {url}: HTTP {exc.code} {_one_line(exc.reason)}") from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
            # HTTPException: a server that does not speak HTTP (BadStatusLine), a bad port (InvalidURL)
            reason = _one_line(getattr(exc, "reason", exc)) or type(exc).__name__
            raise DlopsError(f"cannot download {url}: {reason}") from None
        with response, open(part, "wb") as out, byte_progress(progress) as bar:
            length = (response.headers.get("Content-Length") or "").strip()
            total = int(length) if length.isdigit() else None  # a missing or garbled length: unknown
            task = bar.add_task(f"download {dest.name}", total=total)
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                    if isinstance(exc, http.client.IncompleteRead):  # a chunked response cut off mid-chunk
                        reason = "the connection closed before the end of the response"
                    else:
                        reason = _one_line(exc) or type(exc).__name__
                    raise DlopsError(f"download of {url} broke off after {out.tell():,} bytes ({reason})") from None
                if not chunk:
                    break
                out.write(chunk)  # a disk error (a full disk) is not the network's: it propagates
                digest.update(chunk)
                bar.advance(task, len(chunk))
            if total is not None and out.tell() != total:
                raise DlopsError(f"download of {url} broke off after {out.tell():,} of {total:,} bytes")
        md5 = digest.hexdigest()
        if expected_md5 is not None and md5 != expected_md5.lower():
            raise DlopsError(f"md5 mismatch for {url}: got {md5}, expected {expected_md5} (download removed)")
        os.replace(part, dest)
        return md5
    finally:
        part.unlink(missing_ok=True)


# --------------------------------------------------------------------------- extraction


def _member_target(dest: str, name: str, archive: Path) -> str:
    """Where member ``name`` lands under ``dest`` (a resolved path); raises if it would land
    anywhere else. String checks only: an extracted tree holds no links to follow."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise DlopsError(
            f"unsafe archive {archive.name}: member {name!r} would be written outside the target directory"
        )
    target = os.path.normpath(os.path.join(dest, *pure.parts))
    if target != dest and not target.startswith(dest + os.sep):
        raise DlopsError(
            f"unsafe archive {archive.name}: member {name!r} would be written outside the target directory"
        )
    return target


def archive_kind(path: Path) -> str:
    """``"zip"`` or ``"tar"`` from the file's contents (not its name)."""
    if not path.is_file():
        raise DlopsError(f"archive not found: {path}")
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, EOFError, zlib.error):
        pass
    raise DlopsError(f"{path.name} is not a readable zip or tar archive (corrupt or truncated?)")


def safe_extract(archive: Path, dest: Path, *, progress: bool = True) -> int:
    """Extract ``archive`` (zip, tar, tar.gz/bz2/xz) into ``dest``; return the member count.

    A member with an absolute path, a ``..`` component, a link or a device is refused
    (nothing is written for it). A corrupt archive is a :class:`DlopsError`. ``dest``
    may hold a partial tree after an error: extract into a scratch directory.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    kind = archive_kind(archive)
    try:
        if kind == "zip":
            return _extract_zip(archive, dest, progress)
        return _extract_tar(archive, dest, progress)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        raise DlopsError(f"corrupt archive {archive.name}: {exc}") from None


def _extract_zip(archive: Path, dest: Path, progress: bool) -> int:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # The central directory lists every member up front: check all before writing any.
        targets = [_member_target(str(dest), info.filename, archive) for info in infos]
        for info in infos:
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DlopsError(f"unsafe archive {archive.name}: member {info.filename!r} is a symbolic link")
        made: set[str] = set()
        with count_progress(progress) as bar:
            task = bar.add_task(f"extract {archive.name}", total=len(infos))
            for info, target in zip(infos, targets, strict=True):
                folder = target if info.is_dir() else os.path.dirname(target)
                if folder not in made:
                    os.makedirs(folder, exist_ok=True)
                    made.add(folder)
                if not info.is_dir():
                    with zf.open(info) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                bar.advance(task)
    return len(infos)


def _extract_tar(archive: Path, dest: Path, progress: bool) -> int:
    count = 0
    # Streamed: a 2.6 GB tar.gz is decompressed once. Each member is checked before it
    # is written; the caller discards ``dest`` if a later member is refused.
    with tarfile.open(archive, mode="r:*") as tf, count_progress(progress) as bar:
        task = bar.add_task(f"extract {archive.name}", total=None)
        for member in tf:
            _member_target(str(dest), member.name, archive)
            if not (member.isfile() or member.isdir()):
                raise DlopsError(f"unsafe archive {archive.name}: member {member.name!r} is a link or special file")
            try:
                tf.extract(member, dest, filter="data")
            except tarfile.FilterError as exc:
                raise DlopsError(f"unsafe archive {archive.name}: {exc}") from None
            count += 1
            bar.advance(task)
        # tarfile ends its iteration without an error where the archive stops at a member's
        # boundary (a truncated download) or a header is garbled: only the end-of-archive
        # marker, a zero block where the next header would be, says every member was read.
        # (A seek back of at most one block: within the reader's buffer for a compressed tar.)
        assert tf.fileobj is not None
        tf.fileobj.seek(tf.offset)
        marker = tf.fileobj.read(tarfile.BLOCKSIZE)
        if len(marker) != tarfile.BLOCKSIZE or marker.count(0) != tarfile.BLOCKSIZE:
            raise DlopsError(
                f"corrupt archive {archive.name}: it stops after {count:,} members without the end-of-archive "
                "marker (truncated or damaged)"
            )
    return count


def tree_candidates(directory: Path, tree: str) -> list[Path]:
    """Where an extracted dataset tree may be: ``directory`` itself, ``directory/tree``,
    or the only subdirectory of ``directory``."""
    directory = Path(directory)
    candidates = [directory, directory / tree]
    subdirs = (
        [p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")] if directory.is_dir() else []
    )
    if len(subdirs) == 1:
        candidates.append(subdirs[0])
    return candidates
