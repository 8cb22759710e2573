"""What a GPU box or Jetson would hit first, mended and proved without a GPU: ONNX Runtime's TensorRT cache folder
made before the provider starts, TensorRT's pip libraries loaded before the provider is probed, pycuda's context
pushed and popped in pairs on every path (a recording stand-in of pycuda's API, its names checked against the
real pycuda source), batches below the profile's minimum padded, the engine check naming the GPU model, a new
profile on the device checked and recorded, and use_tf32 only where ONNX Runtime knows it."""

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeinspect.runtime.inference import backends, cuda_device
from edgeinspect.runtime.inference.backends import (BackendUnavailable, OrtCudaBackend, OrtTensorRTBackend,
                                                    TensorRTBackend, batches_within_profile)
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.inference.cuda_device import PyCudaDevice

PYCUDA = json.loads((Path(__file__).parent / "data" / "pycuda_api.json").read_text())["names"]


def test_the_tensorrt_providers_cache_folder_exists_before_it_starts(patchcore_bundle, tmp_path, monkeypatch):
    """ONNX Runtime's TensorRT provider creates only the last folder of its cache path and fails without the
    rest: on a fresh machine ~/.cache/edge-inspect/ort-tensorrt/ did not exist."""
    monkeypatch.setenv("EDGE_INSPECT_CACHE", str(tmp_path / "fresh-machine" / "cache"))
    options = OrtTensorRTBackend.provider_options(None, load_bundle(patchcore_bundle))
    assert Path(options["trt_engine_cache_path"]).is_dir()
    assert Path(options["trt_engine_cache_path"]).parent == tmp_path / "fresh-machine" / "cache" / "ort-tensorrt"


