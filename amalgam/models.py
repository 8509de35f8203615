"""Small-image variants of timm models, registered with timm so configs name them like any other model.

``amalgam_<name>_nopool`` is timm's ``<name>`` without the stem max-pool: at 28-32 px a ResNet's last stage
is then 2x2 instead of 1x1, which keeps spatial features for map taps and costs about 4x the compute.
``amalgam_resnet14_nopool`` is a shallower one (basic blocks 1, 1, 2, 2) that spends that resolution where it
is cheap: the Fashion-MNIST demo's student (at channels 16-128 a training step costs no more than a slim
ResNet-18's with the max-pool, and it is more accurate there; benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models import register_model
from torch import nn


def _without_maxpool(base: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    model = timm.create_model(base, pretrained=pretrained, **kwargs)
    model.maxpool = nn.Identity()
    return model


@register_model
def amalgam_resnet10t_nopool(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _without_maxpool("resnet10t", pretrained, **kwargs)


@register_model
def amalgam_resnet18_nopool(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _without_maxpool("resnet18", pretrained, **kwargs)


@register_model
def amalgam_resnet14_nopool(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    if pretrained:
        raise ValueError("amalgam_resnet14_nopool has no pretrained weights; load a checkpoint instead")
    return _without_maxpool("resnet18", **{"layers": [1, 1, 2, 2], **kwargs})
