"""The CUDA path: loader on the device, fit on real images, bf16, checkpoints, workers.

Run with ``pytest -m cuda``; every test here skips, with the reason, where no GPU is
visible. They reuse the paths the CPU tests prove (``fit``, ``BatchLoader``, the
checkpoint, ``dlops study run --workers``) and assert on what the GPU produces.
``benchmarks/device_run.sh`` runs them on the GPU machine.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_IMAGENET_SAMPLE, checkpoint_after_one_epoch
from dlops.data import Split, get_dataset
from dlops.data.loader import BatchLoader
from dlops.io import load_checkpoint
from dlops.losses import LOSSES
from dlops.models import ResNet18
from dlops.trainers.base import autocast
from dlops.trainers.resnet import TrainConfig, fit
from specs import tiny_workers_spec

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA GPU visible (torch.cuda.is_available() is False)"
    ),
]

ROOT = Path(__file__).resolve().parents[1]

# Same seed, same history on a GPU, within: bf16 autocast, cuDNN's autotuned kernels
# and the atomics of index_add / scatter differ in the last bits from run to run, and
# a few epochs of SGD amplify that a little.
FIRST_LOSS_RTOL = 0.01  # epoch 0 training loss
LOSS_RTOL = 0.05  # every epoch's training loss
TOP5_ATOL = 0.03  # every epoch's validation top-5 (30 of the sample's 1,000 images)


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Tiny ImageNet sample, fetched into a data root (as the CPU tests do)."""
    if not TINY_IMAGENET_SAMPLE.exists():
        pytest.skip(f"real Tiny ImageNet sample not found at {TINY_IMAGENET_SAMPLE} (set $DLOPS_TINY_IMAGENET_SAMPLE)")
    from typer.testing import CliRunner

    from dlops.cli import app

    root = tmp_path_factory.mktemp("cuda-sample") / "data"
    result = CliRunner().invoke(
        app, ["data", "fetch", "tiny-imagenet", "--root", str(root), "--source", str(TINY_IMAGENET_SAMPLE)]
    )
    assert result.exit_code == 0, result.output
    return root


# --------------------------------------------------------------------------- the loader


def _images(n: int = 700, classes: int = 20, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, size=(n, 3, 64, 64), dtype=np.uint8), np.arange(n, dtype=np.int64) % classes)


@pytest.mark.parametrize("pk", [None, (16, 8)], ids=["shuffled", "pk"])
def test_device_loader_gives_the_cpu_loaders_crops_flips_and_normalised_batches(pk: tuple[int, int] | None) -> None:
    split = _images()
    mean, std = np.array([0.48, 0.45, 0.40]), np.array([0.27, 0.26, 0.28])
    kw = dict(shuffle=True, augment=True, hflip=True, crop_padding=8, seed=5, pk=pk)
    cpu = BatchLoader(split, 128, mean, std, "cpu", **kw)
    resident = BatchLoader(split, 128, mean, std, "cuda", channels_last=True, **kw)
    assert resident._device_images is not None  # the split was uploaded: batches are made on the GPU
    uploaded = BatchLoader(split, 128, mean, std, "cuda", device_cache_bytes=0, **kw)  # pinned copies per batch
    assert uploaded._device_images is None
    m255 = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
    s255 = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
    batches = 0
    for _epoch in range(2):  # the second epoch continues the generators' streams
        for (xc, yc), (xr, yr), (xu, yu) in zip(cpu, resident, uploaded, strict=True):
            assert xr.is_cuda and xr.dtype == torch.float32 and xr.is_contiguous(memory_format=torch.channels_last)
            pixels_cpu = (xc * s255 + m255).round().to(torch.uint8)
            for x, y in ((xr, yr), (xu, yu)):
                x, y = x.cpu(), y.cpu()
                assert torch.equal(y, yc)
                assert torch.equal((x * s255 + m255).round().to(torch.uint8), pixels_cpu)  # the same crops and flips
                torch.testing.assert_close(x, xc, rtol=1e-6, atol=1e-5)  # normalised alike, to float rounding
            batches += 1
    assert batches == 2 * len(cpu) and batches >= 8


# --------------------------------------------------------------------------- fit on real images


# The triplet loss also with softly weighted mining (its softmax over distance rows)
LOSS_VARIANTS = {"ce": {}, "triplet": {}, "triplet-weighted": {"triplet_mining": "weighted"}, "center": {}}


def _loss_of(variant: str) -> str:
    return variant.split("-")[0]


@pytest.mark.parametrize("variant", list(LOSS_VARIANTS))
def test_fit_on_cuda_learns_the_sample_and_repeats_with_the_same_seed(variant: str, sample_root: Path) -> None:
    dataset = get_dataset("tiny-imagenet", sample_root)
    assert dataset.num_classes == 200 and dataset.image_shape == (3, 64, 64)
    config = TrainConfig(
        **LOSS_VARIANTS[variant],
        loss=_loss_of(variant),
        dataset="tiny-imagenet",
        data_root=str(sample_root),
        epochs=4,
        batch_size=128,
        lr=0.05,
        eval_batch_size=1024,
        seed=0,
        device="cuda",
    )
    first = fit(config, dataset=dataset)
    again = fit(config, dataset=dataset)
    assert first.device.type == "cuda" and first.extra_user_attrs["device"]["device"].startswith("cuda")
    h, g = first.history, again.history
    assert len(h["train_loss"]) == 4
    assert all(math.isfinite(v) for v in h["train_loss"]), h["train_loss"]
    assert h["train_loss"][-1] < h["train_loss"][0], h["train_loss"]
    # 200 classes: chance top-5 is 0.025; 0.05 is 5 standard deviations above it on 1,000 images
    assert max(h["val_top5"]) > 0.05, h["val_top5"]
    assert g["train_loss"][0] == pytest.approx(h["train_loss"][0], rel=FIRST_LOSS_RTOL)
    assert g["train_loss"] == pytest.approx(h["train_loss"], rel=LOSS_RTOL)
    assert g["val_top5"] == pytest.approx(h["val_top5"], abs=TOP5_ATOL)


