"""Every kind of bad input gets one line naming the file or option, no traceback, and nothing half-written."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from edgeinspect.calibration.cli import eval_app
from edgeinspect.runtime.commands.run import app as run_app
from edgeinspect.train.cli import app as train_app

runner = CliRunner()


def fails_with(app, args, message):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    return result


@pytest.fixture(scope="module")
def trained(mvtec_like, tmp_path_factory):
    from edgeinspect.calibration.cli import calibrate_app
    from edgeinspect.export.cli import app as export_app

    run_dir = tmp_path_factory.mktemp("run")
    for app, args in [(train_app, ["patchcore", "--data", mvtec_like, "--out", run_dir, "--image-size", 64]),
                      (export_app, [run_dir]), (calibrate_app, [run_dir / "bundle"])]:
        assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    return run_dir


def test_missing_and_empty_data_folders(tmp_path):
    fails_with(train_app, ["patchcore", "--data", tmp_path / "nope", "--out", tmp_path / "r"], "no such folder")
    (tmp_path / "empty").mkdir()
    fails_with(train_app, ["patchcore", "--data", tmp_path / "empty", "--out", tmp_path / "r"], "holds no images")
    assert not (tmp_path / "r").exists()


def test_corrupt_files_are_skipped_with_a_warning_and_fail_when_none_are_left(mvtec_like, tmp_path):
    data = tmp_path / "good"
    shutil.copytree(mvtec_like / "train" / "good", data)
    (data / "broken.png").write_bytes(b"not a png")
    (data / "notes.txt").write_text("hello")
    result = runner.invoke(train_app, ["patchcore", "--data", str(data), "--out", str(tmp_path / "r"),
                                       "--image-size", "64"])
    assert result.exit_code == 0, result.output
    assert "broken.png: not a readable image" in result.output and "notes.txt: not a readable image" in result.output
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(6):
        (junk / f"{i}.png").write_bytes(b"garbage")
    fails_with(train_app, ["patchcore", "--data", junk, "--out", tmp_path / "r2"], "could be read as images")
    assert not (tmp_path / "r2" / "run.json").exists()


def test_too_few_good_images(mvtec_like, tmp_path):
    data = tmp_path / "few"
    data.mkdir()
    for path in sorted((mvtec_like / "train" / "good").iterdir())[:3]:
        shutil.copy(path, data)
    fails_with(train_app, ["patchcore", "--data", data, "--out", tmp_path / "r"], "need at least 5")


def test_tampered_missing_and_newer_bundles(trained, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(trained / "bundle", bundle)
    with open(bundle / "model.onnx", "ab") as f:
        f.write(b"\0")
    fails_with(run_app, [bundle, "--source", tmp_path], "sha256 does not match")
    (bundle / "model.onnx").unlink()
    fails_with(run_app, [bundle, "--source", tmp_path], "missing from the bundle")
    shutil.copy(trained / "bundle" / "model.onnx", bundle)
    record = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**record, "format_version": 99}))
    fails_with(run_app, [bundle, "--source", tmp_path], "newer than this runtime reads")


def test_camera_that_does_not_open(trained, tmp_path):
    fails_with(run_app, [trained / "bundle", "--camera", 57, "--out", tmp_path], "--camera 57: could not be opened")


def test_mask_of_the_wrong_size(trained, mvtec_like, tmp_path):
    import cv2
    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(mvtec_like, data)
    cv2.imwrite(str(data / "ground_truth" / "pasted" / "000_mask.png"), np.zeros((10, 12), np.uint8))
    fails_with(eval_app, [trained / "bundle", "--data", data, "--out", tmp_path / "e.json"], "mask is 12x10")
    assert not (tmp_path / "e.json").exists()
