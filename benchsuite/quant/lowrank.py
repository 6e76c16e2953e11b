"""Low-rank weight compensation with a differentiable rank search (AIQViT's AILoC, aiqvit.md §2–§3).

No reference code exists; the paper (per the spec's secondary sources) adds a LoRA-style pair
``(B, A)`` to every fully-connected layer, trains only the pair (the original weight W₀ stays
frozen) and picks each layer's rank by architecture search. This module is benchsuite's reading
of that description; every choice below is a (proposal) of the spec:

- **Nested-prefix mixture.** One maximum-rank pair ``A ∈ R^{R×d_in}``, ``B ∈ R^{d_out×R}`` is
  shared by every candidate rank ``r_1 < … < r_K = R`` (candidate k uses the first ``r_k`` rows of
  A and columns of B). With ``π = softmax(θ)`` the DARTS mixture
  ``Σ_k π_k · B[:, :r_k] · A[:r_k]`` equals ``B · diag(m) · A`` with
  ``m_j = Σ_{k: r_k ≥ j} π_k``, a non-increasing mask, so the mixture costs one rank-R product.
- **Candidates** are clipped to ``min(d_in, d_out)`` (a rank above that adds nothing) and
  de-duplicated, so e.g. (4, 8, 16, 32, 64, 100) becomes (4, 8, 16, 32) for a 32-wide layer:
  a duplicated candidate would only double its own prior weight in the softmax.
- **Initialization**: A Kaiming-uniform as ``nn.Linear``/LoRA (``a = √5``, i.e. uniform in
  ``±1/√d_in``), B zero, θ zero (uniform π). With B = 0 the compensation is exactly 0, so
  training starts at the plain PTQ point. A is drawn from a caller-supplied generator, so a
  seeded run is reproducible.
- **Forms.** ``branch``: ``y = Q_w(W₀)·x + B·diag(m)·A·x`` (a float side branch on the same
  quantized input); ``merged``: ``y = Q_w(W₀ + B·diag(m)·A)·x`` (gradients reach A and B straight
  through the weight quantizer). :class:`~benchsuite.quant.modules.QuantLinear` does the
  wiring; this module provides :meth:`LowRankCompensation.forward` and
  :meth:`LowRankCompensation.delta`.
- **Branch precision** (``branch_bits``, branch form only): A and B fake-quantized symmetric per
  row (per rank row of A, per output row of B) with their current absolute maximum, STE rounding.
  Off (float) by default.
- **Size penalty** (:meth:`LowRankCompensation.expected_size`): ``Σ_k π_k · r_k · (d_in + d_out)``,
  the expected parameter count of the branch; the method multiplies it by ``rank_penalty``.
- **Discretization** (:meth:`LowRankCompensation.discretize`): rank ``r* = r_{argmax θ}`` (ties go
  to the smaller rank, ``torch.argmax`` returns the first maximum), A and B truncated to ``r*``,
  θ dropped. With ``fold_mask=True`` (default) the mask is folded into B,
  ``B ← B[:, :r*] · diag(m[:r*])``, so the discretized branch equals the searched mixture minus its
  components beyond ``r*`` (which carry the smallest mask weights) and fine-tuning starts close
  to the searched function; ``fold_mask=False`` is DARTS's literal "keep the chosen op's
  weights", i.e. ``B[:, :r*] · A[:r*]`` with every mask weight reset to 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from benchsuite.quant.quantizers import round_ste

__all__ = ["CompensationForm", "LowRankCompensation", "candidate_ranks", "nested_mask"]

CompensationForm = Literal["branch", "merged"]


def candidate_ranks(candidates: Sequence[int], in_features: int, out_features: int) -> tuple[int, ...]:
    """The candidate ranks for a ``(out_features, in_features)`` layer: clipped, unique, ascending."""
    if not candidates:
        raise ValueError("at least one candidate rank is needed")
    if any(int(r) < 1 for r in candidates):
        raise ValueError(f"candidate ranks must be positive, got {list(candidates)}")
    limit = min(in_features, out_features)
    return tuple(sorted({min(int(r), limit) for r in candidates}))


def nested_mask(probabilities: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """``m ∈ R^R`` with ``m_j = Σ_{k: r_k ≥ j} π_k`` (1-based j) for ascending ``ranks``.

    ``probabilities[k]`` belongs to ``ranks[k]``; differentiable in ``probabilities``.
    """
    widths = torch.tensor([ranks[0], *(b - a for a, b in zip(ranks, ranks[1:]))], device=probabilities.device)
    # Suffix sums: the share of every candidate at least as large as candidate k.
    suffix = probabilities.flip(0).cumsum(0).flip(0)
    return suffix.repeat_interleave(widths)


def _fake_quantize_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-row fake quantization at the rows' current absmax, straight-through."""
    qmax = 2 ** (bits - 1) - 1
    scale = (x.detach().abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-12)
    return torch.clamp(round_ste(x / scale), -qmax, qmax) * scale