# --------------------------------------------------------------------------- bf16 against fp32


@pytest.mark.parametrize("variant", list(LOSS_VARIANTS))
def test_bf16_autocast_matches_fp32_on_the_same_weights_and_batch(variant: str) -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = ResNet18(200, 3, 64).to(device).to(memory_format=torch.channels_last).eval()  # BN on running stats
    # eval: the centers stay put between calls
    loss_fn = LOSSES[_loss_of(variant)](200, model.embedding_dim, **LOSS_VARIANTS[variant]).to(device).eval()
    x = torch.randn(128, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.arange(32, device=device).repeat_interleave(4)  # P x K: triplets have positives
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
    seen: dict[str, torch.dtype] = {}

    def keep(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        seen["stages"] = output.dtype

    model.stages.register_forward_hook(keep)
    try:
        with torch.no_grad():
            emb32, logits32 = model(x)
            loss32 = loss_fn(emb32, logits32, y)
            with autocast(device):
                emb16, logits16 = model(x)
            assert seen["stages"] == torch.bfloat16  # autocast did run the convolutions in bf16
            assert logits16.dtype == emb16.dtype == torch.float32  # the head and classifier did not
            loss16 = loss_fn(emb16, logits16, y)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b).norm() / b.norm())

    # bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); 18 layers of it stay within a few percent
    assert rel(logits16, logits32) < 0.03
    assert rel(emb16, emb32) < 0.03
    assert math.isfinite(float(loss16))
    assert float(loss16) == pytest.approx(float(loss32), rel=0.02, abs=0.01)


# --------------------------------------------------------------------------- checkpoints


def _digits(loss: str, device: str, **kw) -> TrainConfig:
    base = dict(
        loss=loss,
        dataset="digits",
        width=8,
        subset_per_class=12,
        batch_size=24,
        epochs=3,
        lr=0.02,
        device=device,
        eval_batch_size=64,
        seed=4,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("loss", ["ce", "triplet", "center"])
def test_a_checkpoint_written_on_cuda_resumes_on_cuda_and_on_the_cpu(loss: str, tmp_path: Path) -> None:
    config = _digits(loss, "cuda")
    full = fit(config)
    ckpt = tmp_path / "ckpt.pt"
    checkpoint_after_one_epoch(config, ckpt)
    state = load_checkpoint(ckpt, map_location="cpu")
    assert next(iter(load_checkpoint(ckpt, map_location=None)["model"].values())).is_cuda  # written from the GPU
    on_cpu = tmp_path / "ckpt-cpu.pt"
    shutil.copy(ckpt, on_cpu)

    for device, path in (("cuda", ckpt), ("cpu", on_cpu)):
        reported: list[int] = []
        resumed = fit(
            config.replace(device=device),
            report=lambda e, m, reported=reported: reported.append(e),
            checkpoint_path=path,
        )
        assert resumed.device.type == device and resumed.start_epoch == 1
        assert reported == [0, 1, 2]
        assert next(resumed.model.parameters()).device.type == device
        assert resumed.history["train_loss"][0] == state["history"]["train_loss"][0]  # restored as saved
        assert all(math.isfinite(v) for v in resumed.history["train_loss"])
        # the rest continues the same run: on the GPU to its tolerance; the CPU runs epochs
        # 1-2 in fp32 where the GPU ran bf16, so within bf16's drift over two epochs
        rtol = LOSS_RTOL if device == "cuda" else 0.15
        assert resumed.history["train_loss"] == pytest.approx(full.history["train_loss"], rel=rtol)


# --------------------------------------------------------------------------- two workers, one GPU


def test_two_workers_share_one_gpu_and_each_trains_on_the_device_it_was_given(tmp_path: Path) -> None:
    import optuna

    from dlops.liveness import OWNER_KEY
    from dlops.storage import open_storage

    spec = tiny_workers_spec(tmp_path, name="cuda-workers", epochs=2, per_class=20, n_trials=6)
    url = f"journal://{tmp_path / 'cuda-workers.log'}"
    env = {
        **os.environ,
        "DLOPS_HOME": str(tmp_path / "home"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("DLOPS_STORAGE", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)  # all GPUs visible: dlops hands them out
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dlops.cli",
            "study",
            "run",
            str(spec),
            "--storage",
            url,
            "--workers",
            "2",
            "--n-trials",
            "6",
            "--device",
            "cuda",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    gpus = [str(i) for i in range(torch.cuda.device_count())]
    assert "GPUs: w0 -> 0, w1 -> " + gpus[1 % len(gpus)] in output  # one GPU: both workers get it
    trials = optuna.load_study(study_name="cuda-workers", storage=open_storage(url)).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    assert len({t.system_attrs[OWNER_KEY]["pid"] for t in trials}) == 2  # both workers ran trials
    for t in trials:
        seen = t.user_attrs["device"]
        assert seen["device"] == "cuda" and seen["name"] == torch.cuda.get_device_name(0)
        assert seen["cuda_visible_devices"] in gpus[:2]  # what its worker was given, round robin
