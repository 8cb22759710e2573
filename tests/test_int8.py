"""The INT8 model (inspect-export --int8): which nodes NNCF quantized and which stay float, its parity with fp32
and across CPU backends on real photos, the accuracy guard's fallback and refusal, the TensorRT INT8 path, and
one precision chosen the same way by every command (a mismatch with the thresholds refused)."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from edgeinspect.calibration.cli import calibrate_app, eval_app
from edgeinspect.export import device_export, int8
from edgeinspect.export.cli import app as export_app
from edgeinspect.export.tensorrt_check import check_tensorrt
from edgeinspect.runtime.console import InspectError
from edgeinspect.runtime.inference.backends import (BackendUnavailable, OrtCudaBackend, OrtTensorRTBackend,
                                                    TensorRTBackend, open_backend)
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.inference.images import load_resized
from edgeinspect.runtime.inference.inspector import Inspector

from conftest import QUICK_TRAINING, calibrated_bundle

ROOT = Path(__file__).resolve().parents[1]
API = json.loads((ROOT / "export" / "tensorrt_api.json").read_text())
runner = CliRunner()


def invoke(app, *args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def int8_bundle(patchcore_bundle, tmp_path_factory) -> Path:
    """A copy of the calibrated (fp32) PatchCore run with an INT8 model added on the bundle, as on a device."""
    run_dir = tmp_path_factory.mktemp("int8") / "run"
    shutil.copytree(patchcore_bundle.parent, run_dir)
    result = invoke(export_app, run_dir / "bundle", "--int8")
    assert result.exit_code == 0, result.output
    return run_dir / "bundle"


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in model.graph.node for output in node.output}


def test_the_backbone_convolutions_are_int8_and_everything_after_them_float(int8_bundle):
    """Every convolution reads a dequantized activation and dequantized per-channel weights; the bank's MatMul,
    the Min over it, the normalisation, the upsampling and the smoothing read no dequantized tensor."""
    record = load_bundle(int8_bundle).record
    model = onnx.load(str(int8_bundle / record["int8_model_file"]))
    made_by, initializers = producers(model), {init.name: init for init in model.graph.initializer}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    quantized = [c for c in convs if all(made_by.get(i) is not None and made_by[i].op_type == "DequantizeLinear"
                                         for i in c.input[:2])]
    assert len(quantized) == record["int8"]["int8_convs"] == len(convs) - len(record["int8"]["float_convs"]) > 20
    for conv in quantized:  # INT8 weights stored, one scale per output channel
        weights, scale, _ = (initializers[name] for name in made_by[conv.input[1]].input)
        assert weights.data_type == onnx.TensorProto.INT8 and list(scale.dims) == [weights.dims[0]]
    after = [node for node in model.graph.node if node.op_type in int8.FLOAT_TYPES]
    assert {"MatMul", "ReduceMin", "Resize"} <= {node.op_type for node in after}
    for node in after:
        assert not any(made_by.get(i) is not None and made_by[i].op_type == "DequantizeLinear" for i in node.input), \
            node.name
    for node in model.graph.node:  # TensorRT's form: symmetric and signed
        if node.op_type == "QuantizeLinear":
            zero_point = initializers[node.input[2]]
            assert zero_point.data_type == onnx.TensorProto.INT8
            assert not numpy_helper.to_array(zero_point).any()
    assert {opset.domain for opset in model.opset_import} <= {"", "ai.onnx"}


def test_nncfs_unsigned_activations_would_fail_tensorrt_and_the_signed_form_passes(int8_bundle, tmp_path):
    """NNCF quantizes the activations after ReLU6 as UINT8, which TensorRT takes only at a network's inputs and
    outputs; the same quantizers made signed (the bundle's form) pass the check."""
    bundle = load_bundle(int8_bundle)
    assert bundle.record["int8"]["tensorrt_check"]["ok"]
    images, _ = load_resized(sorted((Path(bundle.record["training"]["validation"][0]).parent).iterdir())[:8],
                             bundle.input_size)
    unsigned = int8.quantize(onnx.load(str(bundle.model_file)), images, [])
    onnx.save(unsigned, str(tmp_path / "unsigned.onnx"))
    problems = check_tensorrt(tmp_path / "unsigned.onnx", 2).problems
    assert any("UINT8 is allowed only as a network input or output" in p for p in problems)
    assert all("UINT8" in p for p in problems)
    onnx.save(int8.for_every_backend(unsigned), str(tmp_path / "signed.onnx"))
    assert check_tensorrt(tmp_path / "signed.onnx", 2).ok


def test_int8_maps_follow_fp32_and_both_cpu_backends_agree_on_real_photos(int8_bundle, mvtec_like):
    """Measured at writing: map correlation 0.999 with fp32, scores within 3.5% of fp32's, OpenVINO and ONNX Runtime
    within 2.3% of each other on the INT8 model; bounds: the guard's 0.95, 10% and 5%; the pasted defects still
    score above every good image."""
    bundle = load_bundle(int8_bundle)
    paths = sorted((mvtec_like / "test" / "pasted").iterdir()) + sorted((mvtec_like / "test" / "good").iterdir())
    images, _ = load_resized(paths, bundle.input_size)
    fp32_maps, fp32_scores = open_backend(bundle, "openvino")(images)
    runs = {name: open_backend(bundle, name, precision="int8")(images) for name in ("openvino", "ort-cpu")}
    for maps, scores in runs.values():
        assert np.corrcoef(maps.ravel(), fp32_maps.ravel())[0, 1] >= int8.MIN_MAP_CORRELATION
        assert np.max(np.abs(scores - fp32_scores) / fp32_scores) < 0.10
        assert scores[:6].min() > scores[6:].max()
    (ov_maps, ov_scores), (ort_maps, ort_scores) = runs.values()
    assert np.max(np.abs(ov_scores - ort_scores) / ov_scores) < 0.05
    assert np.corrcoef(ov_maps.ravel(), ort_maps.ravel())[0, 1] > 0.99


def test_the_guard_holds_only_within_every_bound_it_measured():
    assert int8.Guard(0.99, 0.1).holds and int8.Guard(0.99, None).holds  # None: too few good images to measure
    assert not int8.Guard(0.94, 0.1).holds  # maps apart
    assert not int8.Guard(0.995, 0.3).holds  # DFR on bottle: maps alike, image scores scattered (AUROC −0.063)
    assert int8.Guard(0.99, 0.1, (0.90, 0.895)).holds and not int8.Guard(0.99, 0.1, (0.90, 0.885)).holds
    assert "score noise not measured" in str(int8.Guard(0.99, None))


def test_a_model_that_misses_the_bound_keeps_stages_in_float_then_is_refused(patchcore_bundle, tmp_path,
                                                                              monkeypatch):
    """A bound no INT8 model can hold: one backbone stage more in float at each try, every try's numbers said,
    down to the last stage alone in INT8; in the end no INT8 model and the bundle as it was."""
    run_dir = tmp_path / "run"
    shutil.copytree(patchcore_bundle.parent, run_dir)
    before = (run_dir / "bundle" / "bundle.json").read_text()
    monkeypatch.setattr(int8, "MIN_MAP_CORRELATION", 1.01)
    result = invoke(export_app, run_dir / "bundle", "--int8")
    assert result.exit_code == 2, result.output
    stages = len(int8.backbone_stages(onnx.load(str(run_dir / "bundle" / "model.onnx"))))
    assert result.output.count("keeping one more stage in float") == stages - 1
    assert "no INT8 model holds the accuracy bound, even with only the last backbone stage in INT8" in result.output
    assert (run_dir / "bundle" / "bundle.json").read_text() == before
    assert not (run_dir / "bundle" / int8.INT8_MODEL_FILE).exists()


def test_a_fresh_export_whose_int8_model_is_refused_still_writes_the_fp32_bundle(patchcore_bundle, tmp_path,
                                                                                  monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(patchcore_bundle.parent, run_dir)
    shutil.rmtree(run_dir / "bundle")
    monkeypatch.setattr(int8, "MIN_MAP_CORRELATION", 1.01)
    result = invoke(export_app, run_dir, "--int8")
    assert result.exit_code == 0, result.output
    assert "no INT8 model holds the accuracy bound" in result.output and "the fp32 bundle is written without it" \
        in result.output
    record = load_bundle(run_dir / "bundle").record
    assert not record.get("int8_model_file") and record["int8"]["attempts"]
    assert Inspector(load_bundle(run_dir / "bundle")).precision == "fp32"


def test_the_autoencoders_fallback_keeps_single_layers_in_float_from_both_ends():
    """The pixel autoencoder has no backbone stages: one convolution per try, the first and the last first."""
    nodes = [onnx.helper.make_node(kind, ["x"], ["y"], name=name) for kind, name in
             [("Conv", "/encoder/0/Conv"), ("Conv", "/encoder/3/Conv"), ("ConvTranspose", "/decoder/0/ConvTranspose"),
              ("ConvTranspose", "/decoder/3/ConvTranspose")]]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "autoencoder", [], []))
    assert int8.backbone_stages(model) == [["/encoder/0/Conv"], ["/decoder/3/ConvTranspose"], ["/encoder/3/Conv"],
                                           ["/decoder/0/ConvTranspose"]]


