"""Will TensorRT take this ONNX graph? A check that needs neither a GPU nor TensorRT: operators against the
ONNX parser's support matrix (kept as data, with its source, in tensorrt_support.json), the opset, data
types, shapes static apart from the batch the optimisation profile covers, no tensor over 2³¹−1 elements at
the largest batch, TopK's k within TensorRT's limit, and UINT8 only at the network's inputs and outputs."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import onnx

SUPPORT = json.loads((Path(__file__).with_name("tensorrt_support.json")).read_text())


@dataclass
class CompatibilityReport:
    max_batch: int
    problems: list[str] = field(default_factory=list)
    largest_tensor: tuple[str, int] = ("", 0)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "max_batch": self.max_batch, "problems": self.problems,
                "largest_tensor": {"name": self.largest_tensor[0], "elements": self.largest_tensor[1]},
                "support_matrix": SUPPORT["source"]}


def check_tensorrt(model_path: Path, max_batch: int = 8) -> CompatibilityReport:
    model = onnx.load(str(model_path))
    report = CompatibilityReport(max_batch)
    _check_opset(model, report)
    _check_operators(model, report)
    _check_shapes_and_types(model, max_batch, report)
    return report


def _check_opset(model: onnx.ModelProto, report: CompatibilityReport) -> None:
    low, high = SUPPORT["opset_range"]
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not low <= opset.version <= high:
            report.problems.append(f"opset {opset.version} is outside TensorRT's range {low}-{high}")


def _check_operators(model: onnx.ModelProto, report: CompatibilityReport) -> None:
    supported = set(SUPPORT["operators"])
    initializers = {init.name: init for init in model.graph.initializer}
    constants = {node.output[0]: node for node in model.graph.node if node.op_type == "Constant"}
    for node in _all_nodes(model.graph):
        where = f"{node.op_type} node {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx") or node.op_type not in supported:
            report.problems.append(f"{where}: operator not supported by TensorRT's ONNX parser")
        elif node.op_type == "TopK":
            _check_topk(node, initializers, constants, where, report)
        elif node.op_type == "Resize":
            _check_resize(node, where, report)


def _all_nodes(graph: onnx.GraphProto):
    """Nodes of the graph and of its subgraphs (If/Loop bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)


def _check_topk(node, initializers, constants, where, report) -> None:
    k_name = node.input[1]
    if k_name in initializers:
        k = onnx.numpy_helper.to_array(initializers[k_name])
    elif k_name in constants:
        k = onnx.numpy_helper.to_array(constants[k_name].attribute[0].t)
    else:
        report.problems.append(f"{where}: K must be a constant for TensorRT")
        return
    if int(k.max()) > SUPPORT["max_topk"]:
        report.problems.append(f"{where}: k = {int(k.max())} exceeds TensorRT's TopK limit (k ≤ {SUPPORT['max_topk']})")


def _check_resize(node, where, report) -> None:
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    mode = attributes.get("mode", b"nearest").decode()
    transform = attributes.get("coordinate_transformation_mode", b"half_pixel").decode()
    if mode not in SUPPORT["resize"]["modes"]:
        report.problems.append(f"{where}: resize mode {mode!r} not supported by TensorRT")
    if transform not in SUPPORT["resize"]["coordinate_transformation_modes"]:
        report.problems.append(f"{where}: coordinate transformation {transform!r} not supported by TensorRT")


def _check_shapes_and_types(model: onnx.ModelProto, max_batch: int, report: CompatibilityReport) -> None:
    """Only the batch may be dynamic (the optimisation profile covers it); every other shape follows from the
    input's. Element counts come from running the graph at batch 1 and 2 and extrapolating linearly to the
    largest batch (ONNX shape inference cannot follow timm's computed "same" padding)."""
    for tensor in model.graph.input:
        for index, dim in enumerate(tensor.type.tensor_type.shape.dim):
            if index > 0 and not dim.HasField("dim_value"):
                report.problems.append(f"input {tensor.name!r}: dimension {index} is dynamic; only the batch may be")
    if report.problems:
        return
    allowed = {getattr(onnx.TensorProto, name) for name in SUPPORT["data_types"]}
    io_only = {getattr(onnx.TensorProto, name) for name in SUPPORT["io_only_data_types"]}
    outputs = {o.name for o in model.graph.output}
    at_one, at_two = _tensor_sizes(model, 1), _tensor_sizes(model, 2)
    for name, (one, dtype) in at_one.items():
        if dtype in io_only and name not in outputs:
            report.problems.append(f"tensor {name!r}: {onnx.TensorProto.DataType.Name(dtype)} is allowed only as "
                                   "a network input or output in TensorRT")
        elements = one + (at_two[name][0] - one) * (max_batch - 1)
        if elements > report.largest_tensor[1]:
            report.largest_tensor = (name, elements)
        if elements > SUPPORT["max_elements"]:
            report.problems.append(f"tensor {name!r}: {elements:,} elements at batch {max_batch} exceed "
                                   f"TensorRT's limit of {SUPPORT['max_elements']:,}")
        if dtype not in allowed:
            report.problems.append(f"tensor {name!r}: data type {onnx.TensorProto.DataType.Name(dtype)} "
                                   "not supported by TensorRT")
    for init in model.graph.initializer:
        if init.data_type not in allowed or init.data_type in io_only:
            report.problems.append(f"initializer {init.name!r}: data type "
                                   f"{onnx.TensorProto.DataType.Name(init.data_type)} not supported by TensorRT")


def _tensor_sizes(model: onnx.ModelProto, batch: int) -> dict[str, tuple[int, int]]:
    """Element count and ONNX data type of every tensor the main graph computes, for a zero input batch."""
    import numpy as np
    import onnxruntime as ort

    probe = onnx.ModelProto.FromString(model.SerializeToString())
    known = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in node.output if name and name not in known)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    for tensor in session.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in tensor.shape]
        feeds[tensor.name] = np.zeros(shape, dtype=_NUMPY_TYPES[tensor.type])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, feeds)
    return {name: (int(np.asarray(v).size), onnx.helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype))
            for name, v in zip(names, values)}


_NUMPY_TYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32", "tensor(float16)": "float16",
                "tensor(int64)": "int64", "tensor(int32)": "int32"}
