"""Tests generated from the registry: every registered method runs on every adapter family.

Adding a method (built in or installed) adds it here without writing a test.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchsuite import registry
from benchsuite.api import CalibrationSet
from benchsuite.bits import BitSpec
from benchsuite.quant.adapters import adapt
from toy_plugins import toy_vit

METHODS = [name for name, reason in registry.methods.availability().items() if reason is None]


def tiny_swin():
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2),
                           window_size=4, num_classes=10).eval()


def tiny_point_mae():
    from benchsuite.pointcloud import PointMAEClassifier

    torch.manual_seed(0)
    return PointMAEClassifier(10, dim=32, depth=2, num_heads=2, num_groups=16, group_size=8, head_hidden=32).eval()


def quick(config):
    """Reconstruction methods with a few steps: this test checks wiring, not accuracy."""
    fields = {f.name for f in dataclasses.fields(config)}
    changes = {name: value for name, value in (("budget", "fast"), ("iters", 3)) if name in fields}
    return dataclasses.replace(config, **changes)


#: family -> (factory of a small float model, shape of one input without the batch dim)
FAMILIES = {
    "timm_vit": (toy_vit, (3, 16, 16)),
    "timm_swin": (tiny_swin, (3, 32, 32)),
    "point_mae": (tiny_point_mae, (256, 3)),  # random points, xyz
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method_name", METHODS)
def test_method_quantizes_every_family(method_name, family):
    factory, shape = FAMILIES[family]
    float_model = factory()
    images = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = float_model(images)
    method = registry.methods.get(method_name)()
    config = quick(method.default_config())
    model = adapt(factory())
    calibration = CalibrationSet.from_tensor(images, [str(i) for i in range(8)], "random", 0)
    bits = BitSpec(4, 4) if method.quantizes else BitSpec(None, None)
    quantized = method.quantize(model, calibration, bits, config)
    with torch.no_grad():
        output = quantized(images)
    assert output.shape == reference.shape
    assert torch.isfinite(output).all()
    if method.quantizes:
        assert not torch.allclose(output, reference), "a quantizing method left the model unchanged"
    else:
        torch.testing.assert_close(output, reference)
    assert config == type(config).from_dict(config.to_dict())
