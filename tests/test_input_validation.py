"""Bad input is stopped where it enters, with one line naming the file or option and what is wrong: calibration
options, hand-edited bundle.json, hostile image files, unwritable --out folders, out-of-range numbers, too few
calibration images, missing masks, an existing run folder, and staging folders left by killed exports."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from edgeinspect.calibration.cli import calibrate_app, eval_app
from edgeinspect.export.cli import app as export_app
from edgeinspect.runtime.commands.bench import app as bench_app
from edgeinspect.runtime.inference.bundle import BUNDLE_RECORD, Bundle, load_bundle, validate_record
from edgeinspect.runtime.console import InspectError
from edgeinspect.runtime.datasets import open_dataset
from edgeinspect.runtime.files import remove_stale_staging, staging_dir, writable_dir, writable_file_parent
from edgeinspect.runtime.inference.images import read_image
from edgeinspect.train.cli import app as train_app
from edgeinspect.train.cli import parse_size

runner = CliRunner()


def invoke(app, *args):
    return runner.invoke(app, [str(a) for a in args])


def fails_with(app, args, *messages):
    """Exit code 2, one `error:` line holding every message, no traceback."""
    result = invoke(app, *args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for message in messages:
        assert message in result.output.replace("\n", " "), result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    return result


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    target.mkdir()
    for name in ("run.json", "model.pt"):
        shutil.copy(run_dir / name, target)
    return target


def read_only_folder(tmp_path: Path) -> Path:
    """A folder nobody may write into, root included (tests run as root in CI: a chmod 555 folder would not do)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc as a folder even root cannot write into")
    return Path("/proc")


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# 1. --k and --fpr -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, option", [
    (["--k", "nan"], "--k"), (["--k", "inf"], "--k"), (["--k", "0"], "--k"), (["--k", "-2"], "--k"),
    (["--method", "quantile", "--fpr", "0"], "--fpr"), (["--method", "quantile", "--fpr", "1"], "--fpr"),
    (["--method", "quantile", "--fpr", "nan"], "--fpr"),
])
def test_calibrate_refuses_k_and_fpr_that_are_not_finite_or_in_range(patchcore_bundle, tmp_path, args, option):
    bundle = copy_bundle(patchcore_bundle, tmp_path)
    before = (bundle / BUNDLE_RECORD).read_bytes()
    fails_with(calibrate_app, [bundle, *args], option)
    assert (bundle / BUNDLE_RECORD).read_bytes() == before


def test_a_threshold_is_never_written_unless_finite(patchcore_bundle, tmp_path, monkeypatch):
    from edgeinspect.calibration import thresholds

    class InfiniteScores:  # a broken model: one good image scores +inf
        def __init__(self, *args, **kwargs):
            pass

        def infer_files(self, paths, batch_size=8, progress=None):
            for index, path in enumerate(paths):
                yield path, None, np.full((4, 4), float(index), np.float32), float("inf") if index == 1 else index

    monkeypatch.setattr(thresholds, "Inspector", InfiniteScores)
    bundle = copy_bundle(patchcore_bundle, tmp_path)
    before = (bundle / BUNDLE_RECORD).read_bytes()
    fails_with(calibrate_app, [bundle], "non-finite score", "no threshold written")
    assert (bundle / BUNDLE_RECORD).read_bytes() == before
    record = json.loads(before)
    record["thresholds"]["image"]["threshold"] = float("nan")
    with pytest.raises(InspectError, match=r"thresholds\.image\.threshold must be a finite number"):
        Bundle(bundle, record).save()
    assert (bundle / BUNDLE_RECORD).read_bytes() == before


# 2. bundle.json ---------------------------------------------------------------------------------------------------

def _set(path, value):
    def edit(record):
        *parents, last = path
        for key in parents:
            record = record[key]
        record[last] = value
    return edit


def _drop(*path):
    def edit(record):
        *parents, last = path
        for key in parents:
            record = record[key]
        del record[last]
    return edit


