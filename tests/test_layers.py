import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from edgeinspect.runtime.inference.images import resize

from edgeinspect.train.layers import MapToImage, gaussian_kernel


def resize_then_blur(maps: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """The two steps done the obvious way: a bilinear resize, then a separable blur with reflected borders."""
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    if sigma == 0:
        return maps
    kernel = torch.from_numpy(gaussian_kernel(sigma)).float()
    r = len(kernel) // 2
    maps = F.conv2d(F.pad(maps, (r, r, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(maps, (0, 0, r, r), mode="reflect"), kernel.view(1, 1, -1, 1))


@pytest.mark.parametrize("grid, size, sigma", [((32, 32), (256, 256), 4.0), ((8, 12), (64, 96), 4.0),
                                               ((16, 16), (64, 64), 0.0), ((7, 9), (50, 70), 2.5)])
def test_map_to_image_is_bilinear_upsampling_then_gaussian_blur(grid, size, sigma):
    maps = torch.rand(2, 1, *grid, generator=torch.Generator().manual_seed(0))
    expected = resize_then_blur(maps, size, sigma)
    assert torch.allclose(MapToImage(sigma)(maps, size), expected, atol=1e-5)


@pytest.mark.parametrize("shape, size", [((512, 512), (256, 256)), ((96, 64), (32, 32)), ((300, 200), (100, 100)),
                                         ((64, 90), (64, 30)), ((1024, 768), (256, 256))])
def test_whole_factor_resize_is_pillows_antialiased_bilinear_within_one_grey_level(shape, size):
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (*shape, 3), dtype=np.uint8), (0, 0), 1)
    image[:3], image[:, -2:] = 255, 0  # hard edges at the borders, where Pillow cuts its triangle
    pillow = np.array(Image.fromarray(image).resize(size[::-1], Image.Resampling.BILINEAR)).astype(int)
    fast = resize(image, size)
    assert fast.shape == (*size, 3) and fast.dtype == np.uint8
    assert np.abs(fast - pillow).max() <= 1 and (fast == pillow).mean() > 0.8
