"""The GPU side as far as a machine without a GPU can prove it: the CUDA and TensorRT names the code calls
exist in NVIDIA's real Python packages (names only: nothing here runs on a GPU), a real CUDA start failure
passes the backend over, ONNX Runtime's GPU providers are configured as claimed, a missing provider library
is named, and inspect-export builds (or declines to build) an engine on a bundle without torch."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeinspect.runtime.inference import backends, cuda_device
from edgeinspect.runtime.inference.backends import (BACKENDS, OrtCudaBackend, OrtTensorRTBackend,
                                          open_backend)
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.inference.cuda_device import CudaBindingsDevice, CudaUnavailable, open_cuda

from test_layering import BLOCK_TORCH

ROOT = Path(__file__).resolve().parents[1]
API = json.loads((ROOT / "export" / "tensorrt_api.json").read_text())


def _gpu_present() -> bool:
    try:
        open_cuda().close()
    except CudaUnavailable:
        return False
    return True


def test_cuda_bindings_has_every_runtime_call_the_adapter_makes():
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-bindings not installed (dev extra)")
    source = Path(cuda_device.__file__).read_text()
    calls = set(re.findall(r'_call\("(\w+)"', source)) | set(re.findall(r"self\.rt\.(\w+)", source))
    assert {"cudaMallocHost", "cudaMalloc", "cudaMemcpyAsync", "cudaStreamSynchronize"} <= calls
    assert [name for name in sorted(calls) if not hasattr(runtime, name)] == []
    properties = runtime.cudaDeviceProp()
    assert all(hasattr(properties, name) for name in ("name", "major", "minor", "multiProcessorCount"))
    assert hasattr(runtime.cudaMemcpyKind, "cudaMemcpyHostToDevice")
    assert hasattr(runtime.cudaMemcpyKind, "cudaMemcpyDeviceToHost")


def test_pycuda_has_every_name_the_adapter_uses():
    driver = pytest.importorskip("pycuda.driver", reason="pycuda not importable (it builds against the CUDA toolkit "
                                 "and needs the driver's libcuda.so.1)")
    for path in ("init", "Error", "Device.count", "Device.name", "Device.compute_capability",
                 "Device.retain_primary_context", "Context.push", "Context.pop", "Context.detach", "Stream.handle",
                 "Stream.synchronize", "pagelocked_empty", "mem_alloc", "DeviceAllocation.free",
                 "memcpy_htod_async", "memcpy_dtoh_async"):
        assert _has_path(driver, path), path


@pytest.mark.skipif(_gpu_present(), reason="a GPU is present: the start does not fail")
def test_a_real_cuda_start_failure_is_a_clear_reason():
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-bindings not installed (dev extra)")
    with pytest.raises(CudaUnavailable, match=r"CUDA cudaGetDeviceCount failed: cuda\w+ \(cuda-bindings\)"):
        CudaBindingsDevice()
    with pytest.raises(CudaUnavailable, match="pycuda is not installed; CUDA cudaGetDeviceCount failed"):
        open_cuda()


def _names_used(source: str, receivers: dict[str, str]) -> set[str]:
    """`trt.X.Y`, `builder.m(`… in the source → the API names they are ("BuilderFlag.TF32", "Builder.m")."""
    names = set()
    for receiver, api_class in receivers.items():
        for match in re.findall(rf"\b{receiver}\.(\w+(?:\.[A-Z_0-9]+)?)", source):
            names.add(match if api_class is None else f"{api_class}.{match}")
    return names


def test_every_tensorrt_builder_name_exists_in_the_documented_10_and_11_bindings():
    source = (ROOT / "export" / "tensorrt_engine.py").read_text()
    used = _names_used(source, {"trt": None, "builder": "Builder", "config": "IBuilderConfig", "parser": "OnnxParser",
                                "network": "INetworkDefinition", "profile": "IOptimizationProfile"})
    assert {"BuilderFlag.TF32", "NetworkDefinitionCreationFlag.STRONGLY_TYPED", "Builder.build_serialized_network"} <= used
    known = API["builder"]
    assert sorted(used - set(known)) == []  # every name the builder code uses is in the checked list
    assert sorted(name for name in used if not (known[name]["10.16"] and known[name]["11.4"])) == []
    for removed in ("BuilderFlag.FP16", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "ILayer.precision",
                    "ILayer.set_output_type"):
        assert removed not in used and not known[removed]["11.4"]


def test_every_tensorrt_runtime_name_exists_in_the_lean_runtime():
    lean = pytest.importorskip("tensorrt_lean", reason="tensorrt-lean-cu13 not installed (dev extra)")
    source = Path(backends.__file__).read_text()
    source = source[source.index("class TensorRTBackend"):source.index("def check_engine_matches_device")]
    used = _names_used(source, {"trt": None})
    assert {"Runtime", "Logger", "nptype", "TensorIOMode.INPUT"} <= used
    missing = [name for name in sorted(used) if not _has_path(lean, name)]
    assert missing == []
    for name in ("ICudaEngine.num_io_tensors", "ICudaEngine.get_tensor_name", "ICudaEngine.get_tensor_shape",
                 "ICudaEngine.get_tensor_dtype", "ICudaEngine.get_tensor_mode", "ICudaEngine.create_execution_context",
                 "IExecutionContext.set_tensor_address", "IExecutionContext.set_input_shape",
                 "IExecutionContext.execute_async_v3", "Runtime.deserialize_cuda_engine"):
        assert _has_path(lean, name), name


def _has_path(module, dotted: str) -> bool:
    target = module
    for part in dotted.split("."):
        if not hasattr(target, part):
            return False
        target = getattr(target, part)
    return True


class _FailsLikeAGpuLibrary:
    """Stand-in for a GPU backend whose library raises its own error type while starting (as a CUDA driver
    error from inside a GPU library does): only open_backend's handling is under test."""

    name = "gpu-stand-in"

    def __init__(self, bundle, threads=None, precision="fp32"):
        raise RuntimeError("CUDA driver error 999")