HAND_EDITS = {  # edit → what the one-line error must name
    "a list instead of an object": (lambda record: [record], "must be a JSON object, got a list"),
    "missing input": (_drop("input"), "input is missing"),
    "size as a string": (_set(["input", "size"], "256"), 'input.size must be [height, width] of whole numbers ≥ 1'),
    "size of zeros": (_set(["input", "size"], [0, 0]), "input.size must be [height, width]"),
    "size of three numbers": (_set(["input", "size"], [64, 64, 3]), "input.size must be [height, width]"),
    "size with a fraction": (_set(["input", "size"], [64.5, 64]), "input.size must be [height, width]"),
    "size of 100000": (_set(["input", "size"], [100000, 100000]), "input.size must be [height, width]"),
    "missing input name": (_drop("input", "name"), "input.name is missing"),
    "threshold as a word": (_set(["thresholds", "image", "threshold"], "high"),
                            'thresholds.image.threshold must be a finite number, got "high"'),
    "null image threshold": (_set(["thresholds", "image", "threshold"], None),
                             "thresholds.image.threshold must be a finite number, got null"),
    "empty pixel entry": (_set(["thresholds", "pixel"], {}), "thresholds.pixel.threshold is missing"),
    "thresholds as a list": (_set(["thresholds"], []), "thresholds must be null (not calibrated) or an object"),
    "empty thresholds": (_set(["thresholds"], {}), "thresholds.image is missing"),
    "renamed outputs": (_set(["outputs"], ["heatmap", "score"]), 'outputs must be ["anomaly_map", "score"]'),
    "missing outputs": (_drop("outputs"), "outputs is missing"),
    "missing model_file": (_drop("model_file"), "model_file is missing"),
    "model_file outside the bundle": (_set(["model_file"], "../model.onnx"), "model_file must be a file name"),
    "model_file not listed in files": (_set(["model_file"], "other.onnx"), "model_file 'other.onnx' is not listed"),
    "files as a list": (_set(["files"], []), "files must be an object"),
    "short sha256": (_set(["files", "model.onnx", "sha256"], "abc"), 'files["model.onnx"].sha256 must be 64'),
    "format_version as a string": (_set(["format_version"], "1"), "format_version must be a whole number"),
    "missing format_version": (_drop("format_version"), "format_version is missing"),
    "engine as a word": (_set(["engine"], "yes"), "engine must be null or an object"),
    "batch profile of zeros": (_set(["batch_profile"], [0, 1, 8]), "batch_profile must be [min, opt, max]"),
    "fp16 model as a number": (_set(["fp16_model_file"], 5), "fp16_model_file must be null or a file name"),
    "validation images as a string": (_set(["training", "validation"], "a.png"),
                                      "training.validation must be a list of image paths"),
    "tensorrt check as a word": (_set(["tensorrt_check"], "ok"), "tensorrt_check must be null or"),
}


@pytest.mark.parametrize("edit", list(HAND_EDITS))
def test_hand_edits_of_bundle_json_are_one_line_errors_naming_the_field(patchcore_bundle, tmp_path, edit):
    bundle = copy_bundle(patchcore_bundle, tmp_path)
    change, message = HAND_EDITS[edit]
    record = json.loads((bundle / BUNDLE_RECORD).read_text())
    record.setdefault("batch_profile", [1, 1, 8])
    changed = change(record)
    (bundle / BUNDLE_RECORD).write_text(json.dumps(record if changed is None else changed))
    with pytest.raises(InspectError) as raised:
        load_bundle(bundle)
    text = str(raised.value)
    assert text.startswith(f"{bundle / BUNDLE_RECORD}: ") and message in text and "\n" not in text, text
    fails_with(calibrate_app, [bundle], str(bundle / BUNDLE_RECORD), message)


@pytest.mark.parametrize("replacement, message", [
    ("NaN", "NaN is not a number JSON allows"), ("Infinity", "Infinity is not a number JSON allows"),
    ("-Infinity", "-Infinity is not a number JSON allows"), ("1e999", "1e999 is out of the range of a number"),
])
def test_json_nan_and_infinity_are_refused(patchcore_bundle, tmp_path, replacement, message):
    bundle = copy_bundle(patchcore_bundle, tmp_path)
    record = json.loads((bundle / BUNDLE_RECORD).read_text())
    record["thresholds"]["image"]["threshold"] = 123.25
    text = json.dumps(record).replace("123.25", replacement)
    (bundle / BUNDLE_RECORD).write_text(text)
    fails_with(calibrate_app, [bundle], f"{bundle / BUNDLE_RECORD}: not valid JSON", message)
    (bundle / BUNDLE_RECORD).write_text(json.dumps(record)[:-20])
    fails_with(calibrate_app, [bundle], f"{bundle / BUNDLE_RECORD}: not valid JSON")