class LowRankCompensation(nn.Module):
    """A low-rank ``ΔW = B·diag(m)·A`` for one Linear, with optional rank-search logits θ.

    While more than one candidate rank is left, ``θ`` (Parameter, one logit per candidate) gives
    the mask ``m`` of the nested-prefix mixture; after :meth:`discretize` (or when built with a
    single candidate) the rank is fixed, ``theta`` is None and ``m = 1``.
    """

    theta: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        candidates: Sequence[int],
        *,
        form: CompensationForm = "branch",
        branch_bits: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if form not in ("branch", "merged"):
            raise ValueError(f"form must be 'branch' or 'merged', got {form!r}")
        if branch_bits is not None and (form != "branch" or not 2 <= branch_bits <= 16):
            raise ValueError("branch_bits needs the branch form and a width in [2, 16]")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.form: CompensationForm = form
        self.branch_bits = branch_bits
        self.ranks: tuple[int, ...] = candidate_ranks(candidates, in_features, out_features)
        rank = self.ranks[-1]
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=√5), as nn.Linear and LoRA
        a = (torch.rand(rank, in_features, generator=generator, dtype=dtype) * 2 - 1) * bound
        self.A = nn.Parameter(a.to(device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        if len(self.ranks) > 1:
            self.theta = nn.Parameter(torch.zeros(len(self.ranks), dtype=dtype, device=device))
        else:
            self.register_parameter("theta", None)

    # -- state -------------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        """Whether the compensation is added to the weight before quantization."""
        return self.form == "merged"

    @property
    def searching(self) -> bool:
        return self.theta is not None

    @property
    def rank(self) -> int:
        """The current rank: the largest candidate while searching, else the chosen one."""
        return self.A.shape[0]

    def probabilities(self) -> torch.Tensor:
        """``π = softmax(θ)`` over :attr:`ranks` (one-hot on the single rank when not searching)."""
        if self.theta is None:
            return torch.ones(1, dtype=self.A.dtype, device=self.A.device)
        return torch.softmax(self.theta, dim=0)

    def mask(self) -> torch.Tensor | None:
        """The nested mask ``m`` (length :attr:`rank`), or None when the rank is fixed."""
        if self.theta is None:
            return None
        return nested_mask(self.probabilities(), self.ranks)

    def expected_size(self) -> torch.Tensor:
        """``Σ_k π_k · r_k · (d_in + d_out)``: the branch's expected parameter count (differentiable)."""
        ranks = torch.tensor(self.ranks, dtype=self.A.dtype, device=self.A.device)
        return (self.probabilities() * ranks).sum() * (self.in_features + self.out_features)

    # -- compute -----------------------------------------------------------------------------

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.A, self.B
        if self.branch_bits is not None:
            a, b = _fake_quantize_rows(a, self.branch_bits), _fake_quantize_rows(b, self.branch_bits)
        return a, b

    def delta(self) -> torch.Tensor:
        """``ΔW = B·diag(m)·A``, shaped like the Linear's weight ``(d_out, d_in)``."""
        a, b = self._factors()
        mask = self.mask()
        if mask is not None:
            a = a * mask.to(a.dtype)[:, None]
        return b @ a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x · ΔWᵀ`` computed through the rank-R bottleneck (``x·Aᵀ``, mask, ``·Bᵀ``)."""
        a, b = self._factors()
        hidden = F.linear(x, a)
        mask = self.mask()
        if mask is not None:
            hidden = hidden * mask.to(hidden.dtype)
        return F.linear(hidden, b)

    # -- discretization ----------------------------------------------------------------------

    def chosen_rank(self) -> int:
        """``r_{argmax θ}`` (the first maximum on ties, i.e. the smaller rank), or the fixed rank."""
        if self.theta is None:
            return self.rank
        return self.ranks[int(torch.argmax(self.theta.detach()))]

    @torch.no_grad()
    def discretize(self, fold_mask: bool = True) -> int:
        """Fix the rank at :meth:`chosen_rank`: truncate A and B, drop θ; returns the rank.

        New Parameters replace A and B (an optimizer over the old ones must be rebuilt).
        """
        if self.theta is None:
            return self.rank
        rank = self.chosen_rank()
        b = self.B[:, :rank].clone()
        if fold_mask:
            b.mul_(self.mask()[:rank].to(b.dtype))
        requires_grad = self.A.requires_grad
        self.A = nn.Parameter(self.A[:rank].clone(), requires_grad=requires_grad)
        self.B = nn.Parameter(b, requires_grad=requires_grad)
        self.theta = None
        self.ranks = (rank,)
        return rank

    def extra_repr(self) -> str:
        state = f"candidates={list(self.ranks)}" if self.searching else f"rank={self.rank}"
        bits = f", branch_bits={self.branch_bits}" if self.branch_bits is not None else ""
        return f"in={self.in_features}, out={self.out_features}, form={self.form}, {state}{bits}"
