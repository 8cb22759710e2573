"""The CUDA calls the TensorRT backend and the engine build need, behind one small contract, with two
implementations: pycuda (named by the design; it builds from source against the CUDA toolkit, as on a
Jetson) and NVIDIA's cuda-python (`cuda-bindings`: binary wheels for x86_64 and aarch64, for boxes without
a toolkit). Contract: the device's name, compute capability and multiprocessor count, page-locked host arrays, device buffers,
one stream, asynchronous copies both ways, synchronise, release; every CUDA return code is checked and a
failure is a `CudaUnavailable` naming the call and CUDA's error."""

import contextlib
import ctypes

import numpy as np

from edgeinspect.runtime.console import InspectError


class CudaUnavailable(InspectError):
    """CUDA cannot be used here: no binding installed, no driver, no device, or a call failed."""


class CudaBindingsDevice:
    """Device 0 through cuda-python's runtime API (`cuda.bindings.runtime`)."""

    library = "cuda-bindings"

    def __init__(self):
        from cuda.bindings import runtime

        self.rt = runtime
        (count,) = self._call("cudaGetDeviceCount")
        if count < 1:
            raise CudaUnavailable("CUDA sees no GPU (cudaGetDeviceCount returned 0)")
        self._call("cudaSetDevice", 0)
        (properties,) = self._call("cudaGetDeviceProperties", 0)
        name = properties.name
        self._name = (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")
        self._capability = (int(properties.major), int(properties.minor))
        self._multiprocessors = int(properties.multiProcessorCount)
        self._host, self._device = [], []
        (self._stream,) = self._call("cudaStreamCreate")

    def _call(self, function: str, *args):
        """Call a runtime function; raise on any error code, return the remaining results."""
        error, *results = getattr(self.rt, function)(*args)
        if error != self.rt.cudaError_t.cudaSuccess:
            _, error_name = self.rt.cudaGetErrorName(error)
            raise CudaUnavailable(f"CUDA {function} failed: {error_name.decode()} (cuda-bindings)")
        return results

    def name(self) -> str:
        return self._name

    def compute_capability(self) -> tuple[int, int]:
        return self._capability

    def multiprocessors(self) -> int:
        return self._multiprocessors

    @property
    def stream_handle(self) -> int:
        return int(self._stream)

    def pagelocked_empty(self, shape, dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        (pointer,) = self._call("cudaMallocHost", nbytes)
        self._host.append(pointer)
        memory = (ctypes.c_byte * nbytes).from_address(int(pointer))
        return np.frombuffer(memory, dtype=dtype).reshape(shape)

    def device_buffer(self, nbytes: int) -> int:
        (pointer,) = self._call("cudaMalloc", nbytes)
        self._device.append(pointer)
        return int(pointer)

    def copy_to_device(self, device: int, host: np.ndarray) -> None:
        self._call("cudaMemcpyAsync", device, contiguous(host).ctypes.data, host.nbytes,
                   self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream)

    def copy_to_host(self, host: np.ndarray, device: int) -> None:
        self._call("cudaMemcpyAsync", contiguous(host).ctypes.data, device, host.nbytes,
                   self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream)

    def synchronize(self) -> None:
        self._call("cudaStreamSynchronize", self._stream)

    def close(self) -> None:
        """Free the buffers and the stream; safe to call twice."""
        for pointer in self._device:
            self._call("cudaFree", pointer)
        for pointer in self._host:
            self._call("cudaFreeHost", pointer)
        self._host, self._device = [], []
        if self._stream is not None:
            stream, self._stream = self._stream, None
            self._call("cudaStreamDestroy", stream)


class PyCudaDevice:
    """Device 0 through pycuda's driver API, on the device's primary context (the one the CUDA runtime, and
    so TensorRT, uses), not a context of pycuda's own. The context is pushed for each of pycuda's calls and popped
    right after, on every path: pycuda aborts the process at exit when its context stack is not empty."""

    library = "pycuda"

    def __init__(self):
        import pycuda.driver as driver

        self.driver = driver
        self.context = None
        self._device = []
        try:
            driver.init()
            if driver.Device.count() < 1:
                raise CudaUnavailable("CUDA sees no GPU (pycuda: Device.count() is 0)")
            self.device = driver.Device(0)
            self.context = self.device.retain_primary_context()
            with self._current():
                self.stream = driver.Stream()
        except driver.Error as error:
            self.close()
            raise CudaUnavailable(f"CUDA failed: {error} (pycuda)") from None

    @contextlib.contextmanager
    def _current(self):
        """The primary context current for the calls inside, and popped again whatever happens."""
        self.context.push()
        try:
            yield
        finally:
            self.driver.Context.pop()

    def name(self) -> str:
        return self.device.name()

    def compute_capability(self) -> tuple[int, int]:
        return tuple(self.device.compute_capability())

    def multiprocessors(self) -> int:
        return int(self.device.get_attribute(self.driver.device_attribute.MULTIPROCESSOR_COUNT))

    @property
    def stream_handle(self) -> int:
        return self.stream.handle

    def _checked(self, call, *args):
        try:
            with self._current():
                return call(*args)
        except self.driver.Error as error:
            raise CudaUnavailable(f"CUDA {getattr(call, '__name__', call)} failed: {error} (pycuda)") from None

    def pagelocked_empty(self, shape, dtype) -> np.ndarray:
        return self._checked(self.driver.pagelocked_empty, shape, dtype)

    def device_buffer(self, nbytes: int) -> int:
        allocation = self._checked(self.driver.mem_alloc, nbytes)
        self._device.append(allocation)
        return int(allocation)

    def copy_to_device(self, device: int, host: np.ndarray) -> None:
        self._checked(self.driver.memcpy_htod_async, device, contiguous(host), self.stream)

    def copy_to_host(self, host: np.ndarray, device: int) -> None:
        self._checked(self.driver.memcpy_dtoh_async, contiguous(host), device, self.stream)

    def synchronize(self) -> None:
        self._checked(self.stream.synchronize)

    def close(self) -> None:
        """Free the buffers and release the primary context; safe to call twice. Nothing is left current."""
        if self.context is None:
            return
        for allocation in self._device:
            self._checked(allocation.free)
        self._device = []
        context, self.context = self.context, None
        try:
            context.detach()
        except self.driver.Error as error:
            raise CudaUnavailable(f"CUDA detach failed: {error} (pycuda)") from None


def device_identity(cuda, tensorrt_version: str) -> dict:
    """What a TensorRT engine is tied to: TensorRT's version and the GPU model, by its name, compute capability and
    multiprocessor count (Orin Nano and AGX Orin are both 8.7, L4 and RTX 4090 both 8.9; TensorRT's plans are not
    portable across device models)."""
    major, minor = cuda.compute_capability()
    return {"tensorrt": tensorrt_version, "gpu": cuda.name(), "compute_capability": f"{major}.{minor}",
            "multiprocessors": cuda.multiprocessors()}


def contiguous(host: np.ndarray) -> np.ndarray:
    """Copies read raw bytes from the array's first address: a strided view would send the wrong ones."""
    if not host.flags.c_contiguous:
        raise ValueError("CUDA copies need a C-contiguous host array")
    return host


CUDA_LIBRARIES = (PyCudaDevice, CudaBindingsDevice)


def open_cuda():
    """The first CUDA binding that imports and reaches a GPU; the reasons of all of them otherwise."""
    reasons = []
    for implementation in CUDA_LIBRARIES:
        try:
            return implementation()
        except ModuleNotFoundError:
            reasons.append(f"{implementation.library} is not installed")
        except ImportError as error:  # installed, but a library it needs (libcuda.so.1: the driver) is missing
            reasons.append(f"{implementation.library} cannot load: {error}")
        except CudaUnavailable as reason:
            reasons.append(str(reason))
    raise CudaUnavailable("; ".join(reasons) + " (pip install cuda-bindings, or pycuda where the CUDA toolkit "
                          "is installed, as on a Jetson)")