def test_every_bundle_the_exporter_and_calibrator_write_is_accepted(kind_bundle, patchcore_bundle):
    for folder in (kind_bundle, patchcore_bundle):
        record = load_bundle(folder).record
        validate_record(record, folder / BUNDLE_RECORD)
    record = load_bundle(patchcore_bundle).record
    path = patchcore_bundle / BUNDLE_RECORD
    variants = [
        {**record, "thresholds": None},  # exported, not calibrated
        {k: v for k, v in record.items() if k not in ("engine", "fp16_model_file", "batch_profile", "precision",
                                                      "tensorrt_check", "training")},  # older or leaner records
        {**record, "engine": None, "fp16_model_file": None, "tensorrt_check": None},
        {**record, "engine": {"file": "model.engine", "tensorrt": "10.13.3", "gpu": "NVIDIA Jetson Orin",
                              "compute_capability": "8.7", "batch_sizes": [1, 1, 8], "precision": "fp16"},
         "fp16_model_file": "model.onnx", "batch_profile": [1, 2, 16], "something_new": {"any": [1, "x"]}},
    ]
    for variant in variants:
        validate_record(variant, path)


# 3. image files ---------------------------------------------------------------------------------------------------

def test_images_with_absurd_sizes_or_unsupported_pixel_types_are_one_line_errors(tmp_path):
    huge = tmp_path / "huge.png"  # a PGM header claiming 99999×99999 pixels, named .png, with 100 bytes of data
    huge.write_bytes(b"P5\n99999 99999\n255\n" + bytes(100))
    wide = tmp_path / "wide.pgm"  # under Pillow's own bomb limit, over ours (and over 65536 pixels a side)
    wide.write_bytes(b"P5\n70000 100\n255\n" + bytes(100))
    floats = tmp_path / "floats.tiff"
    assert cv2.imwrite(str(floats), np.random.default_rng(0).random((32, 32), dtype=np.float32))
    signed = tmp_path / "signed.tiff"
    assert cv2.imwrite(str(signed), np.full((16, 16), -5, np.int16))
    truncated = tmp_path / "truncated.png"
    assert cv2.imwrite(str(tmp_path / "fine.png"), np.zeros((40, 40, 3), np.uint8))
    truncated.write_bytes((tmp_path / "fine.png").read_bytes()[:50])
    for path, message in [(huge, "too large"), (wide, "too large"), (floats, "unsupported pixel type (float32"),
                          (signed, "unsupported pixel type (int16"), (truncated, "not a readable image"),
                          (tmp_path / "absent.png", "not a readable image")]:
        with pytest.raises(InspectError) as raised:
            read_image(path)
        assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value), str(raised.value)
    assert read_image(tmp_path / "fine.png").shape == (40, 40, 3)
    assert cv2.imwrite(str(tmp_path / "deep.png"), np.full((8, 8), 40000, np.uint16))
    assert read_image(tmp_path / "deep.png").dtype == np.uint8


def test_hostile_images_among_good_ones_are_skipped_by_name(patchcore_bundle, mvtec_like, tmp_path):
    good = tmp_path / "good"
    shutil.copytree(mvtec_like / "train" / "good", good)
    (good / "huge.png").write_bytes(b"P5\n99999 99999\n255\n" + bytes(100))
    assert cv2.imwrite(str(good / "floats.tiff"), np.ones((32, 32), np.float32))
    result = invoke(calibrate_app, copy_bundle(patchcore_bundle, tmp_path), "--images", good)
    assert result.exit_code == 0, result.output
    assert "huge.png: image is too large" in result.output and "floats.tiff: unsupported pixel type" in result.output


# 4. --out that is a file or a read-only folder --------------------------------------------------------------------