def test_precision_follows_the_thresholds_and_a_mismatch_is_refused(int8_bundle, mvtec_like, tmp_path):
    """The copy was calibrated for fp32 before the INT8 model came: auto keeps fp32 and int8 is refused until the
    bundle is calibrated for it; then auto runs int8 and fp32 is refused, in inspect-eval as in the Inspector."""
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(int8_bundle, bundle_dir)
    assert Inspector(load_bundle(bundle_dir)).precision == "fp32"
    with pytest.raises(InspectError, match=r"--precision int8: .* calibrated for fp32, and the scores of the two "
                                           r"differ; calibrate for int8 first"):
        Inspector(load_bundle(bundle_dir), precision="int8")
    result = invoke(calibrate_app, bundle_dir)  # auto calibrates the INT8 model where there is one
    assert result.exit_code == 0, result.output
    assert "calibration of the int8 model" in result.output
    assert load_bundle(bundle_dir).thresholds["precision"] == "int8"
    assert Inspector(load_bundle(bundle_dir)).precision == "int8"
    result = invoke(eval_app, bundle_dir, "--data", mvtec_like, "--precision", "fp32")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: --precision fp32:") and result.output.count("\n") == 1
    result = invoke(calibrate_app, bundle_dir, "--precision", "fp32")
    assert result.exit_code == 0, result.output
    assert Inspector(load_bundle(bundle_dir)).precision == "fp32"


