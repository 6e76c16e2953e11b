"""Classification metrics shared by every task that outputs class logits.

Nothing here names a dataset. Only torch is imported, so tasks can use these helpers without
pulling in anything heavier.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "classification_metrics",
    "evaluate_classifier",
    "topk_accuracy",
    "mean_class_accuracy",
    "agreement",
    "kl_to_reference",
]


def topk_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    """Percentage of samples whose label is among the ``k`` highest logits."""
    logits, labels = _check(logits, labels)
    if logits.shape[0] == 0:
        return float("nan")
    top = logits.topk(k, dim=1).indices
    hits = (top == labels.unsqueeze(1)).any(dim=1)
    return 100.0 * hits.double().mean().item()


def mean_class_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Mean over the classes present in ``labels`` of each class's top-1 accuracy, in %.

    Classes with no sample are left out rather than counted as 0 or NaN, so an evaluation subset
    (``eval_limit``) gives a defined number; on a full test split every class is present.
    """
    logits, labels = _check(logits, labels)
    if logits.shape[0] == 0:
        return float("nan")
    hits = (logits.argmax(dim=1) == labels).double()
    classes, inverse = labels.unique(return_inverse=True)
    correct = torch.zeros(len(classes), dtype=torch.float64).index_add_(0, inverse, hits)
    counts = torch.zeros(len(classes), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(hits))
    return 100.0 * (correct / counts).mean().item()


def agreement(logits: Tensor, reference_logits: Tensor) -> float:
    """Percentage of samples whose argmax equals the reference's argmax."""
    logits, reference_logits = _check_pair(logits, reference_logits)
    if logits.shape[0] == 0:
        return float("nan")
    same = logits.argmax(dim=1) == reference_logits.argmax(dim=1)
    return 100.0 * same.double().mean().item()


def kl_to_reference(logits: Tensor, reference_logits: Tensor) -> float:
    """Mean over samples of KL(softmax(reference) || softmax(logits)), in nats, float64."""
    logits, reference_logits = _check_pair(logits, reference_logits)
    if logits.shape[0] == 0:
        return float("nan")
    log_q = torch.log_softmax(logits.double(), dim=1)
    log_p = torch.log_softmax(reference_logits.double(), dim=1)
    p = log_p.exp()
    # 0 * log 0 = 0: where p underflows to 0 the term vanishes, also when log_q is -inf.
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    kl = terms.sum(dim=1).mean().item()
    return max(kl, 0.0)


def classification_metrics(
    logits: Tensor,
    labels: Tensor,
    reference_logits: Tensor | None = None,
    topk: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """``top{k}`` accuracies in %, plus ``agreement`` (%) and ``kl_to_float`` given a reference.

    Top-k accuracies with ``k`` larger than the number of classes are left out.
    """
    logits, labels = _check(logits, labels)
    num_classes = logits.shape[1]
    metrics: dict[str, float] = {}
    for k in topk:
        if k < 1:
            raise ValueError(f"top-k needs k >= 1, got {k}")
        if k <= num_classes:
            metrics[f"top{k}"] = topk_accuracy(logits, labels, k)
    if reference_logits is not None:
        metrics["agreement"] = agreement(logits, reference_logits)
        metrics["kl_to_float"] = kl_to_reference(logits, reference_logits)
    return metrics


def evaluate_classifier(
    model: nn.Module,
    batches: Iterable[tuple[Any, Tensor]],
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """Run ``model`` over ``(inputs, labels)`` batches; return logits (CPU, float32) and labels.

    Uses ``torch.no_grad`` rather than ``inference_mode``: fake-quant modules may update state
    tensors in forward, which inference tensors would forbid afterwards.
    """
    all_logits: list[Tensor] = []
    all_labels: list[Tensor] = []
    with torch.no_grad():
        for inputs, labels in batches:
            out = model(inputs.to(device))
            if isinstance(out, (tuple, list)):
                out = out[0]
            all_logits.append(out.detach().to("cpu", torch.float32))
            all_labels.append(torch.as_tensor(labels).detach().to("cpu", torch.long))
    if not all_logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(all_logits), torch.cat(all_labels)


def _check(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (samples, classes), got shape {tuple(logits.shape)}")
    labels = torch.as_tensor(labels).to(logits.device).long().reshape(-1)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits but {labels.shape[0]} labels")
    return logits, labels


def _check_pair(logits: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() != 2 or reference.shape != logits.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and reference {tuple(reference.shape)} must be the same "
            "(samples, classes) shape"
        )
    return logits, reference.to(logits.device)


def reference_logits(reference: object, logits: torch.Tensor) -> torch.Tensor | None:
    """The float model's logits from a reference Evaluation, checked against ``logits``.

    Returns None without a reference. A shape mismatch means the two evaluations did not see
    the same samples (e.g. another eval limit), which would make agreement and KL meaningless.
    """
    outputs = getattr(reference, "outputs", None)
    if outputs is None:
        return None
    from benchsuite.errors import DataError

    ref = torch.as_tensor(outputs).to("cpu", torch.float32)
    if ref.shape != logits.shape:
        raise DataError(
            f"reference outputs have shape {tuple(ref.shape)}, this evaluation "
            f"{tuple(logits.shape)}: were they made with the same eval limit?"
        )
    return ref