def test_output_helpers(tmp_path):
    (tmp_path / "a-file").write_text("")
    assert writable_dir(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert (tmp_path / "new" / "deeper").is_dir() and not list((tmp_path / "new" / "deeper").iterdir())
    with pytest.raises(InspectError, match="--out .*a-file: is a file, not a folder"):
        writable_dir(tmp_path / "a-file", "--out")
    with pytest.raises(InspectError, match="--out .*a-file/x: .*a-file is a file, not a folder"):
        writable_dir(tmp_path / "a-file" / "x", "--out")
    with pytest.raises(InspectError, match="--report .*: cannot write there"):
        writable_dir(read_only_folder(tmp_path), "--report")
    assert writable_file_parent(tmp_path / "out" / "e.json", "--out") == tmp_path / "out" / "e.json"
    with pytest.raises(InspectError, match="is a folder; give a file name"):
        writable_file_parent(tmp_path, "--out")
    with pytest.raises(InspectError, match="--out .*e.json: cannot write there"):
        writable_file_parent(read_only_folder(tmp_path) / "e.json", "--out")


def test_every_command_refuses_an_unwritable_out_before_working(patchcore_bundle, mvtec_like, tmp_path, monkeypatch):
    from edgeinspect.calibration import cli as calibration_cli

    def never(*args, **kwargs):
        raise AssertionError("computed before checking where the results go")

    monkeypatch.setattr(calibration_cli, "predict", never)
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    locked = read_only_folder(tmp_path)
    run_dir = copy_run(patchcore_bundle.parent, tmp_path)
    data = ["--data", mvtec_like]
    cases = [
        (train_app, ["patchcore", *data, "--out", a_file], "--out", "is a file, not a folder"),
        (train_app, ["patchcore", *data, "--out", locked / "run"], "--out", "cannot write there"),
        (export_app, [run_dir, "--out", a_file], "--out", "is a file, not a folder"),
        (export_app, [run_dir, "--out", locked / "bundle"], "--out", "cannot write there"),
        (export_app, [run_dir, "--out", mvtec_like], "--out", "holds files but no bundle.json"),
        (eval_app, [patchcore_bundle, *data, "--out", a_file / "eval.json"], "--out", "is a file, not a folder"),
        (eval_app, [patchcore_bundle, *data, "--out", locked / "eval.json"], "--out", "cannot write there"),
        (eval_app, [patchcore_bundle, *data, "--out", tmp_path], "--out", "is a folder"),
        (eval_app, [patchcore_bundle, *data, "--out", tmp_path / "e.json", "--report", a_file], "--report",
         "is a file, not a folder"),
        (eval_app, [patchcore_bundle, *data, "--out", tmp_path / "e.json", "--report", locked / "r"], "--report",
         "cannot write there"),
        (bench_app, [patchcore_bundle, "--out", a_file / "bench.json"], "--out", "is a file, not a folder"),
        (bench_app, [patchcore_bundle, "--out", locked / "bench.json"], "--out", "cannot write there"),
    ]
    for app, args, option, message in cases:
        fails_with(app, args, option, message)
    assert a_file.read_text() == "keep me" and not (tmp_path / "e.json").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == ["model.pt", "run.json"]
    fails_with(export_app, [tmp_path / "no-such-run"], "no-such-run: not a training run")
    assert not (tmp_path / "no-such-run").exists()  # a mistyped RUN is not made as RUN/bundle's parent


# 5. numbers and options -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("app, args, message", [
    (eval_app, ["BUNDLE", "--data", "DATA", "--batch-size", "0"], "--batch-size must be at least 1"),
    (bench_app, ["BUNDLE", "--frames", "0"], "--frames must be at least 1"),
    (bench_app, ["BUNDLE", "--batch", "0"], "--batch must be at least 1"),
    (bench_app, ["BUNDLE", "--runs", "0"], "--runs must be at least 1"),
    (bench_app, ["BUNDLE", "--threads", "0"], "--threads must be at least 1"),
    (bench_app, ["BUNDLE", "--backend", "gpu"], "--backend 'gpu' is not one of"),
    (export_app, ["RUN", "--opset", "5"], "--opset must be from 13 to 23"),
    (export_app, ["RUN", "--opset", "24"], "--opset must be from 13 to 23"),
    (export_app, ["RUN", "--workspace-mb", "0"], "--workspace-mb must be from 1"),
    (export_app, ["RUN", "--workspace-mb", "99999999999999999999"], "--workspace-mb must be from 1"),
    (train_app, ["stpm", "--data", "DATA", "--out", "OUT", "--lr", "inf"], "--lr must be a finite number above 0"),
    (train_app, ["stpm", "--data", "DATA", "--out", "OUT", "--lr", "nan"], "--lr must be a finite number above 0"),
    (train_app, ["autoencoder", "--data", "DATA", "--out", "OUT", "--lr", "-1"], "--lr must be a finite number"),
    (train_app, ["patchcore", "--data", "DATA", "--out", "OUT", "--image-size", "100000"],
     "--image-size '100000': give auto, N or HxW, each side from 32 to 4096 pixels"),
    (train_app, ["patchcore", "--data", "DATA", "--out", "OUT", "--image-size", "64x9000"], "from 32 to 4096"),
    (train_app, ["patchcore", "--data", "DATA", "--out", "OUT", "--val-fraction", "0"], "--val-fraction must be"),
    (train_app, ["patchcore", "--data", "DATA", "--out", "OUT", "--val-fraction", "1"], "--val-fraction must be"),
    (train_app, ["patchcore", "--data", "DATA", "--out", "OUT", "--val-fraction", "nan"], "--val-fraction must be"),
    (train_app, ["patchcore", "--data", "DATA", "--out", "OUT", "--val-fraction", "0.99"],
     "--val-fraction 0.99 holds out all 20 good images"),
    (train_app, ["patchcore", "--data", "DATA", "--out", "OUT", "--coreset-ratio", "nan"], "--coreset-ratio"),
    (train_app, ["patchcore", "--data", "DATA", "--out", "OUT", "--max-bank", "0"], "--max-bank"),
    (train_app, ["patchcore", "--data", "DATA", "--out", "OUT", "--feature-dim", "-1"], "--feature-dim must be"),
    (train_app, ["patchcore", "--data", "DATA", "--out", "OUT", "--feature-dim", "153"],
     "--feature-dim 153 is more than the 152 channels"),
    (train_app, ["dfr", "--data", "DATA", "--out", "OUT", "--variance-kept", "0"], "--variance-kept"),
    (train_app, ["dfr", "--data", "DATA", "--out", "OUT", "--variance-kept", "1.5"], "--variance-kept"),
    (train_app, ["dfr", "--data", "DATA", "--out", "OUT", "--latent-dim", "0"], "--latent-dim must be at least 1"),
    (train_app, ["dfr", "--data", "DATA", "--out", "OUT", "--latent-dim", "193"],
     "--latent-dim 193 is more than the 192 regional feature channels"),
    (train_app, ["patchcore", "--data", "DATA", "--out", "OUT", "--seed", "-1"], "--seed must be between 0 and"),
    (train_app, ["stpm", "--data", "DATA", "--out", "OUT", "--seed", "4294967296"], "--seed must be between 0 and"),
    (train_app, ["stpm", "--data", "DATA", "--out", "OUT", "--weights", "no-such.pt"], "--weights no-such.pt"),
])
def test_numbers_are_checked_where_they_enter(patchcore_bundle, mvtec_like, tmp_path, app, args, message):
    run_dir = copy_run(patchcore_bundle.parent, tmp_path) if "RUN" in args else None
    names = {"BUNDLE": patchcore_bundle, "DATA": mvtec_like, "OUT": tmp_path / "out", "RUN": run_dir}
    fails_with(app, [names.get(a, a) for a in args], message)
    assert not (tmp_path / "out" / "run.json").exists()
    if run_dir is not None:
        assert sorted(p.name for p in run_dir.iterdir()) == ["model.pt", "run.json"]


