"""The training loop: checkpoints resume exactly; devices; centroid scoring."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import checkpoint_after_one_epoch
from dlops.errors import DlopsError
from dlops.io import load_checkpoint
from dlops.trainers.base import resolve_device
from dlops.trainers.resnet import TrainConfig, fit


def small(loss: str, **kw) -> TrainConfig:
    base = dict(
        loss=loss,
        dataset="digits",
        width=8,
        subset_per_class=12,
        batch_size=24,
        epochs=3,
        lr=0.02,
        device="cpu",
        eval_batch_size=64,
        seed=4,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("loss", ["triplet", "center"])
def test_resume_from_checkpoint_gives_the_same_result_as_an_uninterrupted_run(loss: str, tmp_path: Path) -> None:
    config = small(loss)
    full = fit(config)

    ckpt = tmp_path / "ckpt.pt"
    checkpoint_after_one_epoch(config, ckpt)
    assert ckpt.exists()
    reported = []
    resumed = fit(config, report=lambda e, m: reported.append(e), checkpoint_path=ckpt)
    assert resumed.start_epoch == 1
    assert reported == [0, 1, 2]  # restored epoch re-reported, then the rest
    for key in ("train_loss", "train_acc", "val_top1", "val_top5"):
        assert resumed.history[key] == full.history[key]
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_checkpoint_is_read_onto_the_cpu_whatever_device_resumes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's generators take only a CPU ByteTensor as their state: read with
    ``map_location=device`` on a GPU, the loader's saved generator state came back as a CUDA
    tensor and every resume there (a cut ``dlops final --resume``) failed with "RNG state
    must be a torch.ByteTensor". ``fit`` reads a checkpoint onto the CPU; ``load_state_dict``
    moves the weights, buffers and optimizer state to the device."""
    from dlops.trainers import base

    generator = torch.Generator()
    with pytest.raises(TypeError, match=r"RNG state must be a torch\.ByteTensor"):
        generator.set_state(generator.get_state().to("meta"))  # any device but the CPU, as CUDA

    config = small("center")
    ckpt = tmp_path / "ckpt.pt"
    checkpoint_after_one_epoch(config, ckpt)
    read_with = []
    real = base.load_checkpoint

    def load(path: Path, map_location: object = "cpu") -> object:
        read_with.append(map_location)
        return real(path, map_location=map_location)

    monkeypatch.setattr(base, "load_checkpoint", load)
    resumed = fit(config, checkpoint_path=ckpt)
    assert resumed.start_epoch == 1 and read_with == ["cpu"]


def test_triplet_model_is_scored_by_its_stored_centroids() -> None:
    result = fit(small("triplet", epochs=1))
    centroids = result.model.centroids
    assert centroids.shape == (10, 64) and centroids.abs().sum() > 0
    # L2-normalised embeddings: class means lie inside the unit ball
    assert bool((centroids.norm(dim=1) <= 1.0 + 1e-5).all())


def test_device_choice() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DlopsError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DlopsError, match="no CUDA device"):
            resolve_device("cuda")


def test_compile_runs_batches_through_the_compiled_module_and_keeps_plain_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``compile = true`` trains and evaluates through ``compile_model(model)`` (here a
    stand-in wrapper: compiling takes minutes on a CPU); the checkpoint and the result
    hold the plain model, so they load without ``torch.compile``."""
    import dlops.trainers.resnet as train

    calls = []

    class Wrapped(torch.nn.Module):  # like torch.compile's OptimizedModule: the model is a submodule
        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self._orig_mod = model

        def forward(self, x):
            calls.append(len(x))
            return self._orig_mod(x)

        def __getattr__(self, name: str):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self._orig_mod, name)

    monkeypatch.setattr(train, "compile_model", Wrapped)
    ckpt = tmp_path / "ckpt.pt"
    config = small("triplet", epochs=1)
    result = fit(config.replace(compile=True), checkpoint_path=ckpt)
    assert calls  # batches went through the wrapper (training, centroids, validation)
    saved = load_checkpoint(ckpt)["model"]
    assert not any(k.startswith("_orig_mod") for k in saved) and set(saved) == set(result.model.state_dict())
    plain = fit(config)
    assert result.history["train_loss"] == plain.history["train_loss"]  # the same computation
    assert result.history["val_top5"] == plain.history["val_top5"]


def normalized_split(split, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images as the model sees them (float, per-channel normalised), and its labels."""
    import numpy as np

    def channel(values) -> torch.Tensor:
        return torch.tensor(values).float().view(1, -1, 1, 1)

    x = (torch.from_numpy(np.asarray(split.images)).float() / 255 - channel(mean)) / channel(std)
    return x, torch.from_numpy(np.asarray(split.labels))


