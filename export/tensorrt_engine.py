"""TensorRT engine from one of the bundle's ONNX graphs, with one code path for TensorRT 10.x and 11.x: a
strongly typed network (the precision of every layer comes from the ONNX's types, so model_fp16.onnx gives
an fp16 engine with the fragile layers in fp32, and model.onnx an fp32 one), no precision flags, TF32 off,
every builder result checked. Runs on the device itself (a Jetson, a GPU box) without torch: the GPU is
queried through CUDA (runtime/cuda_device.py). The names used here are listed, with their source, in
tensorrt_api.json."""

import re
from pathlib import Path

from edgeinspect.runtime.console import InspectError
from edgeinspect.runtime.files import atomic_write_bytes, cache_dir, sha256_file
from edgeinspect.runtime.inference.cuda_device import CudaUnavailable, device_identity, open_cuda

ENGINE_FILE = "model.engine"


def tensorrt_unavailable() -> str | None:
    """Why no engine can be built here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return ("the tensorrt package is not importable (JetPack ships it; on an x86 GPU box: "
                "pip install 'edge-inspect[gpu]')")
    try:
        open_cuda().close()
    except CudaUnavailable as reason:
        return str(reason)
    return None


def this_device() -> dict:
    """What an engine built here is tied to (cuda_device.device_identity)."""
    import tensorrt as trt

    cuda = open_cuda()
    try:
        return device_identity(cuda, trt.__version__)
    finally:
        cuda.close()


def default_timing_cache(identity: dict) -> Path:
    """The timing cache of this GPU model and TensorRT version, in the machine's cache folder: a cache made on
    another GPU or TensorRT is of no use, and the bundle is copied to other devices."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", identity["gpu"]).strip("-").lower()
    return cache_dir("tensorrt") / f"{gpu}-sm{identity['compute_capability']}-trt{identity['tensorrt']}.cache"


def _checked(result, what: str):
    if result is None:
        raise InspectError(f"TensorRT could not {what} (see its log above)")
    return result


def build_engine(onnx_path: Path, engine_path: Path, batch_sizes: tuple[int, int, int], workspace_mb: int,
                 cache_path: Path | None = None) -> dict:
    """Parse, build and write the engine; returns its record (what it was built from and for)."""
    import tensorrt as trt

    identity = this_device()
    cache_path = cache_path or default_timing_cache(identity)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = _checked(trt.Builder(logger), "create a builder")
    # required on 10.x; on 11.x every network is strongly typed and the flag (deprecated) is ignored
    network = _checked(builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)),
                       "create a network")
    parser = _checked(trt.OnnxParser(network, logger), "create an ONNX parser")
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InspectError(f"{onnx_path}: TensorRT's ONNX parser refused it: {errors}")
    config = _checked(builder.create_builder_config(), "create a builder configuration")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.clear_flag(trt.BuilderFlag.TF32)  # on by default: the fp32 layers would get 10-bit mantissas
    image_input = network.get_input(0)
    _, height, width, channels = image_input.shape
    profile = _checked(builder.create_optimization_profile(), "create an optimisation profile")
    low, optimum, high = ((b, height, width, channels) for b in batch_sizes)
    profile.set_shape(image_input.name, low, optimum, high)
    if config.add_optimization_profile(profile) < 0:
        raise InspectError(f"TensorRT refused the optimisation profile {batch_sizes} for {image_input.name!r}")
    cache = _checked(config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b""),
                     "create a timing cache")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise InspectError(f"{cache_path}: TensorRT refused this timing cache; delete it and build again")
    serialized = _checked(builder.build_serialized_network(network, config), f"build an engine from {onnx_path}")
    atomic_write_bytes(engine_path, bytes(serialized))
    atomic_write_bytes(cache_path, bytes(_checked(config.get_timing_cache(), "return its timing cache").serialize()))
    return {"file": engine_path.name, "onnx": {"file": onnx_path.name, "sha256": sha256_file(onnx_path)},
            "strongly_typed": True, "tf32": False, "batch_sizes": list(batch_sizes), "workspace_mb": workspace_mb,
            "timing_cache": str(cache_path), **identity}
