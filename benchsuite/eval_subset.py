"""The ``--eval-limit`` rule every task shares: a fixed-seed subset of the evaluation list.

A subset is the first ``limit`` entries of ``torch.randperm(total)`` under a generator seeded
with ``seed``, sorted, so it spreads over classes (lists are usually grouped by class), keeps the
list order, and a smaller limit's subset is contained in a larger one's. Results record the rule
in words (:func:`describe_subset`), next to the hash of the chosen ids.
"""

from __future__ import annotations

__all__ = ["describe_subset", "subset_indices"]


def subset_indices(total: int, limit: int | None, seed: int = 0) -> list[int]:
    """Indices of the evaluation subset: all of ``range(total)``, or ``limit`` of them in order."""
    if limit is None or limit >= total:
        return list(range(total))
    import torch

    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=generator)[: max(0, int(limit))].tolist())


def describe_subset(total: int, limit: int | None, seed: int, items: str, population: str, order: str) -> str:
    """The rule of :func:`subset_indices` in words, e.g. for the ``eval_subset`` manifest entry.

    ``items`` names what is counted ("val images"), ``population`` the list drawn from ("the
    sorted val path list") and ``order`` the evaluation order ("path order").
    """
    if limit is None or limit >= total:
        return f"all {total} {items}, in {order}"
    return (
        f"eval_limit {limit}: the first {limit} of torch.randperm({total}) with a generator seeded "
        f"{seed}, over {population}, evaluated in {order}"
    )