def test_evaluate_sums_on_the_device_give_the_whole_split_metrics() -> None:
    from dlops.metrics import topk_accuracy
    from dlops.trainers.base import evaluate

    result = fit(small("ce", epochs=1))
    ds, device = result.dataset, result.device
    mean, std = ds.channel_stats()
    got = evaluate(result.model, result.loss_fn, ds.val, mean, std, device, batch_size=7)  # many batches, a ragged last
    x, y = normalized_split(ds.val, mean, std)
    with torch.no_grad():
        _, logits = result.model.eval()(x)
    acc = topk_accuracy(logits, y)
    assert got["top1"] == pytest.approx(acc[1]) and got["top5"] == pytest.approx(acc[5])
    assert got["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)


def test_a_center_loss_run_validates_its_whole_objective() -> None:
    """val_loss of center loss adds the center term to the cross-entropy, as train_loss
    does, and evaluating leaves the centers where training put them."""
    from dlops.trainers.base import evaluate

    result = fit(small("center", epochs=1, center_lambda=0.5))
    ds, device, loss_fn = result.dataset, result.device, result.loss_fn
    mean, std = ds.channel_stats()
    centers = loss_fn.centers.clone()
    got = evaluate(result.model, loss_fn, ds.val, mean, std, device, batch_size=7)
    torch.testing.assert_close(loss_fn.centers, centers)
    x, y = normalized_split(ds.val, mean, std)
    with torch.no_grad():
        embedding, logits = result.model.eval()(x)
    ce = float(torch.nn.functional.cross_entropy(logits, y))
    center = float(((embedding - centers[y]) ** 2).sum(1).mean())
    assert center > 0.1
    assert got["loss"] == pytest.approx(ce + 0.25 * center, rel=1e-5)
    assert result.history["val_loss"][-1] == pytest.approx(got["loss"], rel=1e-5)


def test_triplet_history_has_diagnostics_and_a_stuck_run_stays_violated() -> None:
    # lr 0: the network never changes, so batch-hard triplets of a random network stay
    # violated (the hardest positive is farther than the nearest negative).
    stuck = fit(small("triplet", lr=0.0, epochs=2, width=4))
    for key in ("triplet_violated", "triplet_pos_dist", "triplet_neg_dist", "embedding_norm"):
        assert len(stuck.history[key]) == 2, key
    assert min(stuck.history["triplet_violated"]) > 0.9
    assert all(p > n for p, n in zip(stuck.history["triplet_pos_dist"], stuck.history["triplet_neg_dist"]))


def test_triplet_violated_fraction_falls_while_a_run_learns() -> None:
    # Easy data (4 digit classes, no augmentation): the triplets get satisfied.
    run = fit(small("triplet", subset_classes=4, subset_per_class=None, augment=False, lr=0.2, epochs=3))
    violated = run.history["triplet_violated"]
    assert violated[-1] < 0.3 and violated[-1] < violated[0] - 0.3, violated
    assert run.history["triplet_neg_dist"][-1] > run.history["triplet_pos_dist"][-1]
    assert run.metrics["val_top1"] > 0.9


def test_weighted_mining_trains_its_own_model_and_learns() -> None:
    # The same easy data, seed and first batches: the weighted means sit between an anchor's
    # nearest and farthest pairs, so its first epoch's loss is below batch-hard's, and the run
    # learns as well.
    config = small("triplet", subset_classes=4, subset_per_class=None, augment=False, lr=0.2, epochs=3)
    hard = fit(config)
    weighted = fit(config.replace(triplet_mining="weighted"))
    assert weighted.history["train_loss"][0] < hard.history["train_loss"][0] - 0.05
    assert weighted.metrics["val_top1"] > 0.9
    assert weighted.history["triplet_neg_dist"][-1] > weighted.history["triplet_pos_dist"][-1]


def test_the_margin_changes_the_run_once_triplets_are_satisfied() -> None:
    # Easy data, as above: once anchors satisfy their hardest triplet, the hinge switches
    # off for them at a distance gap that depends on the margin, so a larger margin drives
    # the negatives farther beyond the positives. (On hard data, where every hardest triplet
    # stays violated, the hinge is margin + d_ap - d_an for every anchor and the margin
    # only shifts the loss.) The embedding is the triplet spec's (a linear head and BatchNorm):
    # on the bare pooled feature, which comes after a ReLU, every embedding lies in the
    # non-negative orthant, no two are farther apart than sqrt(2), and the margin-1.0 run
    # ended with the smaller gap (0.655 against 0.668 for margin 0.05; with the head: 1.243
    # against 0.875).
    gaps = {}
    for margin in (0.05, 1.0):
        config = small("triplet", subset_classes=4, subset_per_class=None, augment=False, lr=0.2, epochs=3)
        h = fit(config.replace(margin=margin, embedding_dim=16, embedding_bn=True)).history
        assert h["triplet_violated"][-1] < h["triplet_violated"][0]
        gaps[margin] = h["triplet_neg_dist"][-1] - h["triplet_pos_dist"][-1]
    assert gaps[1.0] > gaps[0.05] + 0.2, gaps


def test_cross_entropy_history_has_no_triplet_diagnostics() -> None:
    run = fit(small("ce", epochs=1))
    assert "triplet_violated" not in run.history


def test_a_triplet_run_needs_two_images_of_a_class_in_every_batch() -> None:
    # K = 1 (one image per class in a batch): no anchor has a positive, so the loss is 0 at
    # every step, the network never learns, and the violated fraction reads 0.0 as if every
    # triplet were satisfied. It once ran to the end without a word.
    from dlops.trainers.resnet import validate_config

    with pytest.raises(DlopsError, match="samples_per_class must be at least 2"):
        validate_config(small("triplet", samples_per_class=1))
    with pytest.raises(DlopsError, match="samples_per_class must be at least 2"):
        fit(small("triplet", samples_per_class=1, batch_size=8, epochs=1))  # 8 classes x 1 image
    validate_config(small("ce", samples_per_class=1))  # cross-entropy does not read it
    validate_config(small("triplet", samples_per_class=2))


def test_warmup_ramps_the_lr_step_by_step_then_follows_the_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    from dlops.trainers import resnet
    from dlops.trainers.resnet import validate_config, warmup_factor

    config = small("ce", warmup_epochs=2, epochs=4)
    factors = [warmup_factor(config, e, s, 3) for e in range(3) for s in range(3)]
    assert factors == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 1.0, 1.0, 1.0])
    assert warmup_factor(small("ce"), 0, 0, 3) == 1.0  # no warm-up by default

    # The optimizer really runs at those rates: record the lr of every step.
    seen: list[float] = []
    real_step = resnet.train_step

    def recording_step(net, loss_fn, optimizer, *args):
        seen.append(optimizer.param_groups[0]["lr"])
        return real_step(net, loss_fn, optimizer, *args)

    monkeypatch.setattr(resnet, "train_step", recording_step)
    result = fit(config)
    steps = len(seen) // config.epochs
    # The ramp climbs linearly to lr itself over the 2 warm-up epochs. It was once a share of
    # the cosine-scheduled lr: it stalled at each epoch's start, peaked at 0.854 lr here, and
    # with a long warm-up fell before the warm-up ended (10 of 15 epochs: a peak of 0.46 lr in
    # epoch 7, 0.35 lr at its end).
    ramp = [config.lr * (i + 1) / (2 * steps) for i in range(2 * steps)]
    assert seen[: 2 * steps] == pytest.approx(ramp)
    # Then the cosine, from 1 in the last warm-up epoch to 0 after the last: 0.75, then 0.25.
    assert seen[2 * steps :] == pytest.approx([config.lr * 0.75] * steps + [config.lr * 0.25] * steps)
    # The history's lr is the epoch's (in a warm-up epoch, where its ramp ended).
    assert result.history["lr"] == pytest.approx([config.lr * f for f in (0.5, 1.0, 0.75, 0.25)])
    # Without a warm-up, or with one epoch of it, the schedule is the plain cosine over the epochs.
    for warmup in (0, 1):
        plain = small("ce", warmup_epochs=warmup, epochs=5)
        assert [resnet._lr_factor(plain, e) for e in range(5)] == pytest.approx(
            [0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(5)]
        )
    # A warm-up of every epoch ends at lr; a constant schedule is lr after any warm-up.
    assert [resnet._lr_factor(small("ce", warmup_epochs=4, epochs=4), e) for e in range(4)] == [1.0] * 4
    assert [resnet._lr_factor(small("ce", warmup_epochs=2, lr_schedule="constant"), e) for e in range(3)] == [1.0] * 3
    with pytest.raises(DlopsError, match="warmup_epochs must be an integer >= 0, got -1"):
        validate_config(small("ce", warmup_epochs=-1))
    with pytest.raises(DlopsError, match="warmup_epochs = 5 is more than the 4 epochs of the run"):
        validate_config(small("ce", epochs=4, warmup_epochs=5))  # the lr would stop short of its value
    validate_config(small("ce", epochs=4, warmup_epochs=4))


