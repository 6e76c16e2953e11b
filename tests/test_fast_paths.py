"""The no-autograd fast paths give the same numbers as the straight-through paths."""

from __future__ import annotations

import torch

from benchsuite.quant.canonical import Role
from benchsuite.quant.modules import QuantLinear
from benchsuite.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer


def test_uniform_fast_path_matches_the_ste_path():
    x = torch.randn(4, 7, 16) * 3
    quantizer = UniformQuantizer(4, granularity="channel", channel_dim=-1)
    quantizer.observe(x)
    quantizer.finalize()
    quantizer.set_params(quantizer.scale, quantizer.zero_point + 0.3)  # an unrounded zero point too
    with torch.no_grad():
        fast = quantizer(x)
    slow = quantizer(x.clone().requires_grad_(True)).detach()
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6)


def test_log_sqrt2_fast_path_matches_the_ste_path():
    attention = torch.softmax(torch.randn(2, 3, 9, 9) * 4, dim=-1)
    attention[0, 0, 0, 0] = 0.0
    quantizer = LogSqrt2Quantizer(3)
    quantizer.observe(attention)
    quantizer.finalize()
    with torch.no_grad():
        fast = quantizer(attention)
    slow = quantizer(attention.clone().requires_grad_(True)).detach()
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=0)


def test_cached_weight_follows_in_place_edits_and_new_parameters():
    linear = QuantLinear.from_float(torch.nn.Linear(8, 4), Role.FC1)
    quantizer = UniformQuantizer(4, granularity="channel", channel_dim=0)
    quantizer.observe(linear.weight.detach())
    quantizer.finalize()
    linear.set_weight_quantizer(quantizer)
    x = torch.randn(3, 8)
    with torch.no_grad():
        first = linear(x)
        assert torch.equal(first, linear(x))
        linear.weight.mul_(2)  # an in-place edit (reparameterization does this) must show
        quantizer.reset()
        quantizer.observe(linear.weight)
        quantizer.finalize()
        second = linear(x)
    expected = torch.nn.functional.linear(x, quantizer(linear.weight.detach()), linear.bias.detach())
    torch.testing.assert_close(second, expected)
    assert not torch.allclose(first, second)


def test_prefiltered_tails_give_torch_quantile_exactly():
    from benchsuite.quant.init_search import quantiles

    generator = torch.Generator().manual_seed(0)
    probs = [0.999, 0.9999, 0.99999, 0.001, 0.0001, 0.00001]
    heavy_tailed = torch.randn(1, 1 << 21, generator=generator) ** 3
    many_ties = torch.randint(-3, 4, (1, 1 << 21), generator=generator).float()  # threshold ties
    for rows in (heavy_tailed, many_ties):
        expected = torch.quantile(rows[0], torch.tensor(probs))
        assert torch.equal(quantiles(rows, probs)[:, 0], expected)
