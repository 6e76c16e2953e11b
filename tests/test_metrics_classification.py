"""Classification metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from benchsuite.metrics.classification import classification_metrics, evaluate_classifier

# Four samples, six classes. Per row, classes ranked by logit:
#   row 0: 0 > 1 > 2 > 3 > 4 > 5          label 0 -> rank 1
#   row 1: 5 > 4 > 3 > 2 > 1 > 0          label 0 -> rank 6 (outside top-5)
#   row 2: 2 > 1 > 0 > 3 > 4 > 5          label 1 -> rank 2
#   row 3: 0 > 1 > 2 > 3 > 4 > 5 ...      label 4 -> rank 5
LOGITS = torch.tensor(
    [
        [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        [4.0, 5.0, 6.0, 3.0, 2.0, 1.0],
        [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],
    ]
)
LABELS = torch.tensor([0, 0, 1, 4])


def test_topk_by_hand():
    metrics = classification_metrics(LOGITS, LABELS)
    assert set(metrics) == {"top1", "top5"}
    assert metrics["top1"] == pytest.approx(25.0)  # only row 0
    assert metrics["top5"] == pytest.approx(75.0)  # rows 0, 2, 3


def test_topk_larger_than_classes_is_skipped():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]])
    metrics = classification_metrics(logits, torch.tensor([0, 2]), topk=(1, 2, 5))
    assert set(metrics) == {"top1", "top2"}
    assert metrics["top1"] == pytest.approx(50.0)
    assert metrics["top2"] == pytest.approx(100.0)


def test_agreement_and_kl_by_hand():
    # Two classes. Sample 0: reference p = softmax(ln 3, 0) = (3/4, 1/4),
    # model q = softmax(0, ln 3) = (1/4, 3/4): the argmaxes differ.
    # KL(p||q) = 3/4 ln(3) + 1/4 ln(1/3) = 1/2 ln 3.
    # Sample 1: identical logits, so KL = 0 and the argmaxes agree.
    # float64 inputs: the metric computes in float64, so it matches the closed form to ~1e-15.
    reference = torch.tensor([[math.log(3.0), 0.0], [2.0, -1.0]], dtype=torch.float64)
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    metrics = classification_metrics(logits, labels, reference, topk=(1,))
    assert set(metrics) == {"top1", "agreement", "kl_to_float"}
    assert metrics["kl_to_float"] == pytest.approx(0.5 * math.log(3.0) / 2, rel=1e-9)  # mean of the two
    assert metrics["agreement"] == pytest.approx(50.0)
    assert metrics["top1"] == pytest.approx(50.0)


def test_kl_is_not_symmetric_and_uses_reference_as_p():
    # p = (1/2, 1/2) from the reference, q = (3/4, 1/4) from the model:
    # KL(p||q) = 1/2 ln(2/3) + 1/2 ln(2) = 1/2 ln(4/3); the reverse, KL(q||p), would be 3/4 ln(3/2) + 1/4 ln(1/2).
    reference = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    logits = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    kl = classification_metrics(logits, torch.tensor([0]), reference, topk=(1,))["kl_to_float"]
    assert kl == pytest.approx(0.5 * math.log(4.0 / 3.0), rel=1e-9)


def test_agreement_counts_disagreements():
    reference = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    metrics = classification_metrics(logits, torch.tensor([0, 1, 1, 0]), reference, topk=(1,))
    assert metrics["agreement"] == pytest.approx(50.0)
    assert metrics["top1"] == pytest.approx(100.0)


def test_kl_is_zero_for_identical_and_nonnegative_for_extreme_logits():
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    assert classification_metrics(logits, torch.zeros(8, dtype=torch.long), logits)["kl_to_float"] == 0.0
    extreme = torch.tensor([[1e4, -1e4, 0.0]])
    kl = classification_metrics(extreme, torch.tensor([0]), extreme + 1e-3)["kl_to_float"]
    assert kl >= 0.0 and math.isfinite(kl)
    # A confident reference against a model that puts ~0 mass there: large but finite.
    kl = classification_metrics(torch.tensor([[-50.0, 50.0]]), torch.tensor([0]), torch.tensor([[50.0, -50.0]]))["kl_to_float"]
    assert kl == pytest.approx(100.0, rel=1e-6)


def test_shape_mismatches_are_errors():
    with pytest.raises(ValueError):
        classification_metrics(LOGITS, LABELS[:3])
    with pytest.raises(ValueError):
        classification_metrics(LOGITS, LABELS, LOGITS[:2])


class _Counting(nn.Module):
    """A linear model that keeps state in forward, as a fake-quant observer would."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen += x.shape[0]
        return self.linear(x).double()


def test_evaluate_classifier_concatenates_without_grad():
    torch.manual_seed(0)
    model = _Counting()
    inputs = torch.randn(10, 3)
    labels = torch.arange(10) % 4
    batches = [(inputs[i : i + 4], labels[i : i + 4]) for i in range(0, 10, 4)]
    logits, got_labels = evaluate_classifier(model, batches, "cpu")
    assert logits.shape == (10, 4) and logits.dtype == torch.float32 and logits.device.type == "cpu"
    assert not logits.requires_grad
    assert torch.equal(got_labels, labels)
    assert model.seen.item() == 10
    with torch.no_grad():
        assert torch.allclose(logits, model.linear(inputs).float())
    # State written during evaluation is ordinary tensors (not inference tensors): usable later.
    model(inputs).sum().backward()
    assert model.seen.item() == 20
