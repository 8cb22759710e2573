"""Graph pieces every model kind shares: what the bundle's input and output contract needs inside the graph."""


import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Normalization


class ImageInput(nn.Module):
    """uint8 RGB images (B, H, W, 3), as the runtime hands them over, → normalised float (B, 3, H, W)."""

    def __init__(self, normalization: Normalization):
        super().__init__()
        self.normalization = normalization
        mean = torch.tensor(normalization.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(normalization.std).view(1, 3, 1, 1) * 255
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("inv_std", 1 / std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.permute(0, 3, 1, 2).float() - self.mean) * self.inv_std


class GaussianSmoothing(nn.Module):
    """Separable Gaussian blur with reflected borders (σ=4 for PatchCore, as in the paper's reference code)."""

    def __init__(self, sigma: float):
        super().__init__()
        radius = int(4 * sigma + 0.5)
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = kernel / kernel.sum()
        self.radius = radius
        self.register_buffer("kernel_h", kernel.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("kernel_v", kernel.view(1, 1, -1, 1), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        r = self.radius
        maps = F.conv2d(F.pad(maps, (r, r, 0, 0), mode="reflect"), self.kernel_h)
        return F.conv2d(F.pad(maps, (0, 0, r, r), mode="reflect"), self.kernel_v)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
