"""The whole product through its commands, on a small data set of real photos with pasted defects."""

import json

import onnx
import pytest
from typer.testing import CliRunner

from edgeinspect.calibration.cli import eval_app
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.commands.run import app as run_app

runner = CliRunner()


def invoke(app, *args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bundle(patchcore_bundle):
    return patchcore_bundle


def test_train_keeps_a_seeded_80_20_split(bundle):
    record = json.loads((bundle.parent / "run.json").read_text())
    assert (record["data"]["n_fit"], record["data"]["n_validation"]) == (16, 4)
    assert not set(record["data"]["fit"]) & set(record["data"]["validation"])


def test_graph_takes_uint8_and_scores_with_matmul_and_min_over_a_constant_bank(bundle):
    graph = onnx.load(str(bundle / "model.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert "ReduceMin" in ops and "CDist" not in ops
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in graph.output] == ["anomaly_map", "score"]
    record = load_bundle(bundle).record
    bank = json.loads((bundle.parent / "run.json").read_text())["memory_bank"]
    constants = {init.name: list(init.dims) for init in graph.initializer}
    constants.update({node.output[0]: list(node.attribute[0].t.dims) for node in graph.node if node.op_type == "Constant"})
    bank_products = [node for node in graph.node if node.op_type == "Gemm"
                     and constants.get(node.input[1]) == [bank["dim"], bank["entries"]]]
    assert len(bank_products) == 1  # 64 patches, one block; the score is the map's maximum, no second search
    assert any(node.op_type == "ReduceMax" and node.input[0] == "anomaly_map" for node in graph.node)
    # the bank holds the patches' first 64 principal components: one MatMul by the (152, 64) directions first
    assert bank["dim"] == 64 and any(node.op_type == "MatMul" and constants.get(node.input[1]) == [152, 64]
                                     for node in graph.node)
    assert record["export"]["parity"]["relative_diff"] <= 1e-4


def test_calibration_stores_mean_plus_3_sigma_of_validation_scores(bundle):
    image = load_bundle(bundle).thresholds["image"]
    assert image["n"] == 4 and image["k"] == 3
    assert image["threshold"] == pytest.approx(image["mean"] + 3 * image["std"])


def test_eval_finds_the_pasted_defects(bundle, mvtec_like, tmp_path):
    result = invoke(eval_app, bundle, "--data", mvtec_like, "--out", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert set(metrics) == {"overall", "pasted"}
    assert metrics["overall"]["image_auroc"] >= 0.9 and metrics["overall"]["pixel_auroc"] >= 0.9
    assert 0 < metrics["overall"]["aupro"] <= 1


def test_run_logs_every_frame_and_saves_ng_overlays(bundle, mvtec_like, tmp_path):
    result = invoke(run_app, bundle, "--source", mvtec_like / "test" / "pasted", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "inspections.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and {"score", "verdict", "regions", "threshold"} <= set(lines[0])
    ng = [line for line in lines if line["verdict"] == "NG"]
    assert len(ng) >= 4 and all(line["regions"] and (tmp_path / line["overlay"]).is_file() for line in ng)


def test_run_reads_a_video_file(bundle, mvtec_like, tmp_path):
    import cv2

    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 96))
    for path in sorted((mvtec_like / "test" / "good").iterdir()):
        writer.write(cv2.imread(str(path)))
    writer.release()
    result = invoke(run_app, bundle, "--source", video, "--out", tmp_path / "out", "--save", "all")
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "out" / "inspections.jsonl").read_text().splitlines()) == 6
