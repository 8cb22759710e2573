import onnx
import torch
from timm.layers import Conv2dSame

from edgeinspect.export.static_padding import StaticPadConv2d, with_static_padding
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.train.backbones import create_feature_extractor


def test_static_padding_gives_the_same_features_without_dynamic_padding():
    extractor, _ = create_feature_extractor("tf_efficientnet_lite0", (8, 16), pretrained=False)
    x = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(0))
    fixed = with_static_padding(extractor, x)
    assert not any(isinstance(m, Conv2dSame) for m in fixed.modules())
    assert sum(isinstance(m, StaticPadConv2d) for m in fixed.modules()) == 4
    assert any(isinstance(m, Conv2dSame) for m in extractor.modules())  # the trained model is left alone
    with torch.no_grad():
        for expected, got in zip(extractor(x), fixed(x)):
            assert torch.equal(expected, got)


def test_exported_pads_are_constants_onnx_runtime_can_fuse(patchcore_bundle):
    graph = onnx.load(str(load_bundle(patchcore_bundle).path / "model.onnx")).graph
    producer = {output: node for node in graph.node for output in node.output}

    def ancestors(name: str) -> set[str]:
        node = producer.get(name)
        return set() if node is None else {node.op_type}.union(*(ancestors(i) for i in node.input))

    pads = [node for node in graph.node if node.op_type == "Pad"]
    assert len(pads) == 4
    for pad in pads:
        assert "" not in pad.input and "Shape" not in ancestors(pad.input[1])
