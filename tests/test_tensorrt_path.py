"""The TensorRT path as far as it can be proven without TensorRT: the compatibility check (passes on every
model kind's bundle, fails clearly on a graph TensorRT would refuse), the fp16 ONNX model, backend choice;
and the real engine where TensorRT and a GPU exist."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from edgeinspect.export.cli import app as export_app
from edgeinspect.export.precision import convert_fp16
from edgeinspect.export.tensorrt_check import SUPPORT, check_tensorrt
from edgeinspect.export.tensorrt_engine import tensorrt_unavailable
from edgeinspect.runtime.inference.backends import BackendUnavailable, OrtCpuBackend, check_engine_matches_device, open_backend
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.inference.images import load_resized

runner = CliRunner()


def test_every_kind_passes_the_check_and_says_why_no_engine(kind_bundle):
    record = load_bundle(kind_bundle).record
    assert record["tensorrt_check"]["ok"], record["tensorrt_check"]["problems"]
    result = runner.invoke(export_app, [str(kind_bundle), "--check"])
    assert result.exit_code == 0 and "TensorRT check" in result.output
    if tensorrt_unavailable() is not None:
        assert record["engine"] is None


def test_fp16_model_keeps_fp32_io_and_the_fragile_nodes(kind_bundle, mvtec_like):
    bundle = load_bundle(kind_bundle)
    half = onnx.load(str(kind_bundle / bundle.record["fp16_model_file"]))
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in half.graph.output)
    assert any(init.data_type == TensorProto.FLOAT16 for init in half.graph.initializer)
    onnx.checker.check_model(half, full_check=True)  # every node's inputs of one type (ONNX Runtime refuses otherwise)
    kept = set(bundle.record["precision"]["fp32_nodes"])
    fp16_names = {n.name for n in half.graph.node}
    assert kept <= fp16_names  # every fragile node survives, unconverted
    paths = sorted((mvtec_like / "test" / "good").iterdir()) + sorted((mvtec_like / "test" / "pasted").iterdir())
    images, _ = load_resized(paths, (64, 64))
    import onnxruntime as ort

    session = ort.InferenceSession(str(kind_bundle / bundle.record["fp16_model_file"]),
                                   providers=["CPUExecutionProvider"])
    half_maps, half_scores = session.run(None, {"images": images})
    maps, scores = OrtCpuBackend(bundle)(images)
    assert np.abs(half_scores - scores).max() <= 0.02 * (maps.max() - maps.min())
    defective = [path.parent.name == "pasted" for path in paths]  # the fp16 table's bound: |ΔAUROC| ≤ 0.005
    assert abs(roc_auc_score(defective, half_scores) - roc_auc_score(defective, scores)) <= 0.005


def graph_with(node, inputs, outputs, initializers=()):
    model = helper.make_model(helper.make_graph([node], "probe", inputs, outputs, list(initializers)),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_fp16_conversion_gives_a_shared_initializer_to_both_precisions(tmp_path):
    """One weight feeding an fp16 node and a node kept in fp32 (the case that used to give an invalid model)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    weight = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="/backbone/matmul"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="/head/matmul")]
    model = helper.make_model(helper.make_graph(nodes, "shared", [x], [y], [onnx.numpy_helper.from_array(weight, "w")]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "fp32.onnx"))
    convert_fp16(tmp_path / "fp32.onnx", tmp_path / "fp16.onnx", keep_fp32=["/head/matmul"])
    half = onnx.load(str(tmp_path / "fp16.onnx"))
    onnx.checker.check_model(half, full_check=True)
    types = {init.name: init.data_type for init in half.graph.initializer}
    assert types == {"w": TensorProto.FLOAT, "w_fp16": TensorProto.FLOAT16}
    import onnxruntime as ort

    inputs = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
    (result,) = ort.InferenceSession(str(tmp_path / "fp16.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": inputs})
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, inputs @ weight @ weight, rtol=1e-2, atol=1e-2)


def test_check_names_an_operator_tensorrt_refuses(tmp_path):
    assert "Det" in SUPPORT["refused_operators"] and "Det" not in SUPPORT["operators"]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])
    path = tmp_path / "det.onnx"
    onnx.save(graph_with(helper.make_node("Det", ["x"], ["y"], name="pick"), [x], [y]), str(path))
    report = check_tensorrt(path)
    assert not report.ok and "Det node 'pick': operator not supported" in report.problems[0]


def test_operators_tensorrt_10_added_are_accepted(tmp_path):
    """Hardmax, refused by the TensorRT 8.4 matrix the check used to read, is supported in 10.x."""
    assert {"Hardmax", "LayerNormalization", "Gelu", "HardSwish"} <= set(SUPPORT["operators"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8])
    path = tmp_path / "hardmax.onnx"
    onnx.save(graph_with(helper.make_node("Hardmax", ["x"], ["y"], name="pick"), [x], [y]), str(path))
    assert check_tensorrt(path).ok


def topk_graph(path, k: int) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4096])
    values = helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", k])
    indices = helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", k])
    k_tensor = helper.make_tensor("k", TensorProto.INT64, [1], [k])
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="top")
    onnx.save(graph_with(node, [x], [values, indices], [k_tensor]), str(path))


def test_topk_k_must_be_below_3840(tmp_path):
    topk_graph(tmp_path / "ok.onnx", 3839)
    topk_graph(tmp_path / "over.onnx", 3840)
    assert check_tensorrt(tmp_path / "ok.onnx").ok
    report = check_tensorrt(tmp_path / "over.onnx")
    assert not report.ok and "k = 3840 exceeds TensorRT's TopK limit" in report.problems[0]


