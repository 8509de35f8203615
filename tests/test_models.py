"""Small-image timm variants: built by name like any timm model, without the stem max-pool."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import amalgam.models  # noqa: F401  (registers the variants with timm)


@pytest.mark.parametrize(("name", "blocks"), [("amalgam_resnet14_nopool", [1, 1, 2, 2]),
                                               ("amalgam_resnet18_nopool", [2, 2, 2, 2]),
                                               ("amalgam_resnet10t_nopool", [1, 1, 1, 1])])
def test_nopool_variants_keep_the_stem_resolution(name, blocks):
    model = timm.create_model(name, num_classes=7, channels=[8, 8, 16, 16])
    assert isinstance(model.maxpool, nn.Identity)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == blocks
    # 28 px -> 14 px stem -> 14, 7, 4, 2: the last stage keeps a 2x2 map (1x1 with the max-pool).
    maps = model.forward_intermediates(torch.rand(2, 3, 28, 28), intermediates_only=True)
    assert [m.shape[-1] for m in maps[-4:]] == [14, 7, 4, 2]
    assert model(torch.rand(2, 3, 28, 28)).shape == (2, 7)


def test_resnet14_nopool_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("amalgam_resnet14_nopool", pretrained=True)


@pytest.mark.parametrize("family", ["resnet", "vit", "convnext", "swin", "distilled"])
def test_tapped_logits_are_the_models_own_forward(family):
    """Taps read at a stage and the pooled vector, logits from the model's own head: in eval mode the same
    numbers as the plain timm model, also for heads that are not a single layer (a distilled ViT has two)."""
    from conftest import SIZE, TINY

    from amalgam.backbones import TappedNetwork

    spec = TINY[family] if family != "distilled" else {
        "arch": "deit_tiny_distilled_patch16_224",
        "model_kwargs": {"img_size": SIZE, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2}}
    torch.manual_seed(0)
    net = TappedNetwork(spec["arch"], 3, ["pooled", -1], SIZE, model_kwargs=spec["model_kwargs"]).eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = net(images)
        expected = net.model(net.preprocess(images))
    torch.testing.assert_close(out.logits, expected)
    assert out.taps[0].shape == (2, net.model.num_features) and out.taps[1].ndim == 4
