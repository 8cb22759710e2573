"""TensorFlow-style 'same' padding fixed for the bundle's one input size before export.

timm's tf_* backbones pad each strided convolution by an amount computed from the input's height and width
at run time; traced to ONNX that is shape arithmetic and a Pad whose size is only known per frame, which
ONNX Runtime can neither fold nor fuse into the Conv. A bundle has one input size, so the padding is a
constant: the Pad then fuses into the Conv (4 Pads, 5 layout reorders and ~100 scalar nodes fewer for Lite0).
"""

import copy

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same_arg
from torch import nn


class StaticPadConv2d(nn.Conv2d):
    """A 'same'-padded convolution for one input size: a constant zero Pad, then the plain convolution."""

    def __init__(self, conv: nn.Conv2d, pad: list[int]):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                         conv.groups, conv.bias is not None)
        self.load_state_dict(conv.state_dict())
        self.pad = tuple(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


def with_static_padding(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of `model` whose dynamically padded convolutions have the padding `example`'s size gives them."""
    model = copy.deepcopy(model)
    sizes = {}

    def record_size(name):
        def hook(_, args):
            sizes[name] = args[0].shape[-2:]
        return hook

    hooks = [module.register_forward_pre_hook(record_size(name))
             for name, module in model.named_modules() if isinstance(module, Conv2dSame)]
    with torch.no_grad():
        model(example)
    for hook in hooks:
        hook.remove()
    for name, size in sizes.items():
        conv = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                StaticPadConv2d(conv, pad_same_arg(list(size), conv.kernel_size, conv.stride, conv.dilation)))
    return model
