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
