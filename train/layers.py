"""Graph pieces every model kind shares: what the bundle's input and output contract needs inside the graph."""


import functools

import numpy as np
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
        # cast before the transpose: TensorRT takes UINT8 only as a network input or output
        return (images.float().permute(0, 3, 1, 2) - self.mean) * self.inv_std


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps out to 4σ (the paper's reference code's truncation)."""
    radius = int(4 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return kernel / kernel.sum()


@functools.lru_cache(maxsize=16)
def map_to_image_operator(size_in: int, size_out: int, sigma: float) -> np.ndarray:
    """(size_out, size_in) matrix of one axis: bilinear upsampling (half-pixel centres, as F.interpolate with
    align_corners=False), then, when σ > 0, the Gaussian blur with reflected borders."""
    source = np.maximum((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    operator = np.zeros((size_out, size_in))
    np.add.at(operator, (np.arange(size_out), low), 1 - (source - low))
    np.add.at(operator, (np.arange(size_out), high), source - low)
    if sigma > 0:
        kernel = gaussian_kernel(sigma)
        padded = np.pad(operator, ((len(kernel) // 2, len(kernel) // 2), (0, 0)), mode="reflect")
        operator = sum(tap * padded[k:k + size_out] for k, tap in enumerate(kernel))
    return operator.astype(np.float32)


class MapToImage(nn.Module):
    """A low-resolution anomaly map (B, 1, h, w) → the input size (B, 1, H, W): bilinear upsampling, then a
    Gaussian blur with reflected borders (σ=4 for PatchCore, as in the paper's reference code; σ=0: none).

    Both steps are linear and separable, so they run as two small matrix products, rows · map · colsᵀ,
    instead of a resize and two 33-tap convolutions over the full-size map."""

    def __init__(self, sigma: float = 0.0):
        super().__init__()
        self.sigma = sigma

    def forward(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        (h, w), (height, width) = maps.shape[-2:], size
        rows = torch.from_numpy(map_to_image_operator(int(h), int(height), self.sigma))
        cols_t = torch.from_numpy(map_to_image_operator(int(w), int(width), self.sigma).T)
        return rows @ maps @ cols_t


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
