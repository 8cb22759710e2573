"""inspect-teach: a PatchCore bundle learns good parts it flags, on the box without torch; versions, rollback and
the regression guard on confirmed defects."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from edgeinspect.calibration.cli import teach_app
from edgeinspect.calibration.teach import BANK, MAX_NEW_SHARE, versions_dir
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.inference.inspector import Inspector

from conftest import good_image, write
from test_layering import BLOCK_TORCH

runner = CliRunner()


def invoke(app, *args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def lamp_frames(tmp_path) -> tuple[Path, Path]:
    """The same good parts under a new lamp (35% brighter): 12 frames to teach, 4 others to check."""
    rng = np.random.default_rng(7)
    frames = [np.clip(good_image(rng) * 1.35, 0, 255).astype(np.uint8) for _ in range(16)]
    for index, frame in enumerate(frames):
        write(tmp_path / ("teach" if index < 12 else "check") / f"{index:03d}.png", frame)
    return tmp_path / "teach", tmp_path / "check"


@pytest.fixture
def bundle_copy(patchcore_bundle, tmp_path) -> Path:
    shutil.copytree(patchcore_bundle, tmp_path / "line" / "bundle")
    return tmp_path / "line" / "bundle"


def verdicts(bundle_dir: Path, folder: Path) -> list[bool]:
    """NG (score above the image threshold) for each image of `folder`, by the bundle as it is now."""
    bundle = load_bundle(bundle_dir)
    threshold = bundle.thresholds["image"]["threshold"]
    return [score > threshold for _, _, _, score in Inspector(bundle).infer_files(sorted(folder.iterdir()))]


def teach_without_torch(*args) -> None:
    """inspect-teach in a Python where importing torch fails, as on an edge box."""
    code = BLOCK_TORCH + (f"sys.argv = ['inspect-teach', *{[str(a) for a in args]!r}]\n"
                          "from edgeinspect.calibration.cli import teach_main\n"
                          "try:\n    teach_main()\nexcept SystemExit as end:\n    assert not end.code, end.code\n"
                          "assert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_new_lamp_taught_on_twelve_frames_passes_the_others_and_still_catches_the_defects(
        bundle_copy, lamp_frames, mvtec_like):
    teach_dir, check_dir = lamp_frames
    defects = mvtec_like / "test" / "pasted"
    parent = load_bundle(bundle_copy).record
    assert all(verdicts(bundle_copy, check_dir)), "the premise: the brighter good parts are flagged"
    assert all(verdicts(bundle_copy, defects))
    result = invoke(teach_app, bundle_copy, "--good", teach_dir, "--defects", defects, "--by", "night shift")
    assert result.exit_code == 0, result.output
    assert not any(verdicts(bundle_copy, check_dir))
    assert all(verdicts(bundle_copy, defects))
    record = load_bundle(bundle_copy).record
    version = record["version"]
    assert version["number"] == 2 and version["by"] == "night shift"
    assert version["parent"] == parent["files"]["model.onnx"]["sha256"] != record["files"]["model.onnx"]["sha256"]
    assert version["taught"]["images"] == 9 and version["taught"]["calibration_images"] == 3
    bank = numpy_helper.to_array(next(i for i in onnx.load(str(bundle_copy / "model.onnx")).graph.initializer
                                      if i.name == BANK))
    added = version["taught"]["entries_added"]
    assert 0 < added <= np.ceil(MAX_NEW_SHARE * (len(bank) - added)) and len(bank) == version["taught"]["bank_entries"]
    assert record["thresholds"]["source"].startswith("validation")
    kept = versions_dir(bundle_copy) / f"v1-{parent['files']['model.onnx']['sha256'][:12]}"
    assert json.loads((kept / "bundle.json").read_text()) == parent


def test_rollback_restores_the_parent_exactly(bundle_copy, lamp_frames, mvtec_like):
    teach_dir, check_dir = lamp_frames
    parent_record = (bundle_copy / "bundle.json").read_text()
    parent_model = (bundle_copy / "model.onnx").read_bytes()
    assert invoke(teach_app, bundle_copy, "--good", teach_dir).exit_code == 0
    result = invoke(teach_app, bundle_copy, "--rollback")
    assert result.exit_code == 0, result.output
    assert (bundle_copy / "bundle.json").read_text() == parent_record
    assert (bundle_copy / "model.onnx").read_bytes() == parent_model
    assert all(verdicts(bundle_copy, check_dir))
    assert [p.name.split("-")[0] + "-" + p.name.split("-")[-1] for p in versions_dir(bundle_copy).iterdir()] == \
        ["v2-back"]  # the taught version kept as rolled back, its parent back in place
    result = invoke(teach_app, bundle_copy, "--rollback")
    assert result.exit_code == 2 and "it was not taught: nothing to roll back" in result.output


def test_teaching_the_defects_themselves_is_refused_by_the_guard(bundle_copy, mvtec_like):
    """Frames of defects taught as good would make the bank cover them: the confirmed defects would pass, so
    nothing is written."""
    defects = mvtec_like / "test" / "pasted"
    before = (bundle_copy / "bundle.json").read_text()
    result = invoke(teach_app, bundle_copy, "--good", defects, "--defects", defects)
    assert result.exit_code == 2, result.output
    assert "error: teaching refused: " in result.output
    assert "confirmed defects the current version catches would pass" in result.output
    assert (bundle_copy / "bundle.json").read_text() == before
    assert not versions_dir(bundle_copy).exists()


def test_teaching_runs_without_torch(bundle_copy, lamp_frames):
    teach_dir, _ = lamp_frames
    teach_without_torch(bundle_copy, "--good", teach_dir)
    assert load_bundle(bundle_copy).record["version"]["number"] == 2


def test_teaching_says_what_it_cannot_do(kind_bundle, tmp_path, mvtec_like):
    kind = load_bundle(kind_bundle).record["model"]
    if kind == "patchcore":
        result = invoke(teach_app, kind_bundle, "--good", mvtec_like / "test" / "good", "--rollback")
        assert result.exit_code == 2 and "--rollback takes no --good or --defects" in result.output
        result = invoke(teach_app, kind_bundle)
        assert result.exit_code == 2 and "--good: give the folder of good frames" in result.output
        return
    result = invoke(teach_app, kind_bundle, "--good", mvtec_like / "test" / "good")
    assert result.exit_code == 2
    assert f"a {kind} bundle has no memory bank to add to; teaching it is a short fine-tune on the workstation" \
        in result.output


@pytest.mark.slow
def test_teaching_ten_good_bottles_without_torch_changes_no_defective_verdict(bottle, tmp_path):
    """Real bottle PNGs (a 60-image PatchCore at 192×192, calibrated): ten good test bottles taught on a box
    without torch, with every defective test bottle as confirmed defects, so that the guard would refuse if one
    that was NG passed; the NG bottles stay NG (checked here again, after the teaching)."""
    from edgeinspect.calibration.thresholds import calibrate
    from edgeinspect.export.onnx_export import export_bundle
    from edgeinspect.runtime.datasets import Dataset, open_dataset
    from edgeinspect.train.patchcore import PatchCoreConfig
    from edgeinspect.train.run import train_model

    full = open_dataset(str(bottle))
    subset = Dataset(full.name, sorted(np.random.default_rng(0).choice(full.good, 60, replace=False)), full.test)
    train_model("patchcore", PatchCoreConfig(image_size=(192, 192)), subset, tmp_path / "run")
    bundle = export_bundle(tmp_path / "run")
    calibrate(bundle, [Path(p) for p in bundle.record["training"]["validation"]])
    good, defects = tmp_path / "good", tmp_path / "defects"
    good.mkdir(), defects.mkdir()
    for path in sorted((bottle / "test" / "good").iterdir())[:10]:
        (good / path.name).symlink_to(path)
    for sample in (s for s in full.test if s.label):
        (defects / f"{sample.path.parent.name}-{sample.path.name}").symlink_to(sample.path)
    caught_before = verdicts(bundle.path, defects)
    teach_without_torch(bundle.path, "--good", good, "--defects", defects)
    assert load_bundle(bundle.path).record["version"]["number"] == 2
    caught_after = verdicts(bundle.path, defects)
    assert all(after for before, after in zip(caught_before, caught_after) if before)


def test_the_bank_grows_to_twice_its_trained_size_at_most(bundle_copy, lamp_frames, monkeypatch):
    """Each entry costs search time on every frame: past MAX_GROWTH × the trained bank, teaching says to retrain."""
    from edgeinspect.calibration import teach

    teach_dir, _ = lamp_frames
    trained = load_bundle(bundle_copy).record
    assert invoke(teach_app, bundle_copy, "--good", teach_dir).exit_code == 0
    entries = load_bundle(bundle_copy).record["version"]["taught"]
    assert entries["trained_entries"] < entries["bank_entries"]
    monkeypatch.setattr(teach, "MAX_GROWTH", entries["bank_entries"] / entries["trained_entries"])
    result = invoke(teach_app, bundle_copy, "--good", teach_dir)
    assert result.exit_code == 2 and "the most teaching adds" in result.output and "retrain on the workstation" \
        in result.output
    assert load_bundle(bundle_copy).record["version"]["number"] == 2 and trained != load_bundle(bundle_copy).record


@pytest.mark.parametrize("kind_bundle", ["patchcore"], indirect=True)
def test_the_fp16_model_is_taught_too_and_the_engine_built_again(kind_bundle, lamp_frames, tmp_path, monkeypatch):
    """A PatchCore bundle with its fp16 model and an fp16 engine: both ONNX models get the new bank (the fp16
    model keeps the bank in fp32), and where TensorRT is present the engine is built again from the fp16 model
    (the builder stood in for: no GPU here); the INT8 model is dropped with the command that remakes it."""
    from edgeinspect.export import device_export

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(kind_bundle, bundle_dir)
    record = json.loads((bundle_dir / "bundle.json").read_text())
    (bundle_dir / "model.engine").write_bytes(b"plan of the old bank")
    record["engine"] = {"file": "model.engine", "batch_sizes": [1, 1, 8], "precision": "fp16",
                        "onnx": {"file": record["fp16_model_file"]}}
    (bundle_dir / "bundle.json").write_text(json.dumps(record))
    built = []
    monkeypatch.setattr(device_export, "tensorrt_unavailable", lambda: None)
    monkeypatch.setattr(device_export, "build_engine", lambda source, engine, *args: built.append(source) or (
        engine.write_bytes(b"plan of the new bank"), {"file": engine.name, "batch_sizes": [1, 1, 8], "gpu": "stand-in",
                                                      "tensorrt": "stand-in", "onnx": {"file": source.name}})[1])
    teach_dir, _ = lamp_frames
    result = invoke(teach_app, bundle_dir, "--good", teach_dir)
    assert result.exit_code == 0, result.output
    taught = load_bundle(bundle_dir).record
    assert [source.name for source in built] == [taught["fp16_model_file"]]
    assert (bundle_dir / "model.engine").read_bytes() == b"plan of the new bank"
    for name in ("model.onnx", taught["fp16_model_file"]):
        bank = next(i for i in onnx.load(str(bundle_dir / name)).graph.initializer if i.name == BANK)
        assert bank.data_type == onnx.TensorProto.FLOAT and bank.dims[0] == taught["version"]["taught"]["bank_entries"]


def test_rollback_finds_the_parent_by_its_digest_not_by_number(bundle_copy, lamp_frames, tmp_path):
    """Versions of an older export kept beside a freshly copied bundle are not its parents: teaching the fresh one
    and rolling back restores the fresh one, and a second rollback has nothing to restore."""
    teach_dir, _ = lamp_frames
    fresh = (bundle_copy / "model.onnx").read_bytes()
    stale = versions_dir(bundle_copy) / "v4-0123456789ab"
    shutil.copytree(bundle_copy, stale)  # another model's history, of a higher number
    assert invoke(teach_app, bundle_copy, "--good", teach_dir).exit_code == 0
    assert invoke(teach_app, bundle_copy, "--rollback").exit_code == 0
    assert (bundle_copy / "model.onnx").read_bytes() == fresh and stale.is_dir()


def test_one_teaching_at_a_time(bundle_copy, lamp_frames):
    from edgeinspect.calibration.teach import teaching_lock

    teach_dir, _ = lamp_frames
    with teaching_lock(bundle_copy):
        result = invoke(teach_app, bundle_copy, "--good", teach_dir)
    assert result.exit_code == 2 and "another teaching or rollback of it is running" in result.output
