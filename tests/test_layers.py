import pytest
import torch
import torch.nn.functional as F

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