@pytest.mark.parametrize(
    "changes, message",
    [
        # torch's SGD raised these mid-run (a traceback per trial, the study left with FAIL trials)
        ({"weight_decay": -1}, "weight_decay must be a finite number >= 0, got -1"),
        ({"momentum": -1}, r"momentum must be a finite number in \[0, 1\), got -1"),
        ({"momentum": 1.0}, r"momentum must be a finite number in \[0, 1\), got 1.0"),
        ({"lr": 1e308}, r"lr must be a finite number in \(0, 1e\+30\], got 1e\+308"),
        ({"lr": float("inf")}, "lr must be a finite number"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        # null once read "'<=' not supported between instances of 'NoneType' and 'int'"
        ({"lr": None}, "lr must be set: null is not a value of lr"),
        ({"width": None}, "width must be set"),
        ({"augment": None}, "augment must be set"),
        ({"augment": 1}, "augment must be true or false, got 1"),
        ({"width": 2.5}, "width must be an integer, got 2.5"),
        ({"margin": -0.1}, "margin must be a finite number >= 0, got -0.1"),
        ({"center_lambda": -1.0}, "center_lambda must be a finite number >= 0"),
        ({"center_alpha": 1.5}, r"center_alpha must be a finite number in \[0, 1\], got 1.5"),
        ({"subset_classes": 0}, "subset_classes must be an integer >= 1, got 0"),
        ({"centroid_images_per_class": 0}, "centroid_images_per_class must be an integer >= 1"),
    ],
)
def test_validate_refuses_settings_no_run_could_use(changes: dict, message: str) -> None:
    from dlops.trainers.resnet import validate_config

    with pytest.raises(DlopsError, match=message):
        validate_config(small("center", **changes))


def test_validate_draws_each_bound_where_the_setting_means_it() -> None:
    """The edges a run can use pass, the values just past them do not."""
    from dlops.trainers.resnet import validate_config

    for name, good, bad in [
        ("momentum", 0.0, 1.0),
        ("momentum", 0.999, -1e-9),
        ("weight_decay", 0.0, -1e-12),
        ("margin", 0.0, -1e-9),
        ("center_lambda", 0.0, -1e-9),
        ("center_alpha", 0.0, -1e-9),
        ("center_alpha", 1.0, 1.0 + 1e-9),
        ("lr", 1e30, 1e31),
        ("lr", 1, float("-inf")),  # an int where a float is wanted is fine
        ("subset_classes", None, 0),  # None: every class
        ("centroid_images_per_class", None, 0),
    ]:
        validate_config(small("center", **{name: good}))
        with pytest.raises(DlopsError, match=f"^{name} must be"):
            validate_config(small("center", **{name: bad}))
