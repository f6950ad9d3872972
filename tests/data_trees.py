"""Small dataset trees in the real layouts (Tiny ImageNet, STL-10) and helpers around them,
for the data tests: cheap to build, and easy to break in one precise way."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from dlops.data.stl10 import NUM_CLASSES
from dlops.data.stl10 import SIZE as STL_SIZE


def _jpeg(rng: np.random.Generator, size: int = 64, gray: bool = False) -> bytes:
    shape = (size, size) if gray else (size, size, 3)
    # smooth random pictures compress like photos and decode in microseconds
    low = rng.integers(0, 256, size=(8, 8, *shape[2:]), dtype=np.uint8)
    pixels = np.kron(low, np.ones((size // 8, size // 8) + (1,) * (len(shape) - 2), dtype=np.uint8))
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L" if gray else "RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


def wnid(i: int) -> str:
    return f"n{90000000 + i:08d}"


def write_tiny_imagenet(
    parent: Path, classes: int = 3, train_per_class: int = 10, val_per_class: int = 2, seed: int = 0
) -> Path:
    """A ``tiny-imagenet-200/`` tree in the official layout; one train image is grayscale."""
    rng = np.random.default_rng(seed)
    tree = parent / "tiny-imagenet-200"
    ids = [wnid(i) for i in range(classes)]
    (tree / "val" / "images").mkdir(parents=True)
    (tree / "test" / "images").mkdir(parents=True)
    (tree / "wnids.txt").write_text("\n".join(ids) + "\n")
    words = [f"{wnid(i)}\tthing {i}, other name" for i in range(classes)] + [f"{wnid(500)}\tunused, nothing"]
    (tree / "words.txt").write_text("\n".join(words) + "\n")
    for c, w in enumerate(ids):
        folder = tree / "train" / w / "images"
        folder.mkdir(parents=True)
        boxes = []
        for k in range(train_per_class):
            (folder / f"{w}_{k}.JPEG").write_bytes(_jpeg(rng, gray=(c == 0 and k == 1)))
            boxes.append(f"{w}_{k}.JPEG\t0\t0\t63\t63")
        (tree / "train" / w / f"{w}_boxes.txt").write_text("\n".join(boxes) + "\n")
    annotations = []
    for k in range(classes * val_per_class):
        (tree / "val" / "images" / f"val_{k}.JPEG").write_bytes(_jpeg(rng))
        annotations.append(f"val_{k}.JPEG\t{ids[(k * 7 + 1) % classes]}\t1\t2\t60\t61")
    (tree / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    (tree / "test" / "images" / "test_0.JPEG").write_bytes(_jpeg(rng))
    return tree


def zip_tree(tree: Path, path: Path, extra: dict[str, bytes] | None = None) -> Path:
    """Zip ``tree`` with member names relative to its parent (as the official zip);
    ``extra`` adds members by raw name (e.g. ``../evil.txt``)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(tree.rglob("*")):
            zf.write(file, file.relative_to(tree.parent).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def write_stl10(parent: Path, train: int = 30, test: int = 20, unlabeled: int = 7, seed: int = 0) -> tuple[Path, dict]:
    """A ``stl10_binary/`` tree in the official layout (column-major images, labels 1..10);
    returns it and the images (N, 3, 96, 96) and labels 0..9 it should decode to."""
    rng = np.random.default_rng(seed)
    tree = parent / "stl10_binary"
    tree.mkdir(parents=True)
    truth: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for split, n in (("train", train), ("test", test), ("unlabeled", unlabeled)):
        images = rng.integers(0, 256, size=(n, 3, STL_SIZE, STL_SIZE), dtype=np.uint8)
        # STL-10 stores every channel column by column: the transpose of (H, W)
        (tree / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())
        labels = None
        if split != "unlabeled":
            labels = np.arange(n) % NUM_CLASSES
            (tree / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
        truth[split] = (images, labels)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (tree / "class_names.txt").write_text("\n".join(names) + "\n")
    (tree / "fold_indices.txt").write_text(" ".join(str(i) for i in range(train)) + "\n")
    return tree, truth


def tar_tree(tree: Path, path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        tf.add(tree, arcname=tree.name)
    return path


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 (a free port) serving ``directory``; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def serve_stalling(data: bytes) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 that sends the first half of ``data`` for any path
    (with the Content-Length of all of it) and then stalls until it is shut down, so a
    download is caught half-way; ``/loop`` redirects to itself. Yields its base URL."""
    release = threading.Event()

    class Stalling(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/loop":
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            release.wait(60)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def serve_raw(reply: bytes) -> Iterator[str]:
    """A server on 127.0.0.1 that answers any request with the bytes ``reply`` and closes the
    connection: a response cut off mid-body, or a server that does not speak HTTP. Yields its
    base URL."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                    conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()


def one_error_line(result) -> str:
    """The CLI failed with exactly one line on stderr, ``error: ...``, and no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]
