"""Every registered model kind through the same commands: train, export with parity, calibrate, evaluate."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgeinspect.calibration.cli import eval_app
from edgeinspect.runtime.inference.backends import OpenVinoBackend, OrtCpuBackend
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.inference.images import load_resized
from edgeinspect.train.registry import MODEL_KINDS
from edgeinspect.train.run import load_run

from conftest import QUICK_TRAINING

runner = CliRunner()


def invoke(app, *args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_quick_settings_cover_every_kind():
    assert set(QUICK_TRAINING) == set(MODEL_KINDS)


def test_bundle_keeps_the_contract_and_parity(kind_bundle, mvtec_like):
    record = load_bundle(kind_bundle).record
    assert record["model"] == kind_bundle.parent.name.rstrip("0123456789")
    assert record["export"]["parity"]["relative_diff"] <= 1e-4
    images, _ = load_resized(sorted((mvtec_like / "test" / "pasted").iterdir())[:3], (64, 64))
    maps, scores = OrtCpuBackend(load_bundle(kind_bundle))(images)
    assert maps.shape == (3, 64, 64) and scores.shape == (3,)


@pytest.mark.parametrize("backend_class", [OrtCpuBackend, OpenVinoBackend])
def test_restored_run_reproduces_the_bundle(kind_bundle, mvtec_like, backend_class):
    model, run = load_run(kind_bundle.parent)
    assert run["state"] == "finished"
    images, _ = load_resized(sorted((mvtec_like / "test" / "good").iterdir())[:2], (64, 64))
    with torch.inference_mode():
        torch_maps, torch_scores = model(torch.from_numpy(images))
    maps, scores = backend_class(load_bundle(kind_bundle))(images)
    scale = float(torch_maps.max() - torch_maps.min())
    assert abs(maps - torch_maps[:, 0].numpy()).max() <= 1e-4 * scale
    assert abs(scores - torch_scores.numpy()).max() <= 1e-4 * scale


def test_openvino_follows_the_batch_size(kind_bundle, mvtec_like):
    images, _ = load_resized(sorted((mvtec_like / "test" / "pasted").iterdir())[:3], (64, 64))
    bundle = load_bundle(kind_bundle)
    openvino, reference = OpenVinoBackend(bundle), OrtCpuBackend(bundle)
    for batch in (images[:1], images, images[1:2]):
        maps, scores = openvino(batch)
        expected_maps, expected_scores = reference(batch)
        assert maps.shape == (len(batch), 64, 64) and scores.shape == (len(batch),)
        scale = float(expected_maps.max() - expected_maps.min())
        assert np.abs(maps - expected_maps).max() <= 1e-4 * scale
        assert np.abs(scores - expected_scores).max() <= 1e-4 * scale
    assert sorted(shape[0] for shape in openvino.requests) == [1, 3]


def test_calibration_and_evaluation_work_unchanged(kind_bundle, mvtec_like, tmp_path):
    assert load_bundle(kind_bundle).thresholds["image"]["n"] == 4
    invoke(eval_app, kind_bundle, "--data", mvtec_like, "--out", tmp_path / "eval.json")
    overall = json.loads((tmp_path / "eval.json").read_text())["metrics"]["overall"]
    assert 0 <= overall["image_auroc"] <= 1 and 0 <= overall["pixel_auroc"] <= 1


def test_a_graph_openvino_cannot_compile_is_passed_over(patchcore_bundle, tmp_path):
    import shutil

    from edgeinspect.runtime.inference.backends import BackendUnavailable, open_backend
    from edgeinspect.runtime.console import InspectError

    broken = tmp_path / "bundle"
    shutil.copytree(patchcore_bundle, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    bundle = load_bundle(broken, verify=False)
    with pytest.raises(BackendUnavailable, match="model.onnx: OpenVINO cannot compile it"):
        OpenVinoBackend(bundle)
    with pytest.raises(InspectError, match="ONNX Runtime cannot load it"):  # auto went on to ONNX Runtime
        open_backend(bundle)