def test_a_bundle_without_int8_model_refuses_int8(patchcore_bundle):
    with pytest.raises(InspectError, match=r"has no INT8 model \(inspect-export .* --int8\)"):
        Inspector(load_bundle(patchcore_bundle), precision="int8")
    with pytest.raises(InspectError, match="--precision 'int4' is not one of auto, fp32, int8"):
        Inspector(load_bundle(patchcore_bundle), precision="int4")


def test_gpu_backends_take_the_int8_model_as_claimed(int8_bundle):
    """ONNX Runtime's CUDA provider is passed over for INT8; its TensorRT provider gets the INT8 flag (its network
    is weakly typed) and an engine cache of its own; a TensorRT engine built from another model is refused."""
    bundle = load_bundle(int8_bundle)
    with pytest.raises(BackendUnavailable, match="not the INT8 one"):
        OrtCudaBackend(bundle, precision="int8")
    fp32_options = OrtTensorRTBackend.provider_options(None, bundle)
    int8_options = OrtTensorRTBackend.provider_options(None, bundle, "int8")
    assert "trt_int8_enable" not in fp32_options and int8_options["trt_int8_enable"] == "True"
    assert fp32_options["trt_engine_cache_path"] != int8_options["trt_engine_cache_path"]
    record = {**bundle.record, "engine": {"file": "model.engine", "batch_sizes": [1, 1, 8],
                                          "onnx": {"file": bundle.record["model_file"]}}}
    with pytest.raises(BackendUnavailable, match=r"built from model.onnx, not for int8 .* --engine --int8"):
        TensorRTBackend(type(bundle)(bundle.path, record), precision="int8")


def test_the_int8_engine_is_built_from_the_qdq_model_with_names_both_tensorrt_versions_have(int8_bundle, tmp_path,
                                                                                             monkeypatch):
    """Explicit quantization in a strongly typed network: the engine's source is the QDQ model, the build calls
    the same builder names as fp32 (all in the real 10.16 and 11.4 bindings), and none of the implicit-INT8 API
    that 11.x removed (BuilderFlag.INT8, calibrators, QuantizationFlag)."""
    source = (ROOT / "export" / "tensorrt_engine.py").read_text()
    used = set(re.findall(r"\btrt\.(\w+(?:\.[A-Z_0-9]+)?)", source))
    assert used <= set(API["builder"]) | set(API["runtime"])
    assert not re.search(r"INT8|Int8|[Cc]alibrat|QuantizationFlag", source)
    built = {}
    monkeypatch.setattr(device_export, "tensorrt_unavailable", lambda: None)
    monkeypatch.setattr(device_export, "build_engine", lambda source, engine, *args: built.setdefault(
        "source", source) and {"file": engine.name, "batch_sizes": [1, 1, 8], "onnx": {"file": source.name},
                               "gpu": "stand-in", "tensorrt": "stand-in"})
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(int8_bundle, bundle_dir)
    bundle = load_bundle(bundle_dir)
    device_export.add_engine(bundle, device_export.EngineOptions(build_engine=True, int8=True))
    assert built["source"] == bundle_dir / bundle.record["int8_model_file"]
    assert bundle.record["engine"]["precision"] == "int8"


@pytest.mark.parametrize("kind", list(QUICK_TRAINING))
def test_every_kind_exports_an_int8_model_that_holds_the_guard(kind, mvtec_like, tmp_path):
    bundle_dir = calibrated_bundle(tmp_path / kind, [kind, "--data", mvtec_like, "--image-size", 64,
                                                     *QUICK_TRAINING[kind]], ("--int8",))
    record = load_bundle(bundle_dir).record
    assert record["int8"]["int8_convs"] > 0 and record["int8"]["tensorrt_check"]["ok"]
    assert record["int8"]["guard"]["map_correlation"] >= int8.MIN_MAP_CORRELATION
    assert record["thresholds"]["precision"] == "int8"


def test_inspect_bench_times_both_precisions_and_runs_the_pipeline_at_the_calibrated_one(int8_bundle, tmp_path):
    from edgeinspect.runtime.commands.bench import app as bench_app

    result = invoke(bench_app, int8_bundle, "--frames", 10, "--runs", 3, "--out", tmp_path / "bench.json")
    assert result.exit_code == 0, result.output
    backends = json.loads((tmp_path / "bench.json").read_text())["backends"]
    assert backends["openvino int8"]["ms_per_frame_batch1"] > 0 and backends["ort-cpu int8"]["ms_per_frame_batch1"] > 0
    assert "not the INT8 one" in backends["ort-cuda int8"]["unavailable"]
