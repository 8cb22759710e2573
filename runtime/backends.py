"""Inference backends: each runs the bundle's graph on a batch of uint8 RGB images (B, H, W, 3) and returns
(anomaly_map (B, H, W) float32, score (B,) float32). `auto` takes the best one that works here, in the order
tensorrt, ort-tensorrt, ort-cuda, openvino, ort-cpu, and says why the better ones were passed over. The GPU
libraries (tensorrt, pycuda, onnxruntime-gpu) and OpenVINO are imported only when their backend is opened."""

import os

import numpy as np

from .bundle import Bundle
from .console import InspectError


class BackendUnavailable(InspectError):
    """This backend cannot run here (a library, a device or an engine is missing)."""


class OrtBackend:
    """ONNX Runtime with one execution provider; the GPU providers prefer the bundle's fp16 model."""

    name = "ort-cpu"
    provider = "CPUExecutionProvider"
    prefers_fp16 = False

    def __init__(self, bundle: Bundle, threads: int | None = None):
        import onnxruntime as ort

        if self.provider not in ort.get_available_providers():
            raise BackendUnavailable(f"onnxruntime has no {self.provider} (pip install -e '.[gpu]' for "
                                     "onnxruntime-gpu)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle worker threads sleep instead of spinning: the capture thread and the resize share these cores
        # (+33% frames/s through inspect-run on 2 cores, same latency alone; see BENCHMARKS.md)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model_file = bundle.model_file
        if self.prefers_fp16 and bundle.record.get("fp16_model_file"):
            model_file = bundle.path / bundle.record["fp16_model_file"]
        try:
            self.session = ort.InferenceSession(str(model_file), options, providers=[self.provider])
        except Exception as error:
            raise InspectError(f"{model_file}: ONNX Runtime cannot load it ({error})") from None
        if self.provider not in self.session.get_providers():
            raise BackendUnavailable(f"{self.provider} did not initialise (no usable GPU?)")
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = bundle.record["outputs"]

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        anomaly_map, score = self.session.run(self.output_names, {self.input_name: images})
        return anomaly_map[:, 0], score


class OrtCpuBackend(OrtBackend):
    pass


class OrtCudaBackend(OrtBackend):
    name, provider, prefers_fp16 = "ort-cuda", "CUDAExecutionProvider", True


class OrtTensorRTBackend(OrtBackend):
    name, provider, prefers_fp16 = "ort-tensorrt", "TensorrtExecutionProvider", False


class OpenVinoBackend:
    """OpenVINO on the CPU, running the fp32 ONNX graph with fp32 arithmetic (its bf16 default on CPUs with AMX
    would shift the calibrated scores). One static-shape model per batch size, batch 1 on opening and the
    others when first needed: a dynamic batch dimension costs a third more time per frame (BENCHMARKS.md)."""

    name = "openvino"

    def __init__(self, bundle: Bundle, threads: int | None = None):
        try:
            import openvino
        except ImportError:
            raise BackendUnavailable("openvino is not installed (pip install openvino)") from None
        self.core = openvino.Core()
        self.config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_NUM_THREADS": threads or os.cpu_count() or 1}
        self.output_names = bundle.record["outputs"]
        self.requests = {}
        try:  # compiled for batch 1 now, so that a graph OpenVINO cannot run falls back to ONNX Runtime
            self.model = self.core.read_model(bundle.model_file)
            self._request_for((1, *bundle.input_size, 3))
        except Exception as error:
            raise BackendUnavailable(f"{bundle.model_file}: OpenVINO cannot compile it ({error})") from None

    def _request_for(self, shape: tuple[int, ...]):
        if shape not in self.requests:
            model = self.model.clone()
            model.reshape({model.inputs[0].get_any_name(): list(shape)})
            self.requests[shape] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        return self.requests[shape]

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self._request_for(images.shape).infer({0: images})
        anomaly_map, score = (result[name] for name in self.output_names)
        return anomaly_map[:, 0], score


class TensorRTBackend:
    """The bundle's TensorRT engine: page-locked host buffers and device buffers for the largest batch,
    allocated once; one CUDA stream; copy in → execute_async_v3 → copy out → synchronise."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, threads: int | None = None):
        engine_record = bundle.record.get("engine")
        if not engine_record:
            raise BackendUnavailable("the bundle has no TensorRT engine (build one on this device: "
                                     f"inspect-export {bundle.path} --engine)")
        try:
            import pycuda.autoinit  # noqa: F401  (creates the CUDA context)
            import pycuda.driver as cuda
            import tensorrt as trt
        except ImportError as error:
            raise BackendUnavailable(f"{error.name} is not importable (JetPack ships tensorrt; pip install pycuda)")
        check_engine_matches_device(bundle, engine_record, trt.__version__, cuda.Device(0))
        self.cuda = cuda
        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine((bundle.path / engine_record["file"]).read_bytes())
        if engine is None:
            raise InspectError(f"{bundle.path / engine_record['file']}: TensorRT could not load the engine")
        self.engine, self.context = engine, engine.create_execution_context()
        self.max_batch = engine_record["batch_sizes"][-1]
        self.stream = cuda.Stream()
        self.buffers = {}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            shape = [self.max_batch if d < 0 else d for d in engine.get_tensor_shape(name)]
            dtype = trt.nptype(engine.get_tensor_dtype(name))
            host = cuda.pagelocked_empty(shape, dtype)
            device = cuda.mem_alloc(host.nbytes)
            self.context.set_tensor_address(name, int(device))
            self.buffers[name] = (host, device, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT)
        self.input_name = next(n for n, (_, _, is_input) in self.buffers.items() if is_input)
        self.output_names = bundle.record["outputs"]

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(images) > self.max_batch:
            parts = [self(images[i:i + self.max_batch]) for i in range(0, len(images), self.max_batch)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        batch = len(images)
        if not self.context.set_input_shape(self.input_name, images.shape):
            raise InspectError(f"TensorRT refused input shape {images.shape}")
        host, device, _ = self.buffers[self.input_name]
        host[:batch] = images
        self.cuda.memcpy_htod_async(device, host[:batch], self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise InspectError("TensorRT inference failed (execute_async_v3 returned false)")
        outputs = []
        for name in self.output_names:
            host, device, _ = self.buffers[name]
            self.cuda.memcpy_dtoh_async(host[:batch], device, self.stream)
            outputs.append(host)
        self.stream.synchronize()
        anomaly_map, score = outputs
        return anomaly_map[:batch, 0].copy(), score[:batch].copy()


def check_engine_matches_device(bundle: Bundle, engine: dict, tensorrt_version: str, device) -> None:
    """Engines are not portable: refuse one built with another TensorRT or for another GPU."""
    major, minor = device.compute_capability()
    here = {"tensorrt": tensorrt_version, "gpu": device.name(), "compute_capability": f"{major}.{minor}"}
    for key in ("tensorrt", "compute_capability"):
        if engine.get(key) != here[key]:
            raise BackendUnavailable(
                f"{bundle.path}: engine built for {engine.get('gpu')} (compute {engine.get('compute_capability')}, "
                f"TensorRT {engine.get('tensorrt')}), this is {here['gpu']} (compute {here['compute_capability']}, "
                f"TensorRT {here['tensorrt']}): rebuild it here with inspect-export {bundle.path} --engine")


BACKENDS = {backend.name: backend for backend in
            (TensorRTBackend, OrtTensorRTBackend, OrtCudaBackend, OpenVinoBackend, OrtCpuBackend)}


def open_backend(bundle: Bundle, name: str = "auto", threads: int | None = None):
    """The named backend, or with "auto" the first that opens; `.passed_over` maps the better ones to why not."""
    if name != "auto":
        if name not in BACKENDS:
            raise InspectError(f"--backend {name!r} is not one of auto, {', '.join(BACKENDS)}")
        backend = BACKENDS[name](bundle, threads)
        backend.passed_over = {}
        return backend
    passed_over = {}
    for candidate in BACKENDS.values():
        try:
            backend = candidate(bundle, threads)
        except BackendUnavailable as reason:
            passed_over[candidate.name] = str(reason)
            continue
        backend.passed_over = passed_over
        return backend
    raise InspectError(f"no backend can run {bundle.path}: " + "; ".join(f"{k}: {v}" for k, v in passed_over.items()))
