"""Canonical sites: the contract between methods and tasks.

An adapter (one per backbone family) rewrites a concrete model so that every quantizable op is a
fake-quant wrapper (:mod:`benchsuite.quant.modules`) tagged with a :class:`Role` and the
:class:`InputKind` of each of its inputs. Methods choose quantizers from these tags and never
from layer names, which is what lets every method run on every task.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from benchsuite.quant.modules import QuantModule


class Role(str, Enum):
    """What a quantizable op does in the network."""

    PATCH_EMBED = "patch_embed"
    QKV = "qkv"
    MATMUL_QK = "matmul_qk"
    MATMUL_AV = "matmul_av"
    PROJ = "proj"
    FC1 = "fc1"
    FC2 = "fc2"
    HEAD = "head"
    REDUCTION = "reduction"
    OTHER = "other"


class InputKind(str, Enum):
    """Where an op's input comes from; decides which activation quantizer fits it."""

    IMAGE = "image"
    POST_LAYERNORM = "post_layernorm"
    POST_SOFTMAX = "post_softmax"
    POST_GELU = "post_gelu"
    GENERIC = "generic"


@dataclass
class Site:
    """One quantizable op of a canonical model.

    ``name`` is the module path, for reports and debugging only: methods must not parse it.
    ``input_kinds`` has one entry per quantizable input (two for the attention matmuls).
    ``block`` is the index of the transformer block the op sits in, or None outside blocks.
    ``tunable=False`` marks an op outside blocks whose input rows do not correspond between the
    float and the quantized model (a detector's RPN and RoI heads see each model's own
    proposals), so no per-row float target exists: reconstruction methods initialise its
    quantizers (their plan's ``before``/``after``) but do not optimise it.
    """

    name: str
    module: QuantModule
    role: Role
    input_kinds: tuple[InputKind, ...]
    block: int | None = None
    tunable: bool = True

    @property
    def input_kind(self) -> InputKind:
        """The first (for Linear/Conv the only) input's kind."""
        return self.input_kinds[0]


@dataclass
class BlockSites:
    """A transformer block, with its attention and MLP reachable separately.

    Reconstruction methods optimise the attention and the MLP as separate units, so each needs an
    input that can be cached per image and a callable that maps it to the sub-module's output.
    By default that is the sub-module's own first input and its own forward. A family whose
    attention does not take image-batched input (Swin's window attention reads
    ``(batch · windows, N, C)`` and a per-window mask) names instead the module whose *output* is
    the attention unit's input (``attention_entry = (norm1, True)``) and the block method that
    continues from there (``attention_call = "_attn"``: shift, partition, attention, merge).
    """

    index: int
    module: nn.Module
    attention: nn.Module
    mlp: nn.Module
    sites: list[Site] = field(default_factory=list)
    #: (module, read its output?) where the attention unit's input is read; None: attention's input.
    attention_entry: tuple[nn.Module, bool] | None = None
    #: Name of the block method that maps that input to the attention output; None: attention itself.
    attention_call: str | None = None


@dataclass
class LayerNormPair:
    """A LayerNorm and the Linear(s) that read its output directly (for reparameterization)."""

    norm: nn.LayerNorm
    linears: list[nn.Module]


class CanonicalModel(nn.Module):
    """A model rewritten into canonical form; calling it calls the wrapped model.

    Adapters build it; the float output equals the original model's (tested per family).
    """

    def __init__(
        self,
        model: nn.Module,
        family: str,
        sites: list[Site],
        blocks: list[BlockSites],
        layernorm_pairs: list[LayerNormPair],
        *,
        fixed_token_count: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.family = family
        #: False when evaluation inputs differ in size from calibration inputs (detection images),
        #: so token counts vary and a method with per-token-position parameters cannot apply.
        self.fixed_token_count = fixed_token_count
        self._sites = sites
        self._blocks = blocks
        self._layernorm_pairs = layernorm_pairs

    def forward(self, *args, **kwargs):  # noqa: D401 - plain delegation
        return self.model(*args, **kwargs)

    def sites(self) -> list[Site]:
        """Every quantizable op, in execution order."""
        return list(self._sites)

    def blocks(self) -> Iterator[BlockSites]:
        """Transformer blocks in execution order."""
        return iter(self._blocks)

    def layernorm_pairs(self) -> Iterator[LayerNormPair]:
        """(LayerNorm, following Linears) pairs, for scale reparameterization."""
        return iter(self._layernorm_pairs)

    def sites_by_role(self, *roles: Role) -> list[Site]:
        return [s for s in self._sites if s.role in roles]