def test_tensorrts_pip_libraries_are_loaded_before_the_provider_is_probed(tmp_path):
    """A stand-in of pip's tensorrt_libs (a package folder holding libnvinfer.so.10) and of the provider library,
    linked against it without a RUNPATH as ONNX Runtime's is: the probe finds the library missing until
    load_package_libraries has loaded it from the package."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    package = tmp_path / "site" / "tensorrt_libs"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (tmp_path / "nvinfer.c").write_text("int nvinfer_version(void) { return 10; }\n")
    (tmp_path / "provider.c").write_text("int nvinfer_version(void);\nint provider(void) { return nvinfer_version(); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", package / "libnvinfer.so.10", tmp_path / "nvinfer.c",
                    "-Wl,-soname,libnvinfer.so.10"], check=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", tmp_path / "libprovider.so", tmp_path / "provider.c",
                    package / "libnvinfer.so.10"], check=True)
    probe = ("import sys; sys.path.insert(0, sys.argv[2])\n"
             "from edgeinspect.runtime.inference.backends import load_package_libraries, missing_shared_library\n"
             "print(missing_shared_library(sys.argv[1]))\n"
             "load_package_libraries('tensorrt_libs', ('libnvinfer.so.10', 'libnvonnxparser.so.10'))\n"
             "print(missing_shared_library(sys.argv[1]))\n")
    lines = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "libprovider.so"), str(tmp_path / "site")],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert "libnvinfer.so.10: cannot open shared object file" in lines[0] and lines[1] == "None"


class FakeError(Exception):
    pass


def recording_pycuda(fail_on: str | None = None):
    """A stand-in of pycuda.driver with pycuda's names (tests/data/pycuda_api.json) that records the context
    stack, as the real one keeps it; `fail_on` names a call that raises driver.Error."""
    stack, calls = [], []

    def call(name, result=None):
        def run(*args, **kwargs):
            calls.append(name)
            if name == fail_on:
                raise FakeError(f"{name} failed")
            return result() if callable(result) else result
        return run

    class Context:
        def push(self):
            calls.append("push")
            stack.append(self)

        @staticmethod
        def pop():
            calls.append("pop")
            stack.pop()

        def detach(self):
            calls.append("detach")

    class Device:
        count = staticmethod(call("Device.count", 1))

        def __init__(self, index):
            self.index = index

        name = call("Device.name", "Orin")
        compute_capability = call("Device.compute_capability", (8, 7))
        get_attribute = call("Device.get_attribute", 16)
        retain_primary_context = call("Device.retain_primary_context", Context)

    class Stream:
        handle = 7
        synchronize = call("Stream.synchronize")

    class Allocation:
        def __int__(self):
            return 4096

        free = call("DeviceAllocation.free")

    driver = types.SimpleNamespace(
        init=call("init"), Error=FakeError, Device=Device, Context=Context, Stream=Stream,
        device_attribute=types.SimpleNamespace(MULTIPROCESSOR_COUNT=16),
        pagelocked_empty=lambda shape, dtype: (calls.append("pagelocked_empty"), np.zeros(shape, dtype))[1],
        mem_alloc=call("mem_alloc", Allocation), memcpy_htod_async=call("memcpy_htod_async"),
        memcpy_dtoh_async=call("memcpy_dtoh_async"))
    return driver, stack, calls


ADAPTER_NAMES = ("driver.init", "driver.Error", "driver.pagelocked_empty", "driver.mem_alloc",
                 "driver.memcpy_htod_async", "driver.memcpy_dtoh_async", "Device.count", "Device.name",
                 "Device.compute_capability", "Device.get_attribute", "Device.retain_primary_context", "Context.push",
                 "Context.pop", "Context.detach", "Stream.synchronize", "Stream.handle", "DeviceAllocation.free",
                 "device_attribute.MULTIPROCESSOR_COUNT")


def test_the_adapter_and_the_stand_in_use_pycudas_real_names():
    """Every pycuda name the adapter calls is in pycuda 2026.1's source and in the stand-in; Context.pop is a
    static method there, and the adapter pops as pycuda pops."""
    driver, _, _ = recording_pycuda()
    source = Path(cuda_device.__file__).read_text()
    adapter = source[source.index("class PyCudaDevice"):source.index("def device_identity")]
    for dotted in ADAPTER_NAMES:
        owner, name = dotted.split(".")
        assert name in PYCUDA[owner], dotted
        assert name in adapter, dotted
        stand_in = driver if owner == "driver" else driver.mem_alloc() if owner == "DeviceAllocation" else \
            getattr(driver, owner)
        assert hasattr(stand_in, name), dotted
    assert "Context.pop" in PYCUDA["static"] and "driver.Context.pop()" in adapter


def pycuda_device(monkeypatch, fail_on=None):
    driver, stack, calls = recording_pycuda(fail_on)
    package = types.ModuleType("pycuda")
    package.driver = driver
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    return driver, stack, calls


def test_pycuda_contexts_are_pushed_and_popped_in_pairs_on_every_path(monkeypatch):
    """After opening, after each call, after a failing call and after closing, pycuda's context stack is empty
    (pycuda aborts the process at exit otherwise); closing detaches the primary context once."""
    _, stack, calls = pycuda_device(monkeypatch)
    device = PyCudaDevice()
    assert stack == [] and calls.count("push") == calls.count("pop") == 1
    host = device.pagelocked_empty((2, 3), np.float32)
    buffer = device.device_buffer(host.nbytes)
    device.copy_to_device(buffer, host)
    device.copy_to_host(host, buffer)
    device.synchronize()
    assert stack == [] and device.multiprocessors() == 16 and device.name() == "Orin"
    device.close()
    device.close()
    assert stack == [] and calls.count("detach") == 1 and calls.count("DeviceAllocation.free") == 1
    assert calls.count("push") == calls.count("pop")

    _, stack, calls = pycuda_device(monkeypatch, fail_on="mem_alloc")
    device = PyCudaDevice()
    with pytest.raises(cuda_device.CudaUnavailable, match="mem_alloc failed"):
        device.device_buffer(64)
    assert stack == []
    _, stack, calls = pycuda_device(monkeypatch, fail_on="Device.count")
    with pytest.raises(cuda_device.CudaUnavailable):
        PyCudaDevice()
    assert stack == [] and "detach" not in calls


def test_the_tensorrt_backend_releases_cuda_when_it_cannot_open(patchcore_bundle, monkeypatch):
    """The engine check fails after CUDA was opened: the context is released on that path too."""
    _, stack, calls = pycuda_device(monkeypatch)
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    bundle = load_bundle(patchcore_bundle)
    bundle.record["engine"] = {"file": "model.engine", "tensorrt": "10.13.3", "gpu": "Orin",
                               "compute_capability": "8.7", "multiprocessors": 16, "batch_sizes": [1, 1, 8]}
    with pytest.raises(BackendUnavailable, match="rebuild it here"):
        TensorRTBackend(bundle)
    assert stack == [] and calls.count("detach") == 1


class ProfiledRun:
    """A backend whose engine profile is MIN 4, MAX 8: it records the batches it is given."""

    min_batch, max_batch = 4, 8

    def __init__(self):
        self.batches = []

    @batches_within_profile
    def __call__(self, images):
        self.batches.append(len(images))
        assert self.min_batch <= len(images) <= self.max_batch
        return images[:, :, :, 0].astype(np.float32), images.reshape(len(images), -1)[:, 0].astype(np.float32)


def test_batches_below_the_profiles_minimum_are_padded_and_larger_ones_split():
    run = ProfiledRun()
    frames = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    maps, scores = run(frames[:1])
    assert run.batches == [4] and maps.shape == (1, 2, 2) and scores.tolist() == [frames[0, 0, 0, 0]]
    maps, scores = run(frames)  # 10 frames: 8, then 2 padded to 4
    assert run.batches[1:] == [8, 4] and scores.tolist() == frames[:, 0, 0, 0].tolist()


def test_a_new_profile_on_the_device_is_checked_and_recorded(patchcore_bundle, tmp_path, monkeypatch):
    """inspect-export BUNDLE --engine --batch-sizes 2,4,16 on a device: the TensorRT check runs again for 16 and
    the bundle's batch_profile changes, so ort-tensorrt's profile follows (no engine can be built here)."""
    from edgeinspect.export.cli import app as export_app

    monkeypatch.setenv("EDGE_INSPECT_CACHE", str(tmp_path / "cache"))
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(patchcore_bundle, bundle_dir)
    result = CliRunner().invoke(export_app, [str(bundle_dir), "--engine", "--batch-sizes", "2,4,16"])
    assert result.exit_code == 0, result.output
    record = load_bundle(bundle_dir).record
    assert record["batch_profile"] == [2, 4, 16] and record["tensorrt_check"]["max_batch"] == 16
    options = OrtTensorRTBackend.provider_options(None, load_bundle(bundle_dir))
    assert options["trt_profile_min_shapes"] == "images:2x64x64x3"
    assert options["trt_profile_max_shapes"] == "images:16x64x64x3"
    again = CliRunner().invoke(export_app, [str(bundle_dir), "--engine"])  # no --batch-sizes: the bundle's own
    assert again.exit_code == 0 and load_bundle(bundle_dir).record["batch_profile"] == [2, 4, 16]


def test_use_tf32_only_where_onnx_runtime_knows_it(patchcore_bundle, monkeypatch):
    """ONNX Runtime's CUDA provider knows use_tf32 from 1.18; older ones (JetPack 6's wheels) refuse unknown
    options, and ort-cuda was passed over for it."""
    import onnxruntime

    bundle = load_bundle(patchcore_bundle)
    monkeypatch.setattr(onnxruntime, "__version__", "1.16.3")
    assert OrtCudaBackend.provider_options(None, bundle) == {"device_id": "0"}
    monkeypatch.setattr(onnxruntime, "__version__", "1.18.0")
    assert OrtCudaBackend.provider_options(None, bundle) == {"device_id": "0", "use_tf32": "0"}
    assert backends.onnxruntime_version("1.31.1+cu130") == (1, 31)
