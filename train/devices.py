"""Where inspect-train computes (`--device`): training runs on the GPU when there is one, and the trained model
comes back to the CPU, where export and the run folder expect it."""

import time

import torch

from edgeinspect.runtime.console import InspectError

DEVICE_CHOICES = ("auto", "cpu", "cuda")
CPU = torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """auto: the CUDA GPU when PyTorch sees one, else the CPU; cuda without one is refused, not silently
    replaced by the CPU (a 45-minute run should not start on the wrong device)."""
    if name not in DEVICE_CHOICES:
        raise InspectError(f"--device {name!r} is not one of {', '.join(DEVICE_CHOICES)}")
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise InspectError("--device cuda: PyTorch sees no CUDA GPU (torch.cuda.is_available() is False)")
    if name == "cpu" or not cuda:
        return CPU
    return torch.device("cuda", torch.cuda.current_device())


def describe_device(device: torch.device) -> str:
    """'cpu' or 'cuda:0 (NVIDIA H100 80GB HBM3)', as run.json records it."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def elapsed_s(clock: float, device: torch.device) -> float:
    """Seconds since `clock` (time.perf_counter), once the work queued on `device` is done: CUDA runs
    asynchronously, so without waiting a step's time would be counted in the next one's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - clock


def out_of_memory(error: BaseException) -> bool:
    """Whether an error is the host or the GPU running out of memory (PyTorch's CPU allocator raises a plain
    RuntimeError for it)."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))
