"""Inference backends: each runs the bundle's graph on a batch of uint8 RGB images (B, H, W, 3) and returns
(anomaly_map (B, H, W) float32, score (B,) float32). `auto` takes the best one that works here, in the order
tensorrt, ort-tensorrt, ort-cuda, openvino, ort-cpu, and says why the better ones were passed over. The GPU
libraries (tensorrt, pycuda or cuda-bindings, onnxruntime-gpu), ONNX Runtime and OpenVINO are imported only
when their backend is opened."""

import contextlib
import ctypes
import functools
import importlib.util
import io
import os
import weakref
from pathlib import Path

import numpy as np

from edgeinspect.runtime.console import InspectError
from edgeinspect.runtime.files import cache_dir
from edgeinspect.runtime.inference.bundle import Bundle
from edgeinspect.runtime.inference.cuda_device import CudaUnavailable, device_identity, open_cuda


class BackendUnavailable(InspectError):
    """This backend cannot run here (a library, a device or an engine is missing)."""


def ort_session_options(ort, threads: int | None):
    """ONNX Runtime's CPU session settings of every backend here (and of the benchmarks that time graphs alone)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle worker threads sleep instead of spinning: the capture thread and the resize share these cores
    # (+33% frames/s through inspect-run on 2 cores, same latency alone; see BENCHMARKS.md)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def openvino_config(threads: int | None) -> dict:
    """OpenVINO's CPU settings, likewise shared: fp32 arithmetic (see OpenVinoBackend), tuned for latency."""
    return {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads or os.cpu_count() or 1}