def test_auto_passes_over_a_backend_that_fails_to_start_for_any_reason(patchcore_bundle, monkeypatch):
    monkeypatch.setitem(BACKENDS, "gpu-stand-in", _FailsLikeAGpuLibrary)
    order = {"gpu-stand-in": _FailsLikeAGpuLibrary, **{k: v for k, v in BACKENDS.items() if k != "gpu-stand-in"}}
    monkeypatch.setattr(backends, "BACKENDS", order)
    backend = open_backend(load_bundle(patchcore_bundle))
    assert backend.name in ("openvino", "ort-cpu")
    assert backend.passed_over["gpu-stand-in"] == "could not start: RuntimeError: CUDA driver error 999"
    with pytest.raises(backends.InspectError, match="--backend gpu-stand-in: could not start: RuntimeError"):
        open_backend(load_bundle(patchcore_bundle), "gpu-stand-in")


@pytest.mark.skipif(_gpu_present(), reason="a GPU is present: the engine check would go further")
def test_a_bundle_with_an_engine_passes_the_engine_over_with_the_real_reason(patchcore_bundle, tmp_path):
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(patchcore_bundle, bundle_dir)
    record = json.loads((bundle_dir / "bundle.json").read_text())
    record["engine"] = {"file": "model.engine", "tensorrt": "10.13.3", "gpu": "NVIDIA Jetson Orin",
                        "compute_capability": "8.7", "batch_sizes": [1, 1, 8]}
    (bundle_dir / "bundle.json").write_text(json.dumps(record))
    backend = open_backend(load_bundle(bundle_dir))
    reason = backend.passed_over["tensorrt"]
    assert "tensorrt is not importable" in reason or "CUDA" in reason


def test_gpu_providers_are_configured_for_parity_and_the_bundle_profile(patchcore_bundle):
    bundle = load_bundle(patchcore_bundle)
    assert OrtCudaBackend.provider_options(None, bundle) == {"device_id": "0", "use_tf32": "0"}
    options = OrtTensorRTBackend.provider_options(None, bundle)
    assert options["trt_profile_min_shapes"] == "images:1x64x64x3"
    assert options["trt_profile_opt_shapes"] == "images:1x64x64x3"
    assert options["trt_profile_max_shapes"] == "images:8x64x64x3"
    assert options["trt_engine_cache_enable"] == "True"
    assert not Path(options["trt_engine_cache_path"]).is_relative_to(patchcore_bundle)


def test_gpu_providers_are_passed_over_on_this_cpu_only_onnxruntime(patchcore_bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    backend = open_backend(load_bundle(patchcore_bundle))
    assert "has no CUDAExecutionProvider" in backend.passed_over["ort-cuda"]
    assert "has no TensorrtExecutionProvider" in backend.passed_over["ort-tensorrt"]


def test_a_missing_provider_library_is_named(tmp_path):
    """A real shared library linked against another one beside it: it loads while that one is there, and
    once it is gone the probe names the missing file (as it would libnvinfer.so.10 for ONNX Runtime)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    (tmp_path / "ghost.c").write_text("int ghost(void) { return 1; }\n")
    (tmp_path / "provider.c").write_text("int ghost(void);\nint provider(void) { return ghost(); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", tmp_path / "libghost.so.10", tmp_path / "ghost.c",
                    "-Wl,-soname,libghost.so.10"], check=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", tmp_path / "libprovider.so", tmp_path / "provider.c",
                    tmp_path / "libghost.so.10", "-Wl,-rpath,$ORIGIN"], check=True)
    probe = "import sys; from edgeinspect.runtime.inference.backends import missing_shared_library as m; print(m(sys.argv[1]))"
    run = [sys.executable, "-c", probe, str(tmp_path / "libprovider.so")]  # a fresh process: nothing loaded yet
    assert subprocess.run(run, capture_output=True, text=True, check=True).stdout.strip() == "None"
    (tmp_path / "libghost.so.10").unlink()
    output = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert "libghost.so.10: cannot open shared object file" in output


def test_engine_build_on_a_bundle_needs_no_torch(kind_bundle, tmp_path):
    """inspect-export BUNDLE --engine --fp16 as on a Jetson without torch: it says why no engine was built here
    (or builds one where TensorRT and a GPU exist), and never imports torch, timm or the training code."""
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(kind_bundle, bundle_dir)
    code = BLOCK_TORCH + (
        "import sys\nfrom edgeinspect.export.cli import main\nsys.argv = ['inspect-export', sys.argv[1], '--engine', "
        "'--fp16']\ntry:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm') or m.startswith('edgeinspect.train')]\n")
    result = subprocess.run([sys.executable, "-c", code, str(bundle_dir)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    record = load_bundle(bundle_dir).record
    if record["engine"] is None:
        assert "no TensorRT engine built" in result.stderr
    else:
        assert record["engine"]["onnx"]["file"] == "model_fp16.onnx"
