"""Part-segmentation metrics (ShapeNetPart protocol), shared by every task that labels points.

Point-MAE's evaluation (``segmentation/main.py``, tasks spec §3.5), written as small functions:

- a shape's prediction is the argmax over *its category's parts only* (:func:`restrict_to_category`,
  :func:`predict_parts`);
- its IoU is the mean over the category's parts of |pred ∩ gt| / |pred ∪ gt|, a part absent from
  both counting 1.0 (:func:`shape_ious`);
- instance mIoU averages shape IoUs over shapes, class mIoU averages the per-category means over
  the categories present (:func:`instance_miou`, :func:`class_miou`); point accuracy is the share
  of points labelled right.

Comparisons with the float model use the same restricted view: the per-point distribution over
the category's parts (softmax of the restricted logits), so agreement and KL measure exactly what
the metric sees. Percentages are 0..100; KL is in nats. Nothing here names a dataset; a part table
is a sequence, per category index, of that category's global part ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "PartTable",
    "category_mious",
    "class_miou",
    "evaluate_segmenter",
    "instance_miou",
    "part_index",
    "point_accuracy",
    "point_agreement",
    "point_kl_to_reference",
    "predict_parts",
    "reference_part_logits",
    "restrict_to_category",
    "segmentation_metrics",
    "shape_ious",
]

#: Global part ids of each category, indexed by category index (e.g. ``[(0, 1, 2, 3), (4, 5), ...]``).
PartTable = Sequence[Sequence[int]]


def part_index(parts: PartTable) -> tuple[Tensor, Tensor]:
    """``(ids, valid)``, both ``(categories, max parts)``: part ids padded with 0, and the padding mask."""
    if not parts or any(len(p) == 0 for p in parts):
        raise ValueError("every category needs at least one part")
    width = max(len(p) for p in parts)
    ids = torch.zeros(len(parts), width, dtype=torch.long)
    valid = torch.zeros(len(parts), width, dtype=torch.bool)
    for category, part_ids in enumerate(parts):
        ids[category, : len(part_ids)] = torch.as_tensor(list(part_ids), dtype=torch.long)
        valid[category, : len(part_ids)] = True
    return ids, valid


def restrict_to_category(logits: Tensor, categories: Tensor, parts: PartTable) -> Tensor:
    """Model logits ``(B, num_parts, N)`` → ``(B, N, max parts)``: each shape's own parts only.

    Slot ``k`` holds the logit of the category's ``k``-th part; slots beyond the category's part
    count are ``-inf``, so they never win an argmax and get zero probability.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (shapes, parts, points), got shape {tuple(logits.shape)}")
    categories = torch.as_tensor(categories).reshape(-1).long().to(logits.device)
    if categories.shape[0] != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} shapes but {categories.shape[0]} categories")
    ids, valid = (t.to(logits.device) for t in part_index(parts))
    if int(ids.max()) >= logits.shape[1]:
        raise ValueError(f"the part table names part {int(ids.max())}, the logits have {logits.shape[1]} parts")
    chosen = ids[categories]  # (B, K)
    restricted = logits.gather(1, chosen.unsqueeze(-1).expand(-1, -1, logits.shape[2]))  # (B, K, N)
    restricted = restricted.transpose(1, 2).float()
    return restricted.masked_fill(~valid[categories].unsqueeze(1), float("-inf"))


def predict_parts(restricted: Tensor, categories: Tensor, parts: PartTable) -> Tensor:
    """Global part ids ``(B, N)``: the argmax over the category's parts (ties: the lowest part id)."""
    ids, _ = part_index(parts)
    slot = restricted.argmax(dim=-1)  # (B, N)
    chosen = ids.to(restricted.device)[torch.as_tensor(categories).long().to(restricted.device)]
    return chosen.gather(1, slot)


def shape_ious(predictions: Tensor, labels: Tensor, categories: Tensor, parts: PartTable) -> Tensor:
    """Per-shape IoU ``(B,)`` in [0, 1], float64.

    For each part of the shape's category: |pred ∩ gt| / |pred ∪ gt|, or 1.0 when the part is in
    neither (the reference's rule); the shape's IoU is their mean. Labels outside the category
    enter only through the unions of the category's parts, as in the reference.
    """
    predictions, labels = torch.as_tensor(predictions).long(), torch.as_tensor(labels).long()
    if predictions.shape != labels.shape or predictions.dim() != 2:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} must be (B, N)")
    ids, valid = part_index(parts)
    categories = torch.as_tensor(categories).reshape(-1).long()
    chosen, mask = ids[categories], valid[categories]  # (B, K)
    pred_is = predictions.unsqueeze(-1) == chosen.unsqueeze(1)  # (B, N, K)
    gt_is = labels.unsqueeze(-1) == chosen.unsqueeze(1)
    inter = (pred_is & gt_is).sum(dim=1).double()
    union = (pred_is | gt_is).sum(dim=1).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    iou = torch.where(mask, iou, torch.zeros_like(iou))
    return iou.sum(dim=1) / mask.sum(dim=1).double()


def instance_miou(ious: Tensor) -> float:
    """Mean shape IoU over all shapes, in % (the main ShapeNetPart number)."""
    ious = torch.as_tensor(ious).double()
    return float("nan") if ious.numel() == 0 else 100.0 * ious.mean().item()