def batches_within_profile(run):
    """A batch larger than the profile's maximum runs in parts; one smaller than its minimum (one frame, or what
    is left of a batch, against --batch-sizes 4,8,16) is padded with blank images, whose outputs are dropped."""
    @functools.wraps(run)
    def within(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(images) > self.max_batch:
            parts = [within(self, images[i:i + self.max_batch]) for i in range(0, len(images), self.max_batch)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if len(images) < self.min_batch:
            blank = np.zeros((self.min_batch - len(images), *images.shape[1:]), images.dtype)
            anomaly_map, score = run(self, np.concatenate([images, blank]))
            return anomaly_map[:len(images)], score[:len(images)]
        return run(self, images)
    return within


class OrtBackend:
    """ONNX Runtime with one execution provider. GPU sessions never fall back to the CPU silently (ONNX
    Runtime's Python session otherwise retries on the CPU, at creation and inside run(), and keeps its name);
    a provider that cannot start is a reason to pass this backend over, with the library it lacks."""

    name = "ort-cpu"
    provider = "CPUExecutionProvider"
    provider_library = None  # the provider's shared library in onnxruntime/capi, for GPU providers
    libraries_hint = ""  # what to install when that library cannot load
    prefers_fp16 = False

    runs_int8 = True  # the QDQ model (ONNX Runtime's CUDA provider is passed over for it)

    def __init__(self, bundle: Bundle, threads: int | None = None, precision: str = "fp32"):
        if precision == "int8" and not self.runs_int8:
            raise BackendUnavailable("runs the fp16 and fp32 models, not the INT8 one (openvino, ort-cpu, "
                                     "ort-tensorrt and tensorrt do)")
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed (pip install 'edge-inspect[cpu]', or "
                                     "'edge-inspect[gpu]' on a GPU box)") from None
        if self.provider not in ort.get_available_providers():
            raise BackendUnavailable(f"this onnxruntime has no {self.provider} (onnxruntime-gpu has it: "
                                     "pip install 'edge-inspect[gpu]')")
        if self.provider_library:
            self.preload()
            _preload_gpu_libraries(ort, self.provider_library, self.libraries_hint)
        options = ort_session_options(ort, threads)
        model_file = model_for(bundle, precision)
        if self.prefers_fp16 and bundle.record.get("fp16_model_file"):
            model_file = bundle.path / bundle.record["fp16_model_file"]
        try:
            self.session = ort.InferenceSession(str(model_file), options, enable_fallback=0,
                                                providers=[(self.provider, self.provider_options(bundle, precision))])
        except Exception as error:
            if self.provider_library:
                raise BackendUnavailable(f"{self.provider} could not start on {model_file.name}: {error}") from None
            raise InspectError(f"{model_file}: ONNX Runtime cannot load it ({error})") from None
        self.session.disable_fallback()
        if self.provider not in self.session.get_providers():
            raise BackendUnavailable(f"{self.provider} did not start (ONNX Runtime's log above says why)")
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = bundle.record["outputs"]

    def preload(self) -> None:
        """Libraries the provider needs that its own loading would not find."""

    def provider_options(self, bundle: Bundle, precision: str = "fp32") -> dict:
        return {}

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        anomaly_map, score = self.session.run(self.output_names, {self.input_name: images})
        return anomaly_map[:, 0], score


def _preload_gpu_libraries(ort, provider_library: str, hint: str) -> None:
    """Load CUDA/cuDNN from NVIDIA's pip packages where present (onnxruntime-gpu[cuda,cudnn]), then the
    provider's own library: the loader's error names the first library it lacks (ONNX Runtime would only
    print a warning and run on the CPU)."""
    if hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                ort.preload_dlls(directory="")
            except Exception:  # preloading is a convenience; the probe below says what is missing
                pass
    path = Path(ort.__file__).parent / "capi" / provider_library
    missing = missing_shared_library(path)
    if missing:
        raise BackendUnavailable(f"{path.name} cannot load: {missing} ({hint})")


def load_package_libraries(package: str, names: tuple[str, ...]) -> None:
    """Load shared libraries that a pip package holds in its folder, globally, so that a library linked against
    them finds them by name. Nothing happens where the package is not installed (JetPack puts them on the
    system's path)."""
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for name in names:
            if (Path(folder) / name).is_file():
                try:
                    ctypes.CDLL(str(Path(folder) / name), mode=ctypes.RTLD_GLOBAL)
                except OSError:  # what it lacks in turn: the provider's probe names it
                    pass


def missing_shared_library(path: Path) -> str | None:
    """The loader's message when a library this shared library needs cannot be found, or None. ONNX Runtime's
    providers take one symbol from libonnxruntime_providers_shared.so beside them, which is loaded first."""
    path = Path(path)
    shared = path.with_name("libonnxruntime_providers_shared.so")
    try:
        if shared.is_file() and shared != path:
            ctypes.CDLL(str(shared), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(path))
    except OSError as error:
        return str(error) if "cannot open shared object file" in str(error) else None
    return None


class OrtCpuBackend(OrtBackend):
    pass


class OrtCudaBackend(OrtBackend):
    """CUDA provider on the fp16 model, TF32 off so that the fp32 layers (distances, Min) stay fp32 (ONNX Runtime
    1.18 and newer; older ones have no switch)."""

    name, provider, prefers_fp16, runs_int8 = "ort-cuda", "CUDAExecutionProvider", True, False
    provider_library = "libonnxruntime_providers_cuda.so"
    libraries_hint = ("onnxruntime-gpu needs CUDA 13 and cuDNN 9: pip install 'edge-inspect[gpu]', which brings "
                      "onnxruntime-gpu[cuda,cudnn], or put them on LD_LIBRARY_PATH")

    def provider_options(self, bundle: Bundle, precision: str = "fp32") -> dict:
        import onnxruntime as ort

        options = {"device_id": "0"}
        if onnxruntime_version(ort.__version__) >= (1, 18):  # older providers (JetPack's) refuse unknown options
            options["use_tf32"] = "0"
        return options


def onnxruntime_version(text: str) -> tuple[int, int]:
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


class OrtTensorRTBackend(OrtBackend):
    """ONNX Runtime's TensorRT provider on the fp32 model, with the bundle's batch profile and an engine and
    timing cache outside the bundle. It links TensorRT 10 (libnvinfer.so.10 for onnxruntime-gpu 1.31) and has
    no TF32 switch: its fp32 layers may run in TF32, so no 1e-4 parity is claimed for it."""

    name, provider, prefers_fp16 = "ort-tensorrt", "TensorrtExecutionProvider", False
    provider_library = "libonnxruntime_providers_tensorrt.so"
    libraries_hint = ("ONNX Runtime's TensorRT provider needs TensorRT 10, not 11: pip install 'edge-inspect[gpu]', "
                      "which brings tensorrt-cu13 10.x, or JetPack's TensorRT 10")

    def __init__(self, bundle: Bundle, threads: int | None = None, precision: str = "fp32"):
        self.min_batch, _, self.max_batch = batch_profile(bundle)
        super().__init__(bundle, threads, precision)

    @batches_within_profile
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return super().__call__(images)

    def preload(self) -> None:
        """TensorRT's libraries from its pip package (tensorrt_libs), which nothing but `import tensorrt` loads:
        the provider library has no RUNPATH to them."""
        load_package_libraries("tensorrt_libs", ("libnvinfer.so.10", "libnvonnxparser.so.10"))

    def provider_options(self, bundle: Bundle, precision: str = "fp32") -> dict:
        cache = cache_dir("ort-tensorrt") / bundle.record["files"][bundle.record["model_file"]]["sha256"][:16]
        if precision == "int8":  # its own engine cache: another model
            cache = cache.with_name(bundle.record["files"][bundle.record["int8_model_file"]]["sha256"][:16])
        cache.mkdir(parents=True, exist_ok=True)  # the provider makes the last folder only, and fails without it
        cache = str(cache)
        height, width = bundle.input_size
        low, optimum, high = (f"{bundle.record['input']['name']}:{b}x{height}x{width}x3" for b in batch_profile(bundle))
        options = {"device_id": "0", "trt_engine_cache_enable": "True", "trt_engine_cache_path": cache,
                   "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache,
                   "trt_profile_min_shapes": low, "trt_profile_opt_shapes": optimum, "trt_profile_max_shapes": high}
        if precision == "int8":  # the provider's network is weakly typed: its Q/DQ layers need the INT8 flag
            options["trt_int8_enable"] = "True"  # (no calibration table: the scales are the QDQ model's own)
        return options


def batch_profile(bundle: Bundle) -> tuple[int, int, int]:
    """MIN, OPT, MAX batch the bundle was checked for (inspect-export --batch-sizes)."""
    profile = bundle.record.get("batch_profile")
    if profile:
        return tuple(profile)
    return (1, 1, (bundle.record.get("tensorrt_check") or {}).get("max_batch", 8))


class OpenVinoBackend:
    """OpenVINO on the CPU, running the fp32 ONNX graph with fp32 arithmetic (its bf16 default on CPUs with AMX
    would shift the calibrated scores). One static-shape model per batch size, batch 1 on opening and the
    others when first needed: a dynamic batch dimension costs a third more time per frame (BENCHMARKS.md)."""

    name = "openvino"

    def __init__(self, bundle: Bundle, threads: int | None = None, precision: str = "fp32"):
        try:
            import openvino
        except ImportError:
            raise BackendUnavailable("openvino is not installed (pip install openvino)") from None
        self.core = openvino.Core()
        self.config = openvino_config(threads)
        self.output_names = bundle.record["outputs"]
        self.requests = {}
        model_file = model_for(bundle, precision)
        try:  # compiled for batch 1 now, so that a graph OpenVINO cannot run falls back to ONNX Runtime
            self.model = self.core.read_model(model_file)
            self._request_for((1, *bundle.input_size, 3))
        except Exception as error:
            raise BackendUnavailable(f"{model_file}: OpenVINO cannot compile it ({error})") from None

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
    """The bundle's TensorRT engine (TensorRT 10 or 11): page-locked host buffers and device buffers for the
    largest batch, allocated once; one CUDA stream; copy in → execute_async_v3 → copy out → synchronise.
    CUDA comes from pycuda or cuda-bindings (runtime/cuda_device.py)."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, threads: int | None = None, precision: str = "fp32"):
        engine_record = bundle.record.get("engine")
        if not engine_record:
            raise BackendUnavailable("the bundle has no TensorRT engine (build one on this device: "
                                     f"inspect-export {bundle.path} --engine)")
        built_from = (engine_record.get("onnx") or {}).get("file")
        if (precision == "int8") != (built_from is not None and built_from == bundle.record.get("int8_model_file")):
            raise BackendUnavailable(f"the engine was built from {built_from}, not for {precision} (rebuild it: "
                                     f"inspect-export {bundle.path} --engine{' --int8' if precision == 'int8' else ''})")
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendUnavailable("tensorrt is not importable (JetPack ships it; on an x86 GPU box: pip install "
                                     "'edge-inspect[gpu]')") from None
        try:
            self.cuda = open_cuda()
        except CudaUnavailable as reason:
            raise BackendUnavailable(str(reason)) from None
        # released when the backend goes, at the latest when the interpreter ends: before pycuda's own cleanup,
        # which aborts the process while a context is current
        self.release = weakref.finalize(self, self.cuda.close)
        try:
            self._load(bundle, engine_record, trt)
        except BaseException:
            self.release()
            raise

    def _load(self, bundle: Bundle, engine_record: dict, trt) -> None:
        check_engine_matches_device(bundle, engine_record, trt.__version__, self.cuda)
        engine_file = bundle.path / engine_record["file"]
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_file.read_bytes())
        if engine is None:
            raise BackendUnavailable(f"{engine_file}: TensorRT could not load the engine (see its log above)")
        self.engine, self.context = engine, engine.create_execution_context()
        if self.context is None:
            raise BackendUnavailable(f"{engine_file}: TensorRT could not create an execution context")
        self.min_batch, self.max_batch = engine_record["batch_sizes"][0], engine_record["batch_sizes"][-1]
        self.buffers = {}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            shape = [self.max_batch if d < 0 else d for d in engine.get_tensor_shape(name)]
            host = self.cuda.pagelocked_empty(shape, trt.nptype(engine.get_tensor_dtype(name)))
            device = self.cuda.device_buffer(host.nbytes)
            if not self.context.set_tensor_address(name, device):
                raise BackendUnavailable(f"{engine_file}: TensorRT refused the buffer of tensor {name!r}")
            self.buffers[name] = (host, device, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT)
        self.input_name = next(n for n, (_, _, is_input) in self.buffers.items() if is_input)
        self.output_names = bundle.record["outputs"]

    def close(self) -> None:
        self.release()

    @batches_within_profile
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = len(images)
        if not self.context.set_input_shape(self.input_name, images.shape):
            raise InspectError(f"TensorRT refused input shape {images.shape}")
        host, device, _ = self.buffers[self.input_name]
        host[:batch] = images
        self.cuda.copy_to_device(device, host[:batch])
        if not self.context.execute_async_v3(self.cuda.stream_handle):
            raise InspectError("TensorRT inference failed (execute_async_v3 returned false)")
        outputs = []
        for name in self.output_names:
            host, device, _ = self.buffers[name]
            self.cuda.copy_to_host(host[:batch], device)
            outputs.append(host)
        self.cuda.synchronize()
        anomaly_map, score = outputs
        return anomaly_map[:batch, 0].copy(), score[:batch].copy()


def check_engine_matches_device(bundle: Bundle, engine: dict, tensorrt_version: str, device) -> None:
    """Engines are not portable: refuse one built with another TensorRT or for another GPU model (an engine
    recorded before the multiprocessor count was: by the rest)."""
    here = device_identity(device, tensorrt_version)
    keys = [key for key in here if key in engine or key != "multiprocessors"]
    if any(engine.get(key) != here[key] for key in keys):
        def described(identity: dict) -> str:
            return (f"{identity.get('gpu')} (compute {identity.get('compute_capability')}, "
                    f"{identity.get('multiprocessors', '?')} multiprocessors, TensorRT {identity.get('tensorrt')})")
        raise BackendUnavailable(f"{bundle.path}: engine built for {described(engine)}, this is {described(here)}: "
                                 f"rebuild it here with inspect-export {bundle.path} --engine")


BACKENDS = {backend.name: backend for backend in
            (TensorRTBackend, OrtTensorRTBackend, OrtCudaBackend, OpenVinoBackend, OrtCpuBackend)}


PRECISIONS = ("fp32", "int8")


def model_for(bundle: Bundle, precision: str) -> Path:
    """The ONNX model a CPU or ONNX Runtime backend runs for `precision` (fp32: model.onnx; int8: the QDQ model)."""
    if precision == "int8":
        if not bundle.record.get("int8_model_file"):
            raise InspectError(f"{bundle.path}: no INT8 model (add one: inspect-export {bundle.path} --int8)")
        return bundle.path / bundle.record["int8_model_file"]
    return bundle.model_file


def open_backend(bundle: Bundle, name: str = "auto", threads: int | None = None, precision: str = "fp32"):
    """The named backend, or with "auto" the first that opens; `.passed_over` maps the better ones to why not.
    Under "auto" any failure to open a backend (a library, a driver, a CUDA error) passes it over with the
    real reason; a backend asked for by name reports its failure as the error."""
    if name != "auto":
        if name not in BACKENDS:
            raise InspectError(f"--backend {name!r} is not one of auto, {', '.join(BACKENDS)}")
        try:
            backend = BACKENDS[name](bundle, threads, precision)
        except InspectError:
            raise
        except Exception as error:
            raise InspectError(f"--backend {name}: could not start: {type(error).__name__}: {error}") from None
        backend.passed_over = {}
        return backend
    passed_over = {}
    for candidate in BACKENDS.values():
        try:
            backend = candidate(bundle, threads, precision)
        except BackendUnavailable as reason:
            passed_over[candidate.name] = str(reason)
            continue
        except Exception as error:  # noqa: BLE001 - e.g. a CUDA error inside a GPU library: pass it over
            passed_over[candidate.name] = f"could not start: {type(error).__name__}: {error}"
            continue
        backend.passed_over = passed_over
        return backend
    raise InspectError(f"no backend can run {bundle.path}: " + "; ".join(f"{k}: {v}" for k, v in passed_over.items()))
