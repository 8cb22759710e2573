"""The shared gradient loop: best epoch kept, early stopping, Ctrl-C keeps the best weights."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgeinspect.runtime.console import InspectError, progress_bar
from edgeinspect.train.cli import app as train_app
from edgeinspect.train.configs import GradientConfig
from edgeinspect.train.fitting import batches, fit_by_gradient, map_in_batches
from edgeinspect.train.run import load_run


class Scripted(torch.nn.Module):
    """A one-parameter model whose validation losses follow a script; training raises after `stop_after` steps."""

    def __init__(self, validation_losses, stop_after=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.validation_losses, self.stop_after, self.steps = list(validation_losses), stop_after, 0

    def loss(self, x):
        if self.training:
            self.steps += 1
            if self.stop_after is not None and self.steps > self.stop_after:
                raise KeyboardInterrupt
            return (self.weight - 1) ** 2 + x.sum() * 0
        return torch.tensor(self.validation_losses.pop(0))


def fit(model, epochs=10, patience=3):
    saved = []
    data = (torch.zeros(4, 1),)
    config = GradientConfig(epochs=epochs, batch_size=4, learning_rate=0.1, patience=patience)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with progress_bar() as bar:
        summary = fit_by_gradient(model, model.loss, optimizer, data, data, config, bar,
                                  lambda s: saved.append((s["best_epoch"], float(model.weight.detach()))))
    return summary, saved


def test_best_epoch_is_kept_and_training_stops_early():
    model = Scripted([3.0, 1.0, 2.0, 2.0, 2.0, 0.5])
    summary, saved = fit(model)
    assert (summary["best_epoch"], summary["epochs_run"], summary["stopped"]) == (2, 5, "early")
    assert [epoch for epoch, _ in saved] == [1, 2]
    assert float(model.weight.detach()) == pytest.approx(saved[-1][1])  # weights of epoch 2, not of epoch 5


def test_ctrl_c_keeps_the_best_weights_so_far():
    model = Scripted([3.0, 1.0, 2.0], stop_after=3)
    summary, saved = fit(model)
    assert (summary["stopped"], summary["best_epoch"]) == ("interrupted", 2)
    assert float(model.weight.detach()) == pytest.approx(saved[-1][1])


def test_a_diverging_run_keeps_its_best_epoch_and_one_that_never_converged_is_refused():
    model = Scripted([3.0, 1.0, float("nan"), 0.5])
    summary, _ = fit(model)
    assert (summary["stopped"], summary["best_epoch"], summary["epochs_run"]) == ("diverged", 2, 3)
    with pytest.raises(InspectError, match="diverged.*epoch 1 is inf.*--lr"):
        fit(Scripted([float("inf"), 1.0]))


def test_outputs_filled_batch_by_batch_equal_the_whole_at_once():
    images = np.random.default_rng(0).integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)

    def outputs(batch):  # one row per image, and four rows per image (as PatchCore's patches)
        return batch[:, 0, 0], batch[:, :2, :2].reshape(-1, 3)

    got = map_in_batches(outputs, images, batch_size=3)  # batches of 3, 3 and 1
    want = outputs(torch.from_numpy(images))
    assert [g.shape for g in got] == [(7, 3), (28, 3)] and all(torch.equal(g, w) for g, w in zip(got, want))


def test_batches_cover_everything_and_never_leave_a_single_sample():
    sizes = [len(b) for b in batches(33, 8)]
    assert sum(sizes) == 33 and min(sizes) > 1
    assert sorted(torch.cat(batches(10, 4, torch.Generator().manual_seed(0))).tolist()) == list(range(10))


def test_interrupted_training_leaves_a_complete_run(mvtec_like, tmp_path, monkeypatch):
    import edgeinspect.train.fitting as fitting

    calls = {"n": 0}
    original = fitting.mean_loss

    def interrupt_in_third_validation(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(fitting, "mean_loss", interrupt_in_third_validation)
    result = CliRunner().invoke(train_app, ["stpm", "--data", str(mvtec_like), "--out", str(tmp_path),
                                            "--image-size", "64", "--epochs", "5", "--lr", "0.01"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["state"] == "interrupted" and record["training"]["epochs_run"] == 2
    load_run(tmp_path)  # the checkpoint restores
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "run.json"]


def test_too_few_good_images_to_split(tmp_path):
    import cv2
    import numpy as np

    for i in range(4):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((40, 40, 3), 100 + i, np.uint8))
    result = CliRunner().invoke(train_app, ["stpm", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "need at least 5" in result.output
    assert not (tmp_path / "run").exists()
