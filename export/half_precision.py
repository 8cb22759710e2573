"""PyTorch stand-in for an fp16 engine on a machine without a GPU: the fp16-tolerant modules of a trained
model compute in half precision, the rest in fp32 (benchmarks/fp16_accuracy.py)."""

import copy

import torch


class HalfPrecision(torch.nn.Module):
    """Stand-in for an fp16 engine on the CPU: runs a module in fp16 (weights and activations) and hands fp32
    back to the fp32 parts of the model."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner.half()

    def forward(self, x: torch.Tensor):
        out = self.inner(x.half())
        return [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()


def with_half_precision(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a trained model whose fp16-tolerant modules compute in fp16, as the engine would."""
    model = copy.deepcopy(model)
    for name in model.half_precision_modules:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, HalfPrecision(getattr(parent, child)))
    return model.eval()
