"""The reconstruction engine: units, caches, optimisation, losses, samplers, determinism."""

from __future__ import annotations

import pytest
import torch

from benchsuite.api import CalibrationSet
from benchsuite.bits import BitSpec
from benchsuite.quant.adapters import adapt
from benchsuite.quant.reconstruct import (
    AttentionKL,
    ChunkedTensor,
    CurriculumSampler,
    ParamGroup,
    RoundingRegularizer,
    UnitContext,
    UnitData,
    UnitPlan,
    UnitSettings,
    build_units,
    capture_inputs,
    compute_outputs,
    float_copy,
    output_mse,
    reconstruct,
    unit_parameters,
)
from benchsuite.methods.minmax import MinMax
from toy_plugins import toy_vit


def tiny_swin():
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2),
                           window_size=4, num_classes=10).eval()


def images(count: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def quantized_pair(factory=toy_vit, size: int = 16, bits: int = 3, count: int = 16):
    """(quantized canonical model, float copy, calibration images) with min-max quantizers."""
    model = adapt(factory())
    reference = float_copy(model)
    x = images(count, size)
    calibration = CalibrationSet.from_tensor(x, [str(i) for i in range(count)], "random", 0)
    MinMax().quantize(model, calibration, BitSpec(bits, bits), MinMax().default_config())
    return model, reference, x


def weights_plan(iters: int = 30, seed: int = 0, input_mode: str = "quant", lr: float = 1e-3, **kw) -> callable:
    def plan_for(unit):
        return UnitPlan(
            settings=UnitSettings(iters=iters, batch_size=8, input=input_mode, seed=seed, **kw),
            param_groups=lambda ctx: [ParamGroup("weights", unit_parameters(ctx.unit), lr, "cosine")],
        )

    return plan_for


# -- units -------------------------------------------------------------------------------------


def test_units_follow_execution_order_for_vit():
    model = adapt(toy_vit())
    assert [u.name for u in build_units(model, "block")] == ["patch_embed.proj", "block0", "block1", "head"]
    assert [u.kind for u in build_units(model, "module")] == [
        "layer", "attention", "mlp", "attention", "mlp", "layer"
    ]


def test_units_for_swin_put_reduction_before_its_stage():
    names = [u.name for u in build_units(adapt(tiny_swin()), "module")]
    assert names == [
        "patch_embed.proj", "block0.attn", "block0.mlp", "block1.attn", "block1.mlp",
        "layers.1.downsample.reduction", "block2.attn", "block2.mlp", "block3.attn", "block3.mlp", "head.fc",
    ]


@pytest.mark.parametrize("factory,size", [(toy_vit, 16), (tiny_swin, 32)])
def test_module_units_recompose_each_block(factory, size):
    """block(x) == x + attn_unit(...) + mlp_unit(...) when computed from the captured inputs:
    the captured attention input and its callable reproduce the real branch (Swin: shifted windows)."""
    model = adapt(factory())
    x = ChunkedTensor.from_tensor(images(4, size), 2)
    blocks = [u for u in build_units(model, "block") if u.kind == "block"]
    modules = [u for u in build_units(model, "module") if u.kind in ("attention", "mlp")]
    for index, block in enumerate(blocks):
        attn, mlp = modules[2 * index], modules[2 * index + 1]
        block_in = capture_inputs(model, block, x, device="cpu").full()
        block_out = compute_outputs(block, ChunkedTensor([block_in]), device="cpu").full()
        attn_out = compute_outputs(attn, capture_inputs(model, attn, x, device="cpu"), device="cpu").full()
        mlp_out = compute_outputs(mlp, capture_inputs(model, mlp, x, device="cpu"), device="cpu").full()
        mid = block_in + attn_out.reshape(block_in.shape)
        torch.testing.assert_close(block_out, mid + mlp_out.reshape(block_in.shape), rtol=1e-5, atol=1e-5)


def test_capture_stops_early_and_matches_a_full_forward():
    model = adapt(toy_vit())
    units = build_units(model, "block")
    x = images(6)
    seen = []
    handle = units[2].owner.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    captured = capture_inputs(model, units[2], ChunkedTensor.from_tensor(x, 4), device="cpu")
    assert [len(c) for c in captured] == [4, 2]
    torch.testing.assert_close(captured.full(), seen[0])


def test_chunked_tensor_gathers_any_rows():
    full = torch.arange(40.0).reshape(10, 4)
    chunked = ChunkedTensor.from_tensor(full, 3)
    rows = torch.tensor([9, 0, 4, 4, 7, 3])
    torch.testing.assert_close(chunked.gather(rows), full[rows])
    assert chunked.shape == (10, 4)
    with pytest.raises(IndexError):
        chunked.gather(torch.tensor([10]))


# -- optimisation ------------------------------------------------------------------------------


def test_unit_loss_falls_when_weights_are_tuned():
    model, reference, x = quantized_pair()
    reports = reconstruct(model, reference, x, weights_plan(iters=40), chunk_size=8)
    blocks = [r for r in reports if r.kind == "block"]
    assert blocks and all(r.last_loss < r.first_loss for r in blocks), [r.to_dict() for r in reports]


def test_reconstruction_brings_the_output_closer_to_float():
    model, reference, x = quantized_pair()
    with torch.no_grad():
        target = reference(x)
        before = output_mse(model(x), target)
    reconstruct(model, reference, x, weights_plan(iters=40), chunk_size=8)
    with torch.no_grad():
        after = output_mse(model(x), target)
    assert after < before


def test_same_seed_same_result_other_seed_other_result():
    def run(seed):
        model, reference, x = quantized_pair()
        reconstruct(model, reference, x, weights_plan(iters=5, seed=seed, input_mode="qdrop"), chunk_size=8)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.testing.assert_close(run(0), run(0), rtol=0, atol=0)
    assert not torch.equal(run(0), run(1))


def test_chunking_the_cache_gives_the_same_result_as_one_chunk():
    def run(chunk):
        model, reference, x = quantized_pair()
        reconstruct(model, reference, x, weights_plan(iters=5), chunk_size=chunk)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.testing.assert_close(run(16), run(3), rtol=1e-5, atol=1e-6)


def test_cached_quant_inputs_equal_inputs_recomputed_after_earlier_units_changed():
    """The cache for unit k is taken after units < k were tuned: it equals a fresh forward then."""
    model, reference, x = quantized_pair()
    captured = {}

    def plan_for(unit):
        def after(ctx):
            captured[ctx.unit.name] = ctx.data.quant_inputs.full()

        return UnitPlan(
            settings=UnitSettings(iters=5, batch_size=8),
            param_groups=lambda ctx: [ParamGroup("w", unit_parameters(ctx.unit), 1e-3)],
            after=after,
        )

    reconstruct(model, reference, x, plan_for, chunk_size=5)
    head = build_units(model, "block")[-1]
    seen = []
    handle = head.owner.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    torch.testing.assert_close(captured["head"], seen[0])


def test_float_input_mode_trains_on_float_model_inputs():
    model, reference, x = quantized_pair()
    units, float_units = build_units(model), build_units(reference)
    chunks = ChunkedTensor.from_tensor(x, 8)
    float_inputs = capture_inputs(reference, float_units[1], chunks, device="cpu")
    data = UnitData(compute_outputs(float_units[1], float_inputs, device="cpu"), float_inputs=float_inputs)
    context = UnitContext(units[1], float_units[1], data, UnitSettings(iters=1, batch_size=4, input="float"), torch.device("cpu"))
    rows = torch.tensor([3, 1])
    torch.testing.assert_close(context.inputs(rows), float_inputs.gather(rows))


def test_qdrop_mixes_elementwise_and_extremes_select_one_source():
    quant = ChunkedTensor([torch.ones(8, 5)])
    float_ = ChunkedTensor([torch.zeros(8, 5)])
    data = UnitData(targets=quant, float_inputs=float_, quant_inputs=quant)
    model = adapt(toy_vit())
    unit = build_units(model)[1]
    rows = torch.arange(8)

    def mixed(p):
        ctx = UnitContext(unit, unit, data, UnitSettings(iters=1, batch_size=8, input="qdrop", qdrop_prob=p), torch.device("cpu"))
        return ctx.inputs(rows, torch.Generator().manual_seed(0))

    assert mixed(1.0).eq(1).all() and mixed(0.0).eq(0).all()
    half = mixed(0.5)
    assert 0.2 < half.mean() < 0.8 and set(half.unique().tolist()) == {0.0, 1.0}


def test_attention_kl_is_zero_for_equal_maps_and_reaches_qkv_otherwise():
    model, reference, x = quantized_pair()
    attn_units = [u for u in build_units(model, "module") if u.kind == "attention"]
    seen_grads = {}

    def plan_for(unit):
        if unit.kind != "attention":
            return None

        def after(ctx):
            qkv = ctx.unit.owner.qkv.weight
            seen_grads[unit.name] = qkv.clone()

        return UnitPlan(
            settings=UnitSettings(iters=3, batch_size=8, input="quant"),
            param_groups=lambda ctx: [ParamGroup("w", unit_parameters(ctx.unit), 1e-2)],
            losses=(AttentionKL(),),
            after=after,
        )

    before = {u.name: u.owner.qkv.weight.detach().clone() for u in attn_units}
    reports = reconstruct(model, reference, x, plan_for, granularity="module", chunk_size=8)
    assert all(r.loss_terms["attention_kl"] >= 0 for r in reports)
    assert any(not torch.equal(before[name], after) for name, after in seen_grads.items())

    # identical maps: zero divergence
    term = AttentionKL()
    probs = torch.softmax(torch.randn(2, 3, 5, 5), dim=-1)
    from benchsuite.quant.reconstruct import StepState

    state = StepState(attn_units[0], 0, 1, torch.zeros(1), torch.zeros(1), [probs], lambda: [probs])
    assert abs(float(term(state))) < 1e-6


def test_rounding_regularizer_schedule():
    term = RoundingRegularizer(warmup=0.2, beta_start=20, beta_end=2)
    # The reference counts steps from 1: off while t < 0.2·T, then 20 → 2, reaching 2 at the end.
    assert term.beta(0, 100) is None and term.beta(18, 100) is None
    assert term.beta(19, 100) == pytest.approx(20)
    assert term.beta(99, 100) == pytest.approx(2)


def test_curriculum_starts_with_the_easiest_rows_and_widens():
    model = adapt(toy_vit())
    unit = build_units(model)[1]
    inputs = ChunkedTensor([torch.zeros(10, 17, 32)])
    targets = torch.zeros(10, 17, 32)
    targets[:, 0, 0] = torch.arange(10.0)  # the block maps zeros to something; offsets make rows differ
    with torch.no_grad():
        base = unit(inputs.full())
    data = UnitData(targets=ChunkedTensor([base + targets]), quant_inputs=inputs)
    ctx = UnitContext(unit, unit, data, UnitSettings(iters=10, batch_size=2), torch.device("cpu"))
    sampler = CurriculumSampler(lambda0=0.3, tau=0.8)
    sampler.prepare(ctx)
    assert sampler.order.tolist() == list(range(10))
    generator = torch.Generator().manual_seed(0)
    early = torch.cat([sampler.indices(0, 2, generator) for _ in range(20)])
    assert early.max() < 3
    assert sampler.fraction(8) == 1.0


def test_output_mse_sums_dim1_and_averages_the_rest():
    pred, target = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    assert float(output_mse(pred, target)) == pytest.approx(3.0)


def test_output_mse_follows_each_layout_the_reference_used():
    error = torch.ones(2, 4, 6, 3)  # Swin-style channels-last (B, H, W, C)
    zero = torch.zeros_like(error)
    assert float(output_mse(error, zero)) == pytest.approx(24.0)  # summed over H·W tokens
    assert float(output_mse(error, zero, window_area=8)) == pytest.approx(8.0)  # per window
    assert float(output_mse(error, zero, channels_first=True)) == pytest.approx(4.0)  # conv NCHW
    assert float(output_mse(torch.ones(2, 5), torch.zeros(2, 5))) == pytest.approx(5.0)  # logits
    per_row = output_mse(torch.ones(3, 7, 2), torch.zeros(3, 7, 2), per_sample=True)
    assert per_row.tolist() == [7.0, 7.0, 7.0]


def test_capturing_an_input_does_not_run_the_module():
    model = adapt(toy_vit())
    head = build_units(model, "block")[-1]
    calls = []
    handle = head.owner.register_forward_hook(lambda m, a, o: calls.append(1))
    capture_inputs(model, head, ChunkedTensor.from_tensor(images(4), 4), device="cpu")
    handle.remove()
    assert calls == []