def test_image_size_is_capped_before_anything_is_allocated():
    assert parse_size("256") == (256, 256) and parse_size("64x4096") == (64, 4096)
    for text in ("100000", "31", "0x64", "64x64x64", "big"):
        with pytest.raises(InspectError, match="--image-size"):
            parse_size(text)


def test_export_check_on_a_corrupt_model_names_the_sha256_mismatch(patchcore_bundle, tmp_path):
    bundle = copy_bundle(patchcore_bundle, tmp_path)
    assert invoke(export_app, bundle, "--check").exit_code == 0
    with open(bundle / "model.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\xff\xfe")
    fails_with(export_app, [bundle, "--check"], "model.onnx: sha256 does not match bundle.json")


# 6. enough good images for μ+3σ ------------------------------------------------------------------------------------

def test_calibration_needs_two_varied_good_images_and_warns_below_twenty(patchcore_bundle, mvtec_like, tmp_path):
    bundle = copy_bundle(patchcore_bundle, tmp_path)
    before = (bundle / BUNDLE_RECORD).read_bytes()
    good = sorted((mvtec_like / "train" / "good").iterdir())
    one, same, few = (tmp_path / name for name in ("one", "same", "few"))
    for folder in (one, same, few):
        folder.mkdir()
    shutil.copy(good[0], one)
    shutil.copy(good[0], same / "a.png")
    shutil.copy(good[0], same / "b.png")
    (one / "broken.png").write_bytes(b"not an image")
    for path in good[:3]:
        shutil.copy(path, few)
    fails_with(calibrate_app, [bundle, "--images", one], "need at least 2")
    fails_with(calibrate_app, [bundle, "--images", same], "σ = 0", "no threshold written")
    fails_with(calibrate_app, [bundle, "--images", same, "--method", "quantile"], "σ = 0")
    assert (bundle / BUNDLE_RECORD).read_bytes() == before
    result = invoke(calibrate_app, bundle, "--images", few)
    assert result.exit_code == 0, result.output
    assert "only 3 good images" in result.output and "rough estimate" in result.output and "20" in result.output
    assert load_bundle(bundle).thresholds["image"]["n"] == 3


