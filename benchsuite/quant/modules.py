"""Fake-quant wrappers: the ops an adapter puts at every canonical site.

Each wrapper holds one input-quantizer slot per input and, for ops with a weight, a weight
quantizer slot. Slots start empty (an ``nn.Identity`` for inputs, ``None`` for the weight), so a
freshly adapted model computes exactly what the float model computed; a method fills the slots it
wants by role and input kind. Linear and Conv2d wrappers share the original module's Parameters,
so a method that edits weights in place (reparameterization, reconstruction) edits the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from benchsuite.quant.canonical import InputKind, Role
from benchsuite.quant.quantizers import Quantizer

__all__ = ["QuantConv2d", "QuantLinear", "QuantMatMul", "QuantModule"]


class QuantModule(nn.Module):
    """Base of the wrappers: a role, the kind of each input, and the quantizer slots."""

    #: Dim of ``weight`` that indexes output channels (per-channel weight quantizers use it).
    weight_channel_dim: ClassVar[int] = 0

    input_quantizers: nn.ModuleList
    weight_quantizer: Quantizer | None

    def __init__(self, role: Role, input_kinds: tuple[InputKind, ...]) -> None:
        super().__init__()
        if not input_kinds:
            raise ValueError("a QuantModule needs at least one input kind")
        self.role = Role(role)
        self.input_kinds = tuple(InputKind(kind) for kind in input_kinds)
        # nn.Identity marks an empty slot: it keeps ModuleList indices aligned with inputs.
        self.input_quantizers = nn.ModuleList(nn.Identity() for _ in self.input_kinds)
        self.register_module("weight_quantizer", None)

    @property
    def has_weight(self) -> bool:
        return False

    def input_quantizer(self, index: int) -> Quantizer | None:
        """The quantizer of input ``index``, or None when the slot is empty."""
        slot = self.input_quantizers[index]
        return slot if isinstance(slot, Quantizer) else None

    def set_input_quantizer(self, index: int, quantizer: Quantizer | None) -> None:
        """Put ``quantizer`` on input ``index``; None empties the slot."""
        if not 0 <= index < len(self.input_kinds):
            raise IndexError(f"{self.role.value} has {len(self.input_kinds)} input(s), not {index + 1}")
        self.input_quantizers[index] = nn.Identity() if quantizer is None else quantizer

    def set_weight_quantizer(self, quantizer: Quantizer | None) -> None:
        """Put ``quantizer`` on the weight; None removes it."""
        if not self.has_weight:
            raise TypeError(f"{type(self).__name__} ({self.role.value}) has no weight to quantize")
        self.weight_quantizer = quantizer

    def quantizers(self) -> Iterator[Quantizer]:
        """Every quantizer set on this op: inputs in order, then the weight."""
        for slot in self.input_quantizers:
            if isinstance(slot, Quantizer):
                yield slot
        if self.weight_quantizer is not None:
            yield self.weight_quantizer

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward pass sees it (fake-quantized when a quantizer is set).

        Without autograd the result is cached until the weight or the quantizer's state changes
        (tracked by tensor identity and version counters), so evaluation quantizes each weight
        once instead of once per batch.
        """
        weight: torch.Tensor = getattr(self, "weight")
        quantizer = self.weight_quantizer
        if quantizer is None:
            return weight
        if torch.is_grad_enabled() and (weight.requires_grad or any(p.requires_grad for p in quantizer.parameters())):
            self._weight_cache = None
            return quantizer(weight)
        key = _state_key(weight, quantizer)
        cached = getattr(self, "_weight_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        quantized = quantizer(weight)
        self._weight_cache = (key, quantized) if quantizer.initialized and not quantizer.observing else None
        return quantized

    def extra_repr(self) -> str:
        kinds = ", ".join(kind.value for kind in self.input_kinds)
        return f"role={self.role.value}, inputs=({kinds})"


def _state_key(weight: torch.Tensor, quantizer: Quantizer) -> tuple:
    tensors = [weight, *quantizer.buffers(), *quantizer.parameters()]
    return (
        id(quantizer),
        quantizer.enabled,
        quantizer.bits,
        tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors),
    )


