"""Downloads over HTTP (a server on 127.0.0.1), md5 checks and safe extraction."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY_IMAGENET_SAMPLE, requires_tiny_imagenet_sample
from data_trees import (
    one_error_line,
    serve_directory,
    serve_raw,
    serve_stalling,
    write_tiny_imagenet,
    zip_tree,
)
from dlops.cli import app
from dlops.data.cache import is_prepared
from dlops.data.fetch import download, md5_file, safe_extract
from dlops.errors import DlopsError

SAMPLE_MD5 = "3aedffe5d8f9734b88a46c4fe71ed6eb"
runner = CliRunner()


def dlops(*args: str):
    return runner.invoke(app, list(args))


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


@requires_tiny_imagenet_sample()
def test_fetch_the_sample_by_url_with_its_md5_and_fail_cleanly_with_a_wrong_one(tmp_path: Path) -> None:
    with serve_directory(TINY_IMAGENET_SAMPLE.parent) as base:
        url = f"{base}/{TINY_IMAGENET_SAMPLE.name}"
        root = tmp_path / "good"
        result = dlops("data", "fetch", "tiny-imagenet", "--root", str(root), "--source", url, "--md5", SAMPLE_MD5)
        assert result.exit_code == 0, result.output
        info = json.loads(dlops("data", "info", "tiny-imagenet", "--root", str(root), "--json").stdout)
        assert info["classes"] == 200 and info["splits"]["test"] == 2_000
        assert info["source"]["location"] == url and info["source"]["md5"] == SAMPLE_MD5
        assert files_under(root / "tiny-imagenet" / "downloads") == []  # not kept unless --keep-archive

        bad = tmp_path / "bad"
        line = one_error_line(
            dlops("data", "fetch", "tiny-imagenet", "--root", str(bad), "--source", url, "--md5", "0" * 32)
        )
        assert f"md5 mismatch for {url}: got {SAMPLE_MD5}, expected {'0' * 32}" in line
        assert not is_prepared(bad, "tiny-imagenet")
        assert not bad.exists() or list(bad.rglob("*")) == []  # no partial download, tree or cache


@pytest.fixture
def served(tmp_path: Path):
    site = tmp_path / "site"
    site.mkdir()
    zip_tree(write_tiny_imagenet(tmp_path / "src"), site / "mini.zip")
    with serve_directory(site) as base:
        yield base, site / "mini.zip"


def test_a_url_is_checked_against_the_official_md5_by_default(served, tmp_path: Path) -> None:
    base, _ = served
    line = one_error_line(
        dlops("data", "fetch", "tiny-imagenet", "--root", str(tmp_path / "r"), "--source", f"{base}/mini.zip")
    )
    assert "expected 90528d7ca1a48142e341f4ef8d21d0de" in line
    assert not (tmp_path / "r").exists() or list((tmp_path / "r").rglob("*")) == []


def test_keep_archive_keeps_the_verified_download(served, tmp_path: Path) -> None:
    base, archive = served
    root = tmp_path / "r"
    result = dlops(
        "data",
        "fetch",
        "tiny-imagenet",
        "--root",
        str(root),
        "--source",
        f"{base}/mini.zip",
        "--md5",
        md5_file(archive),
        "--keep-archive",
        "--workers",
        "1",
    )
    assert result.exit_code == 0, result.output
    assert files_under(root / "tiny-imagenet" / "downloads") == ["mini.zip"]
    assert md5_file(root / "tiny-imagenet" / "downloads" / "mini.zip") == md5_file(archive)


def test_unreachable_url_and_missing_file_are_one_line(served, tmp_path: Path) -> None:
    base, _ = served
    line = one_error_line(
        dlops("data", "fetch", "tiny-imagenet", "--root", str(tmp_path / "r"), "--source", f"{base}/nothing.zip")
    )
    assert "cannot download" in line and "HTTP 404" in line
    assert not (tmp_path / "r").exists() or list((tmp_path / "r").rglob("*")) == []
    line = one_error_line(
        dlops("data", "fetch", "stl10", "--root", str(tmp_path / "r"), "--source", str(tmp_path / "nothing.tar.gz"))
    )
    assert "source archive not found" in line
    line = one_error_line(dlops("data", "fetch", "stl10", "--root", str(tmp_path / "r"), "--source", str(tmp_path)))
    assert "is a directory" in line and "dlops data prepare stl10 --raw" in line
    line = one_error_line(dlops("data", "fetch", "digits"))
    assert "nothing to fetch" in line


def test_download_removes_the_partial_file_on_a_wrong_md5(served, tmp_path: Path) -> None:
    base, archive = served
    dest = tmp_path / "d" / "mini.zip"
    with pytest.raises(DlopsError, match="md5 mismatch"):
        download(f"{base}/mini.zip", dest, "f" * 32, progress=False)
    assert files_under(tmp_path / "d") == []
    assert download(f"{base}/mini.zip", dest, md5_file(archive), progress=False) == md5_file(archive)
    assert dest.read_bytes() == archive.read_bytes()


def test_safe_extract_refuses_escapes_before_writing(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "x"
    hostile = tmp_path / "hostile.zip"
    with zipfile.ZipFile(hostile, "w") as zf:
        zf.writestr("fine.txt", b"ok")
        zf.writestr("a/../../escaped.txt", b"gotcha")
    with pytest.raises(DlopsError, match="outside the target directory"):
        safe_extract(hostile, dest, progress=False)
    assert files_under(tmp_path / "out") == []  # the zip is checked as a whole first

    hardlink = tmp_path / "hardlink.tar"
    with tarfile.open(hardlink, "w") as tf:
        info = tarfile.TarInfo("passwd")
        info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(DlopsError, match="link or special file"):
        safe_extract(hardlink, tmp_path / "out2", progress=False)
    assert files_under(tmp_path / "out2") == []

    good = zip_tree(
        write_tiny_imagenet(tmp_path / "src", classes=1, train_per_class=1, val_per_class=1), tmp_path / "good.zip"
    )
    safe_extract(good, tmp_path / "out3", progress=False)
    assert (tmp_path / "out3" / "tiny-imagenet-200" / "wnids.txt").read_text() == "n90000000\n"


def test_a_fetch_never_deletes_an_archive_that_was_there_before(served, tmp_path: Path) -> None:
    base, archive = served
    root = tmp_path / "r"
    md5 = md5_file(archive)
    args = ("data", "fetch", "tiny-imagenet", "--root", str(root), "--md5", md5, "--workers", "1")
    result = dlops(*args, "--source", f"{base}/mini.zip", "--keep-archive")
    assert result.exit_code == 0, result.output
    kept = root / "tiny-imagenet" / "downloads" / "mini.zip"
    inode = kept.stat().st_ino
    for source in (kept.as_uri(), f"{base}/mini.zip"):  # the kept archive itself; the same name again
        result = dlops(*args, "--source", source, "--force")
        assert result.exit_code == 0, result.output
        assert files_under(kept.parent) == ["mini.zip"] and md5_file(kept) == md5
        if source.startswith("file:"):
            assert kept.stat().st_ino == inode  # read in place, not copied onto itself
        assert (
            json.loads(dlops("data", "info", "tiny-imagenet", "--root", str(root), "--json").stdout)["source"][
                "location"
            ]
            == source
        )


def test_an_empty_dlops_home_means_storage_not_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dlops.paths import data_root, dlops_home

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DLOPS_HOME", "")
    assert dlops_home() == tmp_path / "storage" and data_root() == tmp_path / "storage" / "data"
    line = one_error_line(dlops("data", "info", "tiny-imagenet"))
    assert str(tmp_path / "storage" / "data") in line


def test_a_failed_force_fetch_leaves_the_kept_archive_as_it_was(served, tmp_path: Path) -> None:
    base, archive = served
    root = tmp_path / "r"
    home = root / "tiny-imagenet"
    args = ("data", "fetch", "tiny-imagenet", "--root", str(root), "--workers", "1")
    result = dlops(*args, "--source", f"{base}/mini.zip", "--md5", md5_file(archive), "--keep-archive")
    assert result.exit_code == 0, result.output
    good = (home / "downloads" / "mini.zip").read_bytes()
    # A valid zip of the same file name, without a Tiny ImageNet tree in it.
    (archive.parent / "other").mkdir()
    with zipfile.ZipFile(archive.parent / "other" / "mini.zip", "w") as zf:
        zf.writestr("readme.txt", b"not a dataset")
    other_md5 = md5_file(archive.parent / "other" / "mini.zip")
    for keep in ((), ("--keep-archive",)):
        line = one_error_line(dlops(*args, "--force", "--source", f"{base}/other/mini.zip", "--md5", other_md5, *keep))
        assert "no Tiny ImageNet tree" in line, line
        assert files_under(home / "downloads") == ["mini.zip"]
        assert (home / "downloads" / "mini.zip").read_bytes() == good  # the kept archive, untouched
        assert [p.name for p in home.rglob(".*")] == []  # no scratch folder left
    assert json.loads(dlops("data", "info", "tiny-imagenet", "--root", str(root), "--json").stdout)["source"][
        "md5"
    ] == md5_file(archive)


def _fetch_process(root: Path, url: str) -> subprocess.Popen:
    """``dlops data fetch tiny-imagenet`` of ``url`` in a process of its own."""
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "dlops.cli", "data", "fetch", "tiny-imagenet", "--root", str(root)]
    return subprocess.Popen(
        [*command, "--source", url, "--md5", "0" * 32, "--workers", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_part(root: Path, process: subprocess.Popen) -> Path:
    """The ``*.part`` file of a download caught half-way (the server stalls after half)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        parts = list(root.rglob("*.part"))
        if parts:
            return parts[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.kill()
    raise AssertionError("the download never started")


def test_sigterm_during_a_download_cleans_up_as_ctrl_c_does(tmp_path: Path) -> None:
    root = tmp_path / "r"
    with serve_stalling(b"x" * 300_000) as base:
        process = _fetch_process(root, f"{base}/mini.zip")
        _wait_for_part(root, process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert not root.exists() or list(root.rglob("*")) == []  # no partial download, no scratch folder


def test_scratch_left_by_a_killed_fetch_is_removed_by_the_next_one(served, tmp_path: Path) -> None:
    base, archive = served
    root = tmp_path / "r"
    home = root / "tiny-imagenet"
    with serve_stalling(b"x" * 300_000) as stalling:
        process = _fetch_process(root, f"{stalling}/mini.zip")
        part = _wait_for_part(root, process)
        process.kill()  # SIGKILL: nothing of it can clean up
        process.communicate(timeout=60)
    left = part.parent
    assert left.parent == home / "downloads" and left.name.startswith(".download-tmp-")
    tag = left.name.removeprefix(".download-tmp-")  # <random>-<pid>-<start>-<host>: the dead process
    dead = [home / f".extract-tmp-{tag}", home / f".cache-tmp-{tag}"]
    for folder in dead:
        (folder / "inside").mkdir(parents=True)
    alive = home / f".extract-tmp-0123abcd-{os.getpid()}-0-{socket.gethostname()}"  # this process: still running
    alive.mkdir()
    result = dlops(
        "data", "fetch", "tiny-imagenet", "--root", str(root), "--workers", "1",
        "--source", f"{base}/mini.zip", "--md5", md5_file(archive),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not left.exists() and not any(folder.exists() for folder in dead)
    assert alive.is_dir()  # a scratch folder of a process that runs is not touched
    assert sorted(p.name for p in home.iterdir()) == [alive.name, "cache", "raw"]


def _slow_pool_fetch(tmp_path: Path) -> tuple[subprocess.Popen, list[int], Path, Path]:
    """``dlops data fetch`` in a session of its own, Ctrl-C as in a terminal, decoding with 2
    pool workers, each image slowed down so a signal lands there; the process, its pool
    workers' pids, the data root and the archive."""
    # 260 images: two chunks (256 and 4), so one worker is soon idle, waiting for more work
    tree = write_tiny_imagenet(tmp_path / "src", classes=2, train_per_class=128, val_per_class=2)
    archive = zip_tree(tree, tmp_path / "mini.zip")
    root = tmp_path / "r"
    repo = str(Path(__file__).resolve().parents[1])
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from dlops.data import tinyimagenet\n"
        "decode = tinyimagenet.decode_image\n"
        "tinyimagenet.decode_image = lambda path: (time.sleep(0.02), decode(path))[1]\n"
        "from dlops.cli import app\n"
        "app(sys.argv[1:])\n"
    )
    args = ["data", "fetch", "tiny-imagenet", "--root", str(root), "--source", str(archive), "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    children_file = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    children: list[int] = []
    deadline = time.monotonic() + 60
    while len(children) < 2 and time.monotonic() < deadline:
        assert process.poll() is None, "the fetch ended before its pool started"
        children = [int(pid) for pid in children_file.read_text().split()]
        time.sleep(0.05)
    if len(children) < 2:
        process.kill()
    assert len(children) >= 2, "no decoding pool"
    return process, children, root, archive


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads a process's children from /proc (Linux)")
def test_ctrl_c_in_a_terminal_while_the_pool_decodes_stops_cleanly(tmp_path: Path) -> None:
    """Ctrl-C in a terminal reaches the pool workers too (one process group): the fetch stops
    (130) with no traceback of a worker, no worker left and no scratch folder."""
    process, children, root, _ = _slow_pool_fetch(tmp_path)
    try:
        time.sleep(2)  # one worker busy with its 256 images, the other one idle
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 130, stderr
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
        assert files_under(root) == []
    finally:
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads a process's children from /proc (Linux)")
def test_a_fetch_killed_while_its_pool_decodes_leaves_no_worker_and_no_lock(tmp_path: Path) -> None:
    """SIGKILL during the decoding: the workers end with their parent, and the next fetch
    runs at once."""
    process, children, root, archive = _slow_pool_fetch(tmp_path)
    process.kill()
    process.communicate(timeout=60)
    try:
        deadline = time.monotonic() + 20
        alive = children
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and _not_zombie(pid)]
            time.sleep(0.1)
        assert alive == [], "pool workers outlived the fetch killed with SIGKILL"
        result = dlops("data", "fetch", "tiny-imagenet", "--root", str(root), "--source", str(archive))
        assert result.exit_code == 0, result.output
    finally:
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_url_that_ends_in_dot_dot_or_redirects_in_a_loop_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "r"
    with serve_stalling(b"x" * 300_000) as base:
        for url in (f"{base}/files/..", f"{base}/files/%2e%2e", f"{base}/files/."):
            line = one_error_line(dlops("data", "fetch", "tiny-imagenet", "--root", str(root), "--source", url))
            assert f"cannot download {url}: its path does not end in a file name" in line, line
            assert not root.exists() or list(root.rglob("*")) == []  # refused before any download
        line = one_error_line(dlops("data", "fetch", "tiny-imagenet", "--root", str(root), "--source", f"{base}/loop"))
        assert f"cannot download {base}/loop: too many redirects" in line, line
    assert not root.exists() or list(root.rglob("*")) == []


def test_a_reply_cut_off_or_not_http_and_a_url_that_does_not_parse_are_one_line(tmp_path: Path) -> None:
    root = tmp_path / "r"

    def fetch(url: str, *more: str) -> str:
        return one_error_line(dlops("data", "fetch", "tiny-imagenet", "--root", str(root), "--source", url, *more))

    # A chunked response whose connection closes inside a chunk (http.client's IncompleteRead).
    cut = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n186a0\r\n" + b"x" * 50_000
    with serve_raw(cut) as base:
        line = fetch(f"{base}/mini.zip")
        assert f"download of {base}/mini.zip broke off after" in line, line
        assert "the connection closed before the end of the response" in line, line
    # A server that is not an HTTP server (BadStatusLine): --source on the wrong port.
    with serve_raw(b"SSH-2.0-OpenSSH_9.6\r\n") as base:
        line = fetch(f"{base}/mini.zip")
        assert f"cannot download {base}/mini.zip: SSH-2.0-OpenSSH_9.6" in line, line
    # A garbled Content-Length: the length is unknown, the md5 still decides.
    with serve_raw(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n" + b"x" * 1000) as base:
        line = fetch(f"{base}/mini.zip", "--md5", "0" * 32)
        assert f"md5 mismatch for {base}/mini.zip" in line, line
    line = fetch("http://127.0.0.1:port/mini.zip")  # http.client's InvalidURL
    assert "cannot download http://127.0.0.1:port/mini.zip: nonnumeric port" in line, line
    for url in ("http://[::1/mini.zip", "file://[::1/mini.zip"):
        assert f"--source {url} is not a valid URL (Invalid IPv6 URL)" in fetch(url)
    assert files_under(root) == []  # no partial download left


def test_a_tar_cut_at_a_member_boundary_or_with_a_garbled_header_is_refused(tmp_path: Path) -> None:
    """tarfile stops without an error at a member boundary or a garbled header: such an archive
    would give a cache short of images, and exit 0."""
    tree = write_tiny_imagenet(tmp_path / "src", classes=3, train_per_class=10)
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tf:  # uncompressed; the train images last, as a repack may put them
        for part in ("wnids.txt", "words.txt", "val", "train"):
            tf.add(tree / part, arcname=f"{tree.name}/{part}")
    with tarfile.open(whole) as tf:
        last = tf.getmembers()[-3]  # a training image near the end
    data = whole.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: last.offset])
    garbled = tmp_path / "garbled.tar"
    garbled.write_bytes(data[: last.offset] + b"\xff" * 512 + data[last.offset + 512 :])
    for archive in (cut, garbled):
        root = tmp_path / archive.stem
        line = one_error_line(
            dlops("data", "fetch", "tiny-imagenet", "--root", str(root), "--source", str(archive), "--workers", "1")
        )
        assert f"corrupt archive {archive.name}: it stops after" in line and "end-of-archive marker" in line, line
        assert files_under(root) == []
    root = tmp_path / "whole"
    result = dlops("data", "fetch", "tiny-imagenet", "--root", str(root), "--source", str(whole), "--workers", "1")
    assert result.exit_code == 0, result.output
    info = json.loads(dlops("data", "info", "tiny-imagenet", "--root", str(root), "--json").stdout)
    assert info["splits"]["train"] + info["splits"]["val"] == 30


class _FullDisk:
    """A file opened for writing on a full disk: every write fails with ENOSPC, and so does
    the close (a buffered file flushes what it holds)."""

    def __init__(self, path: object) -> None:
        self.path = Path(str(path))
        self.path.touch()

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def tell(self) -> int:
        return 0

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("stage", ["download", "extraction", "cache"])
def test_a_full_disk_during_a_fetch_is_one_line_and_leaves_the_cache_as_it_was(
    served, tmp_path: Path, monkeypatch, stage: str
) -> None:
    import builtins

    from dlops.data import cache as cache_module
    from dlops.data import fetch as fetch_module

    base, archive = served
    root = tmp_path / "r"
    home = root / "tiny-imagenet"
    args = ["data", "fetch", "tiny-imagenet", "--root", str(root), "--workers", "1", "--md5", md5_file(archive)]
    assert dlops(*args, "--source", f"{base}/mini.zip").exit_code == 0
    before = {f: (home / f).read_bytes() for f in files_under(home)}

    def no_space(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if stage == "download":
        real_open = builtins.open
        monkeypatch.setattr(
            fetch_module,
            "open",
            lambda path, mode="r", *a, **k: _FullDisk(path) if str(path).endswith(".part") else real_open(path, mode),
            raising=False,
        )
    elif stage == "extraction":
        monkeypatch.setattr(fetch_module.shutil, "copyfileobj", no_space)
    else:
        monkeypatch.setattr(cache_module.ImageWriter, "write", no_space)
    source = f"{base}/mini.zip" if stage == "download" else str(archive)
    line = one_error_line(dlops(*args, "--source", source, "--force"))
    assert f"no space left on device while writing {home}" in line, line
    assert {f: (home / f).read_bytes() for f in files_under(home)} == before  # no scratch left, cache as it was


def test_a_second_fetch_or_prepare_of_a_dataset_while_one_runs_is_refused(served, tmp_path: Path) -> None:
    base, archive = served
    root = tmp_path / "r"
    with serve_stalling(b"x" * 300_000) as stalling:
        process = _fetch_process(root, f"{stalling}/mini.zip")
        _wait_for_part(root, process)
        lock = root / ".tiny-imagenet.lock"
        for args in (
            ("fetch", "tiny-imagenet", "--source", f"{base}/mini.zip", "--md5", md5_file(archive)),
            ("prepare", "tiny-imagenet", "--raw", str(tmp_path / "src")),
        ):
            line = one_error_line(dlops("data", *args, "--root", str(root), "--workers", "1"))
            assert line.startswith(
                f"error: another `dlops data fetch` or `prepare` of tiny-imagenet is already running "
                f"(pid {process.pid} on "
            ), line
            assert line.endswith(f"; lock {lock}): wait for it to end"), line
        assert not is_prepared(root, "tiny-imagenet")  # neither built a cache beside the running fetch
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    assert not root.exists() or list(root.rglob("*")) == []  # the lock went with its holder
    result = dlops(
        "data", "fetch", "tiny-imagenet", "--root", str(root), "--workers", "1",
        "--source", f"{base}/mini.zip", "--md5", md5_file(archive),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert is_prepared(root, "tiny-imagenet") and not lock.exists()


def test_url_schemes_in_any_case_and_file_urls_name_local_files(served, tmp_path: Path) -> None:
    """``HTTP://`` is a URL (it was taken for a path); ``file://data/x.zip`` names a host,
    not a relative path, and is refused; ``file:///abs/x.zip`` is that file, the same source
    as its path (it was refused as another source)."""
    base, archive = served
    root = tmp_path / "r"
    upper = base.replace("http://", "HTTP://") + "/mini.zip"
    result = dlops("data", "fetch", "tiny-imagenet", "--root", str(root), "--source", upper, "--md5", md5_file(archive))
    assert result.exit_code == 0, result.output
    assert json.loads(dlops("data", "info", "tiny-imagenet", "--root", str(root), "--json").stdout)["classes"] > 0

    line = one_error_line(
        dlops("data", "fetch", "tiny-imagenet", "--root", str(tmp_path / "h"), "--source", "file://site/mini.zip")
    )
    assert "names the host 'site'" in line and "file:///ABSOLUTE/PATH" in line
    assert not (tmp_path / "h").exists() or list((tmp_path / "h").rglob("*")) == []

    by_path = tmp_path / "p"
    assert dlops("data", "fetch", "tiny-imagenet", "--root", str(by_path), "--source", str(archive)).exit_code == 0
    again = dlops("data", "fetch", "tiny-imagenet", "--root", str(by_path), "--source", archive.as_uri())
    assert again.exit_code == 0, again.output
    assert "already prepared" in again.output