def category_mious(ious: Tensor, categories: Tensor) -> dict[int, float]:
    """Mean shape IoU per category index present, in %."""
    ious = torch.as_tensor(ious).double()
    categories = torch.as_tensor(categories).reshape(-1).long()
    return {int(c): 100.0 * ious[categories == c].mean().item() for c in torch.unique(categories)}


def class_miou(ious: Tensor, categories: Tensor) -> float:
    """Mean over the categories present of each category's mean shape IoU, in %.

    Categories without shapes in the evaluated set are left out (the reference's mean would be
    NaN for them; with its full test split every category is present).
    """
    means = category_mious(ious, categories)
    return float("nan") if not means else sum(means.values()) / len(means)


def point_accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Share of points whose predicted part equals the label, in %."""
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    if predictions.numel() == 0:
        return float("nan")
    return 100.0 * (predictions.long() == labels.long()).double().mean().item()


def point_agreement(restricted: Tensor, reference: Tensor) -> float:
    """Share of points whose restricted argmax equals the reference's, in %."""
    _check_pair(restricted, reference)
    if restricted.numel() == 0:
        return float("nan")
    same = restricted.argmax(dim=-1) == reference.to(restricted.device).argmax(dim=-1)
    return 100.0 * same.double().mean().item()


def point_kl_to_reference(restricted: Tensor, reference: Tensor) -> float:
    """Mean over points of KL(reference || model) between the distributions over the category's parts.

    Float64, nats; padded slots (``-inf`` in both) and reference probabilities that underflow to
    0 contribute nothing (0 · log 0 = 0).
    """
    _check_pair(restricted, reference)
    if restricted.numel() == 0:
        return float("nan")
    log_q = torch.log_softmax(restricted.double(), dim=-1)
    log_p = torch.log_softmax(reference.to(restricted.device).double(), dim=-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return max(terms.sum(dim=-1).mean().item(), 0.0)


def segmentation_metrics(
    restricted: Tensor,
    labels: Tensor,
    categories: Tensor,
    parts: PartTable,
    reference: Tensor | None = None,
) -> dict[str, float]:
    """``instance_miou``, ``class_miou``, ``point_acc`` (%), plus ``agreement`` (%) and
    ``kl_to_float`` (nats) when the float model's restricted logits are given."""
    predictions = predict_parts(restricted, categories, parts)
    ious = shape_ious(predictions, labels, categories, parts)
    metrics = {
        "instance_miou": instance_miou(ious),
        "class_miou": class_miou(ious, categories),
        "point_acc": point_accuracy(predictions, labels),
    }
    if reference is not None:
        metrics["agreement"] = point_agreement(restricted, reference)
        metrics["kl_to_float"] = point_kl_to_reference(restricted, reference)
    return metrics


def evaluate_segmenter(
    model: nn.Module,
    batches: Iterable[tuple[Any, Tensor, Tensor]],
    parts: PartTable,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``model`` over ``(inputs, labels (B, N), categories (B,))`` batches.

    Returns the restricted logits ``(S, N, max parts)`` (float32, CPU), labels and categories.
    Restricting per batch keeps memory to a few parts per point instead of all of them. Uses
    ``torch.no_grad`` (not ``inference_mode``): fake-quant modules may update state in forward.
    """
    restricted: list[Tensor] = []
    all_labels: list[Tensor] = []
    all_categories: list[Tensor] = []
    with torch.no_grad():
        for inputs, labels, categories in batches:
            out = model(inputs.to(device))
            if isinstance(out, (tuple, list)):
                out = out[0]
            restricted.append(restrict_to_category(out.detach(), categories, parts).to("cpu", torch.float32))
            all_labels.append(torch.as_tensor(labels).to("cpu", torch.long))
            all_categories.append(torch.as_tensor(categories).reshape(-1).to("cpu", torch.long))
    if not restricted:
        width = max(len(p) for p in parts)
        return torch.empty(0, 0, width), torch.empty(0, 0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(restricted), torch.cat(all_labels), torch.cat(all_categories)


def reference_part_logits(reference: object, restricted: Tensor, categories: Tensor) -> Tensor | None:
    """The float model's restricted logits from a reference Evaluation, checked against this one.

    The reference's ``outputs`` is ``{"part_logits": (S, N, K), "categories": (S,)}``. Returns
    None without a reference; a shape or category mismatch means the evaluations did not see the
    same shapes (e.g. another eval limit), which would make agreement and KL meaningless.
    """
    outputs = getattr(reference, "outputs", None)
    if outputs is None:
        return None
    from benchsuite.errors import DataError

    if not isinstance(outputs, dict) or "part_logits" not in outputs:
        raise DataError("reference outputs are not part-segmentation outputs (no 'part_logits')")
    ref = torch.as_tensor(outputs["part_logits"]).to("cpu", torch.float32)
    ref_categories = torch.as_tensor(outputs.get("categories", categories)).reshape(-1).long()
    if ref.shape != restricted.shape or not torch.equal(ref_categories, torch.as_tensor(categories).long().cpu()):
        raise DataError(
            f"reference outputs have shape {tuple(ref.shape)}, this evaluation {tuple(restricted.shape)} "
            "(or other categories): were they made with the same eval limit?"
        )
    return ref


def _check_pair(restricted: Tensor, reference: Tensor) -> None:
    if restricted.shape != reference.shape:
        raise ValueError(
            f"restricted logits {tuple(restricted.shape)} and reference {tuple(reference.shape)} must have one shape"
        )