# 7. a defect image without its mask -------------------------------------------------------------------------------

def test_a_missing_mask_is_an_error_naming_it_not_all_good_pixels(patchcore_bundle, mvtec_like, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(mvtec_like, data)
    missing = data / "ground_truth" / "pasted" / "003_mask.png"
    missing.unlink()
    fails_with(eval_app, [patchcore_bundle, "--data", data, "--out", tmp_path / "e.json"], f"{missing}: mask missing",
               str(data / "test" / "pasted" / "003.png"))
    assert not (tmp_path / "e.json").exists()
    shutil.rmtree(data / "ground_truth")  # no ground truth at all: image labels only, no pixel metrics
    assert not open_dataset(str(data)).has_masks
    result = invoke(eval_app, patchcore_bundle, "--data", data, "--out", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    assert "pixel_auroc" not in json.loads((tmp_path / "e.json").read_text())["metrics"]["overall"]


# 8. an existing run folder ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["patchcore", "stpm", "dfr", "autoencoder"])
def test_training_refuses_a_folder_that_holds_a_run(patchcore_bundle, mvtec_like, tmp_path, kind):
    run_dir = copy_run(patchcore_bundle.parent, tmp_path)
    before = (run_dir / "run.json").read_bytes()
    fails_with(train_app, [kind, "--data", mvtec_like, "--out", run_dir, "--image-size", 64],
               f"--out {run_dir}: already holds a training run", "--overwrite")
    assert (run_dir / "run.json").read_bytes() == before


def test_overwrite_replaces_the_run_and_removes_its_stale_bundle(patchcore_bundle, mvtec_like, tmp_path):
    run_dir = copy_run(patchcore_bundle.parent, tmp_path)
    shutil.copytree(patchcore_bundle, run_dir / "bundle")
    fails_with(train_app, ["autoencoder", "--data", mvtec_like, "--out", run_dir, "--image-size", 64, "--epochs", 1],
               "--overwrite")
    assert (run_dir / "bundle" / BUNDLE_RECORD).is_file()
    result = invoke(train_app, "autoencoder", "--data", mvtec_like, "--out", run_dir, "--image-size", 64,
                    "--epochs", 1, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "run.json").read_text())["model"] == "autoencoder"
    assert sorted(p.name for p in run_dir.iterdir()) == ["model.pt", "run.json"]


# 9. staging folders of killed exports -----------------------------------------------------------------------------

def test_staging_folders_carry_the_pid_and_stale_ones_are_removed(tmp_path):
    target = tmp_path / "bundle"
    dead, alive = dead_pid(), os.getppid()
    stale = [tmp_path / f".bundle.staging-{dead}-abcd1234", tmp_path / f".bundle.old-{dead}"]
    kept = [tmp_path / f".bundle.staging-{alive}-abcd1234", tmp_path / f".other.staging-{dead}-abcd1234",
            tmp_path / ".bundle.staging-abcd1234"]  # a live writer's, another target's, a recent pre-pid one
    for folder in stale + kept:
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"half")
    assert remove_stale_staging(target) == [stale[0]]  # .old-PID waits until the target exists again
    target.mkdir()
    staging = staging_dir(target)
    assert re.fullmatch(rf"\.bundle\.staging-{os.getpid()}-\w+", staging.name) and staging.is_dir()
    assert not any(folder.exists() for folder in stale) and all(folder.exists() for folder in kept)


def test_exports_remove_staging_folders_that_killed_exports_left(patchcore_bundle, tmp_path):
    run_dir = copy_run(patchcore_bundle.parent, tmp_path)
    dead = dead_pid()
    left = run_dir / f".bundle.staging-{dead}-k1ll3d00"
    left.mkdir()
    (left / "model.onnx").write_bytes(b"half an export")
    result = invoke(export_app, run_dir)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run_dir.iterdir()) == ["bundle", "model.pt", "run.json"]
    left = run_dir / f".bundle.staging-{dead}-k1ll3d01"  # and an engine build on the bundle, as on a device
    left.mkdir()
    result = invoke(export_app, run_dir / "bundle", "--fp16")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run_dir.iterdir()) == ["bundle", "model.pt", "run.json"]
    assert load_bundle(run_dir / "bundle").record["fp16_model_file"] == "model_fp16.onnx"
