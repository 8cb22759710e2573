"""Which parts of a graph may run in fp16. Each model names the modules that tolerate it (the backbone,
the student, the feature autoencoder); every other node (distances, Min over the bank, softmax, feature
normalisation, products of maps, smoothing) stays in fp32. The same node list drives the fp16 ONNX model
and, through it, the TensorRT engine: a strongly typed network takes each layer's precision from the fp16
ONNX's types. No torch here: the device converts a bundle's model itself when it lacks the fp16 one."""

from pathlib import Path

import numpy as np
import onnx


def onnx_scopes(module_names: tuple[str, ...]) -> list[str]:
    """PyTorch module paths ("embedding.extractor") → the ONNX node-name prefixes torch.onnx gives their nodes."""
    return ["/" + name.replace(".", "/") + "/" for name in module_names]


def fp32_nodes(model_path: Path, half_scopes: list[str]) -> list[str]:
    """Names of the nodes outside every fp16-tolerant scope, and of the shape arithmetic inside them."""
    graph = onnx.load(str(model_path)).graph
    shape_math = shape_arithmetic(graph)
    return [node.name for node in graph.node
            if not node.name.startswith(tuple(half_scopes)) or node.name in shape_math]


def shape_arithmetic(graph: onnx.GraphProto) -> set[str]:
    """Nodes that compute on tensor shapes only (timm's "same" padding: Shape → Cast → Div → Ceil → Pad
    amounts); converting them to fp16 breaks their explicit Casts."""
    constant = {init.name for init in graph.initializer}
    derived, names = set(), set()
    for node in graph.node:  # ONNX nodes are topologically sorted
        inputs = [name for name in node.input if name and name not in constant]
        if node.op_type == "Constant":
            constant.update(node.output)
        elif node.op_type == "Shape" or (inputs and all(name in derived for name in inputs)):
            derived.update(node.output)
            names.add(node.name)
    return names


def convert_fp16(model_path: Path, out_path: Path, keep_fp32: list[str]) -> None:
    """fp16 weights and computation for the tolerant nodes; fp32 inputs, outputs and fragile nodes, with a
    Cast on every float edge that crosses between the two."""
    model = onnx.load(str(model_path))
    graph = model.graph
    float_tensors = _float_tensors(model)
    keep = set(keep_fp32)
    half_nodes = [node for node in graph.node if node.name not in keep]
    produced_in_half = {name for node in half_nodes for name in node.output}
    initializers = {init.name: init for init in graph.initializer}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    casts, renamed, half_copies = [], {}, {}
    for node in half_nodes:
        if node.op_type == "Constant" and node.attribute[0].t.data_type == onnx.TensorProto.FLOAT:
            node.attribute[0].t.CopyFrom(_to_half(node.attribute[0].t))
        if node.op_type == "Cast" and node.attribute[0].i == onnx.TensorProto.FLOAT:
            node.attribute[0].i = onnx.TensorProto.FLOAT16
        for index, name in enumerate(node.input):
            if name in initializers and name in float_tensors:
                if all(c.name not in keep for c in consumers[name]):
                    initializers[name].CopyFrom(_to_half(initializers[name]))
                elif name not in half_copies:  # shared with an fp32 node: the fp16 nodes get a copy of their own
                    half_copies[name] = _to_half(initializers[name], name + "_fp16")
                if name in half_copies:
                    node.input[index] = half_copies[name].name
                continue
            if name in float_tensors and name not in produced_in_half:
                if name not in renamed:
                    renamed[name] = name + "_fp16"
                    casts.append(onnx.helper.make_node("Cast", [name], [renamed[name]], name=renamed[name],
                                                       to=onnx.TensorProto.FLOAT16))
                node.input[index] = renamed[name]
    graph.initializer.extend(half_copies.values())
    outputs = {o.name for o in graph.output}
    for name in sorted(produced_in_half & float_tensors):
        fp32_users = [c for c in consumers.get(name, []) if c.name in keep]
        if not fp32_users and name not in outputs:
            continue
        half_name = name + "_half"
        for node in half_nodes:
            node.output[:] = [half_name if o == name else o for o in node.output]
        for node in half_nodes:
            node.input[:] = [half_name if i == name else i for i in node.input]
        casts.append(onnx.helper.make_node("Cast", [half_name], [name], name=name + "_to_fp32",
                                           to=onnx.TensorProto.FLOAT))
    graph.node.extend(casts)
    del graph.value_info[:]
    sorted_model = _topological(model)
    onnx.checker.check_model(sorted_model, full_check=True)  # with type inference: mixed fp16/fp32 inputs fail
    onnx.save(sorted_model, str(out_path))


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
    names = {i.name for i in infos if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    names |= {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    return names


def _to_half(tensor: onnx.TensorProto, name: str | None = None) -> onnx.TensorProto:
    array = onnx.numpy_helper.to_array(tensor)
    return onnx.numpy_helper.from_array(np.clip(array, -65504, 65504).astype(np.float16), name or tensor.name)


def _topological(model: onnx.ModelProto) -> onnx.ModelProto:
    """Reorder nodes so each comes after the producers of its inputs (the casts were appended at the end)."""
    graph = model.graph
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError("fp16 conversion left a cycle or a dangling input")
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)
    return model
