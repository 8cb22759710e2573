"""TensorRT engine from the bundle's ONNX graph (TensorRT 10 Python API). Imported only where TensorRT and
a GPU exist: on a Jetson (JetPack ships TensorRT) or a GPU box with the `gpu` extra."""

from pathlib import Path

from edgeinspect.runtime.console import InspectError

ENGINE_FILE = "model.engine"
TIMING_CACHE_FILE = "timing.cache"


def tensorrt_unavailable() -> str | None:
    """Why no engine can be built here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not importable (JetPack ships it; elsewhere: pip install -e '.[gpu]')"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
    except ImportError:
        return "torch is not importable"
    return None


def device_identity() -> dict:
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0),
            "compute_capability": f"{major}.{minor}"}


def build_engine(onnx_path: Path, engine_path: Path, fp16: bool, fp32_nodes: list[str], batch_sizes: tuple[int, int, int],
                 workspace_mb: int, cache_path: Path) -> dict:
    """Parse, build (FP16 where allowed, the fragile layers pinned to FP32), write the engine; returns its record."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InspectError(f"{onnx_path}: TensorRT's ONNX parser refused it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    pinned = 0
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = pin_fp32_layers(network, set(fp32_nodes), trt)
    image_input = network.get_input(0)
    low, optimum, high = batch_sizes
    _, height, width, channels = image_input.shape
    profile = builder.create_optimization_profile()
    profile.set_shape(image_input.name, (low, height, width, channels), (optimum, height, width, channels),
                      (high, height, width, channels))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InspectError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"file": engine_path.name, "fp16": fp16, "batch_sizes": list(batch_sizes), "workspace_mb": workspace_mb,
            "fp32_layers_pinned": pinned, **device_identity()}


def pin_fp32_layers(network, fp32_nodes: set[str], trt) -> int:
    """Layers that come from fp32 nodes (TensorRT names them after the ONNX node, sometimes with a suffix)
    compute and output in FP32; the builder obeys because of OBEY_PRECISION_CONSTRAINTS."""
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if not any(layer.name == node or layer.name.startswith(node + "_") for node in fp32_nodes):
            continue
        layer.precision = trt.float32
        for output in range(layer.num_outputs):
            if layer.get_output_type(output) in (trt.float32, trt.float16):
                layer.set_output_type(output, trt.float32)
        pinned += 1
    return pinned