def test_uint8_is_refused_inside_the_network(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    nodes = [helper.make_node("Cast", ["x"], ["as_bytes"], name="to_uint8", to=TensorProto.UINT8),
             helper.make_node("Cast", ["as_bytes"], ["y"], name="to_float", to=TensorProto.FLOAT)]
    model = helper.make_model(helper.make_graph(nodes, "probe", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "bytes.onnx"))
    report = check_tensorrt(tmp_path / "bytes.onnx")
    assert not report.ok and "'as_bytes': UINT8 is allowed only as a network input or output" in report.problems[0]


def test_check_finds_a_tensor_too_large_at_the_largest_batch(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4096, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4096, 4096])
    weights = helper.make_tensor("w", TensorProto.FLOAT, [8, 4096], np.zeros(8 * 4096, np.float32))
    path = tmp_path / "big.onnx"
    onnx.save(graph_with(helper.make_node("MatMul", ["x", "w"], ["y"], name="scores"), [x], [y], [weights]), str(path))
    assert check_tensorrt(path, max_batch=8).ok
    report = check_tensorrt(path, max_batch=200)  # 200 × 4096² > 2³¹ − 1
    assert not report.ok and "exceed TensorRT's limit" in report.problems[0] and "'y'" in report.problems[0]


def test_check_refuses_a_dynamic_image_size(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "height", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "height", 8])
    path = tmp_path / "dynamic.onnx"
    onnx.save(graph_with(helper.make_node("Relu", ["x"], ["y"]), [x], [y]), str(path))
    assert "dimension 1 is dynamic" in check_tensorrt(path).problems[0]


def test_auto_backend_falls_back_to_the_cpu_and_says_why(kind_bundle):
    backend = open_backend(load_bundle(kind_bundle))
    if tensorrt_unavailable() is None:
        pytest.skip("a GPU with TensorRT is present: the engine tests below cover it")
    assert backend.name == "openvino"  # the fastest CPU backend, a dependency on every platform it supports
    assert "no TensorRT engine" in backend.passed_over["tensorrt"]
    assert set(backend.passed_over) == {"tensorrt", "ort-tensorrt", "ort-cuda"}
    with pytest.raises(BackendUnavailable, match="inspect-export .* --engine"):
        open_backend(load_bundle(kind_bundle), "tensorrt")


class _Device:
    """The facts the engine check reads from the CUDA adapter: an AGX Orin 64 GB."""

    def name(self):
        return "Orin"

    def compute_capability(self):
        return (8, 7)

    def multiprocessors(self):
        return 16


def test_an_engine_built_elsewhere_is_refused_with_the_rebuild_command(kind_bundle):
    """Another compute capability, another TensorRT, or the same compute capability on another model (an Orin
    Nano's 8 multiprocessors against this AGX Orin's 16) is refused; the same model passes, as does an engine
    recorded before multiprocessors were (by the rest)."""
    bundle = load_bundle(kind_bundle)
    here = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "multiprocessors": 16}
    for other in ({"gpu": "NVIDIA H100", "compute_capability": "9.0"}, {"tensorrt": "10.13.3"},
                  {"multiprocessors": 8}, {"gpu": "NVIDIA L4"}):
        with pytest.raises(BackendUnavailable, match=f"rebuild it here with inspect-export {bundle.path} --engine"):
            check_engine_matches_device(bundle, {**here, **other}, "10.3.0", _Device())
    check_engine_matches_device(bundle, here, "10.3.0", _Device())
    check_engine_matches_device(bundle, {k: v for k, v in here.items() if k != "multiprocessors"}, "10.3.0",
                                _Device())


@pytest.mark.skipif(tensorrt_unavailable() is not None, reason=f"no TensorRT engine can be built here: "
                    f"{tensorrt_unavailable()}")
def test_engine_matches_onnx_runtime(kind_bundle, mvtec_like):
    result = runner.invoke(export_app, [str(kind_bundle), "--engine"])
    assert result.exit_code == 0, result.output
    bundle = load_bundle(kind_bundle)
    images, _ = load_resized(sorted((mvtec_like / "test" / "pasted").iterdir())[:4], (64, 64))
    engine_maps, engine_scores = open_backend(bundle, "tensorrt")(images)
    maps, scores = OrtCpuBackend(bundle)(images)
    assert np.abs(engine_scores - scores).max() <= 1e-3 * (maps.max() - maps.min())
    assert json.loads((kind_bundle / "bundle.json").read_text())["engine"]["file"] == "model.engine"


def _cuda_provider_missing() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider here (the gpu extra installs onnxruntime-gpu)"
    return None


@pytest.mark.skipif(_cuda_provider_missing() is not None, reason=str(_cuda_provider_missing()))
def test_ort_cuda_matches_the_cpu(kind_bundle, mvtec_like):
    bundle = load_bundle(kind_bundle)
    images, _ = load_resized(sorted((mvtec_like / "test" / "pasted").iterdir())[:4], (64, 64))
    cuda_maps, cuda_scores = open_backend(bundle, "ort-cuda")(images)
    maps, scores = OrtCpuBackend(bundle)(images)
    assert np.abs(cuda_scores - scores).max() <= 0.02 * (maps.max() - maps.min())  # it runs the fp16 model