class QuantLinear(QuantModule):
    """``F.linear`` on the quantized input and the quantized weight (per output channel: dim 0)."""

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        role: Role,
        input_kind: InputKind = InputKind.GENERIC,
    ) -> None:
        super().__init__(role, (input_kind,))
        self.register_parameter("weight", weight)
        self.register_parameter("bias", bias)
        self.out_features, self.in_features = weight.shape
        # Optional weight compensation (AIQViT's low-rank AILoC, benchsuite.quant.lowrank); empty
        # by default, registered so that its parameters appear in state_dict once set.
        self.register_module("compensation", None)

    @classmethod
    def from_float(
        cls, module: nn.Linear, role: Role, input_kind: InputKind = InputKind.GENERIC
    ) -> QuantLinear:
        """Wrap ``module``, sharing (not copying) its weight and bias."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"QuantLinear wraps nn.Linear, got {type(module).__name__}")
        wrapped = cls(module.weight, module.bias, role, input_kind)
        wrapped.train(module.training)
        return wrapped

    @property
    def has_weight(self) -> bool:
        return True

    def set_compensation(self, compensation: nn.Module | None) -> None:
        """Attach a weight compensation (None removes it); see :meth:`forward`.

        The module has a bool ``merged``, a ``delta()`` giving a weight-shaped tensor and a
        ``forward(xq)`` giving an output-shaped one (:class:`benchsuite.quant.lowrank.LowRankCompensation`).
        """
        self.compensation = compensation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compensation = self._modules.get("compensation")
        if compensation is None:  # the default path: unchanged and still cached
            return F.linear(self.input_quantizers[0](x), self.quantized_weight(), self.bias)
        xq = self.input_quantizers[0](x)
        if compensation.merged:  # y = x·Q_w(W + ΔW)ᵀ + b, straight through Q_w
            weight = self.weight + compensation.delta()
            quantizer = self.weight_quantizer
            return F.linear(xq, quantizer(weight) if quantizer is not None else weight, self.bias)
        # branch: y = x·Q_w(W)ᵀ + b + compensation(x), on the same quantized input
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return F.linear(xq, self.quantized_weight(), self.bias) + compensation(xq)
        return F.linear(xq, self._folded_weight(compensation), self.bias)

    def _folded_weight(self, compensation: nn.Module) -> torch.Tensor:
        """``Q_w(W) + ΔW``, cached like :meth:`quantized_weight`: the branch form in one matmul.

        ``x·Q_w(W)ᵀ + (x·Aᵀ)·Bᵀ = x·(Q_w(W) + B·A)ᵀ`` up to float rounding, so evaluation runs one
        matmul per Linear instead of three plus an addition (about a tenth of AIQViT's
        evaluation time on deit_small).
        """
        base = self.quantized_weight()
        key = (base._version, tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in compensation.parameters()))
        cached = getattr(self, "_folded_cache", None)
        if cached is not None and cached[0] is base and cached[1] == key:  # `is`: ids get reused
            return cached[2]
        folded = base + compensation.delta().to(base.dtype)
        self._folded_cache = (base, key, folded)
        return folded

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {super().extra_repr()}"


class QuantConv2d(QuantModule):
    """``F.conv2d`` on the quantized input and the quantized weight (per output channel: dim 0).

    Reproduces ``nn.Conv2d``'s forward, non-zero ``padding_mode`` included.
    """

    def __init__(self, conv: nn.Conv2d, role: Role, input_kind: InputKind = InputKind.GENERIC) -> None:
        super().__init__(role, (input_kind,))
        self.register_parameter("weight", conv.weight)
        self.register_parameter("bias", conv.bias)
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice

    @classmethod
    def from_float(
        cls, module: nn.Conv2d, role: Role, input_kind: InputKind = InputKind.GENERIC
    ) -> QuantConv2d:
        """Wrap ``module``, sharing (not copying) its weight and bias."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"QuantConv2d wraps nn.Conv2d, got {type(module).__name__}")
        wrapped = cls(module, role, input_kind)
        wrapped.train(module.training)
        return wrapped

    @property
    def has_weight(self) -> bool:
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizers[0](x)
        weight = self.quantized_weight()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, {super().extra_repr()}"
        )


class QuantMatMul(QuantModule):
    """``quantize(a) @ quantize(b)``: an activation-by-activation product (attention matmuls)."""

    def __init__(
        self,
        role: Role,
        input_kinds: tuple[InputKind, InputKind] = (InputKind.GENERIC, InputKind.GENERIC),
    ) -> None:
        if len(input_kinds) != 2:
            raise ValueError(f"QuantMatMul takes two input kinds, got {len(input_kinds)}")
        super().__init__(role, input_kinds)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.input_quantizers[0](a), self.input_quantizers[1](b))
