"""Fake quantizers: modules that round a tensor onto a low-bit grid and return it in float.

Every method in benchsuite is built from these. A quantizer has three states that matter to a
method's calibration loop:

- *observing*: it records statistics of what flows through it and returns the input unchanged,
  so a whole network can be calibrated in float in one pass;
- *initialized*: it has quantization parameters (from :meth:`Quantizer.finalize` or
  :meth:`UniformQuantizer.set_params`) and fake-quantizes when enabled;
- *disabled* (``enabled=False``): identity, so a method can switch parts of the network back to
  float (e.g. to calibrate activations on float weights) without removing quantizers.

With ``lazy_init=True`` an enabled quantizer that has no parameters yet initializes itself on the
first tensor it sees (observe + finalize on that tensor) and quantizes it at once. This is the
reference code's calibration of RepQ-ViT: one forward with every quantizer enabled calibrates all
of them in execution order, each on inputs that already passed the quantized upstream layers.

:class:`UniformQuantizer` initializes by min-max (``init="minmax"``) or by the percentile/MSE
search of :mod:`benchsuite.quant.init_search` (``init="percentile_mse"``), which keeps the
observed tensors until :meth:`~Quantizer.finalize`, or by the L_p grid search of QDrop and
ADFQ-ViT (``init="lp_search"``). :class:`LogSqrt2Quantizer` is the log√2 quantizer for
post-softmax attention probabilities.

Rounding uses a straight-through estimator so reconstruction-based methods can back-propagate
through quantized layers; ``straight_through=False`` switches to plain rounding (zero gradient to
the input through the rounding), which is how ADFQ-ViT's reference code trains. A method that
learns a step size calls ``make_scale_learnable()``, which turns the ``scale`` buffer into an
``nn.Parameter`` with the same values (LSQ-style gradients then reach it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from benchsuite.quant.init_search import (
    DEFAULT_LP_NORM,
    DEFAULT_PERCENTILES,
    search_log_sqrt2_scale,
    search_uniform_lp,
    search_uniform_rows,
    to_rows,
)

__all__ = [
    "Granularity",
    "InitMethod",
    "Log2Quantizer",
    "LogSqrt2Quantizer",
    "Quantizer",
    "UniformQuantizer",
    "clamp_inclusive",
    "round_ste",
]

Granularity = Literal["tensor", "channel"]
InitMethod = Literal["minmax", "percentile_mse", "lp_search"]

#: Lower bound of a step size: a constant tensor (max == min) would otherwise give Δ = 0.
MIN_SCALE = 1e-8
#: Integer codes are held in float32, which represents integers exactly only up to 2**24.
MAX_BITS = 16


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, identity in the backward pass (straight-through).

    ``x + (round(x) - x).detach()`` equals ``round(x)`` exactly in float: ``round(x) - x`` is
    exact (Sterbenz) and adding ``x`` back lands on the representable integer ``round(x)``.
    """
    return x + (torch.round(x) - x).detach()


def clamp_inclusive(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``clamp(x, low, high)`` whose gradient is 1 on the closed interval and 0 outside.

    ``torch.clamp`` gives a zero (scalar bounds) or halved (tensor bounds) gradient at the bounds
    themselves. After rounding, every value within half a step of either end of the grid lands
    exactly on a bound, so that would cut the straight-through gradient of a whole band of
    in-range values, a large share of them at 2 to 4 bits.
    """
    inside = (x >= low) & (x <= high)
    return torch.where(inside, x, x.detach().clamp(low, high))


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``grad`` summed over the dimensions along which ``like`` was broadcast."""
    if grad.shape == like.shape:
        return grad
    extra = grad.ndim - like.ndim
    grad = grad.sum(dim=tuple(range(extra))) if extra > 0 else grad
    dims = tuple(i for i, size in enumerate(like.shape) if size == 1 and grad.shape[i] != 1)
    return (grad.sum(dim=dims, keepdim=True) if dims else grad).reshape(like.shape)


class _FakeQuantSTE(torch.autograd.Function):
    """Uniform fake quantization with straight-through rounding, as one autograd node.

    The same values and gradients as ``(clamp_inclusive(round_ste(x/Δ) + z, 0, qmax) - z)·Δ``
    written with separate ops (up to float rounding of the gradients), which records about ten
    elementwise nodes per quantizer call; during reconstruction those nodes took a quarter of a
    step (torch profiler, deit_small, I&S-ViT). Gradients: x gets ``grad`` where the code is in
    ``[0, qmax]``; Δ gets ``round(x/Δ) - x/Δ`` there and ``code - z`` where clamped (LSQ); z gets
    ``-Δ`` where clamped.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmax):  # noqa: D102 - see the class docstring
        ratio = x / scale
        rounded = torch.round(ratio)
        codes = rounded + zero_point
        inside = (codes >= 0) & (codes <= qmax)
        codes.clamp_(0, qmax)
        centered = codes.sub_(zero_point)
        out = centered * scale
        scale_grad = None
        if ctx.needs_input_grad[1]:
            scale_grad = torch.where(inside, rounded.sub_(ratio), centered)
        ctx.save_for_backward(inside, scale_grad, scale, zero_point)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        inside, scale_grad, scale, zero_point = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_scale = _sum_to(grad * scale_grad, scale) if ctx.needs_input_grad[1] else None
        grad_zero = None
        if ctx.needs_input_grad[2]:
            grad_zero = _sum_to(grad * (~inside) * (-scale), zero_point)
        return grad_x, grad_scale, grad_zero, None


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will track an op on ``tensors`` (else a cheaper in-place path is fine)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class Quantizer(nn.Module):
    """Base of all fake quantizers: the observe / initialize / enable state machine.

    Subclasses implement :meth:`observe`, :meth:`finalize`, :meth:`fake_quantize`,
    :attr:`initialized` and :meth:`reset`; :meth:`forward` dispatches on the state so every
    quantizer behaves the same inside a calibration loop:

    - ``observing``: record statistics, return ``x`` itself (even when disabled, so ranges can be
      collected while the network still runs in float);
    - enabled and initialized: fake-quantize;
    - enabled, not initialized and ``lazy_init``: initialize on ``x`` (observe + finalize), then
      fake-quantize it;
    - otherwise (disabled, or never calibrated): return ``x`` unchanged.
    """

    def __init__(self, bits: int, enabled: bool = True, *, lazy_init: bool = False) -> None:
        super().__init__()
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_BITS:
            raise ValueError(f"bits must be an int in [1, {MAX_BITS}], got {bits!r}")
        self.bits = bits
        self.enabled = enabled
        self.observing = False
        self.lazy_init = lazy_init

    @property
    def n_levels(self) -> int:
        """Number of integer codes, 2**bits."""
        return 2**self.bits

    @property
    def qmax(self) -> int:
        """Largest integer code; codes run from 0 to ``qmax``."""
        return self.n_levels - 1

    @property
    def initialized(self) -> bool:
        """Whether quantization parameters are set (forward quantizes only then)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget observed statistics and quantization parameters."""
        raise NotImplementedError

    def observe(self, x: torch.Tensor) -> None:
        """Fold ``x`` into the running statistics (no gradient, no change to ``x``)."""
        raise NotImplementedError

    def finalize(self) -> None:
        """Turn the observed statistics into quantization parameters."""
        raise NotImplementedError

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize and dequantize ``x`` with the current parameters."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            with torch.no_grad():
                self.observe(x.detach())
            return x
        if self.enabled and not self.initialized and self.lazy_init:
            with torch.no_grad():
                self.observe(x.detach())
                self.finalize()
        if self.enabled and self.initialized:
            return self.fake_quantize(x)
        return x

    def extra_repr(self) -> str:
        state = "observing" if self.observing else ("ready" if self.initialized else "uncalibrated")
        lazy = ", lazy_init=True" if self.lazy_init else ""
        return f"bits={self.bits}, enabled={self.enabled}, {state}{lazy}"

    # -- helpers for tensors that are buffers until a method makes them learnable ----------------

    def _set_tensor(self, name: str, value: torch.Tensor) -> None:
        """Store ``value`` under ``name``, keeping whether it is a buffer or a Parameter.

        A Parameter of the same shape is overwritten in place, so an optimizer that already holds
        it keeps training the new values; one of another shape is replaced by a new Parameter
        (an optimizer built before must then be rebuilt).
        """
        current = self._parameters.get(name)
        if current is None:
            setattr(self, name, value)
            return
        value = value.detach().to(device=current.device, dtype=current.dtype)
        if current.shape == value.shape:
            with torch.no_grad():
                current.copy_(value)
        else:
            self._parameters[name] = nn.Parameter(value.clone(), requires_grad=current.requires_grad)

    def _make_learnable(self, name: str) -> nn.Parameter:
        """Turn the calibrated buffer ``name`` into an ``nn.Parameter`` with the same values."""
        current = getattr(self, name)
        if isinstance(current, nn.Parameter):
            return current
        if current.numel() == 0:
            raise RuntimeError(
                f"{type(self).__name__}.{name} is empty: calibrate the quantizer before making it learnable"
            )
        delattr(self, name)
        parameter = nn.Parameter(current.detach().clone())
        self.register_parameter(name, parameter)
        return parameter

    def _make_buffer(self, name: str, value: torch.Tensor) -> None:
        """Store ``value`` as the buffer ``name``, turning a learnable Parameter back into a buffer."""
        if name in self._parameters:
            delattr(self, name)
            self.register_buffer(name, value)
        else:
            setattr(self, name, value)

    #: Tensors that take their shape at calibration (resized to the saved shapes on load).
    SHAPED_AT_CALIBRATION: ClassVar[tuple[str, ...]] = ()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A calibrated state must load into a fresh quantizer, whose tensors are still empty.
        self._resize_for_load(state_dict, prefix, self.SHAPED_AT_CALIBRATION)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _take_samples(self) -> torch.Tensor:
        """Every tensor kept by ``observe`` since the last finalize, as one (rows, values) tensor,
        and release them (a search consumes its samples once)."""
        samples: list[torch.Tensor] = getattr(self, "_samples", [])
        self._samples = []
        return samples[0] if len(samples) == 1 else torch.cat(samples, dim=1)

    def _resize_for_load(self, state_dict: dict[str, Any], prefix: str, names: Sequence[str]) -> None:
        """Give the tensors ``names`` the shapes saved in ``state_dict`` before loading into them.

        Calibrated tensors start empty and take their shape at calibration, so a calibrated state
        could not load into a fresh quantizer otherwise. Buffers are always replaced (as before
        learnable parameters existed); a Parameter stays a Parameter and is replaced only when
        its shape differs, so an optimizer holding it keeps it.
        """
        for name in names:
            saved = state_dict.get(prefix + name)
            if not isinstance(saved, torch.Tensor):
                continue
            current = getattr(self, name)
            empty = torch.empty(saved.shape, dtype=current.dtype, device=current.device)
            if not isinstance(current, nn.Parameter):
                setattr(self, name, empty)
            elif current.shape != saved.shape:
                self._parameters[name] = nn.Parameter(empty, requires_grad=current.requires_grad)


class UniformQuantizer(Quantizer):
    """Asymmetric uniform fake quantizer, per tensor or per channel, with STE rounding.

    ``x_int = clamp(round(x / Δ) + z, 0, 2**b - 1)`` and ``x̂ = (x_int - z) · Δ``. The gradient
    of ``x̂`` with respect to ``x`` is 1 where ``x`` maps inside the grid and 0 where it is
    clamped (the standard STE), and flows to ``Δ`` as in LSQ if a method makes it a Parameter.

    With ``init="minmax"`` (the default) calibration is plain min-max over every observed batch:
    ``Δ = (max - min) / (2**b - 1)`` (at least :data:`MIN_SCALE`) and ``z = round(-min / Δ)``.
    The range is *not* widened to contain 0, so for one-signed data ``z`` may fall outside
    ``[0, 2**b - 1]``; this is fake quantization, so only the grid matters, and it covers exactly
    the observed range. With ``symmetric=True`` the grid is centred on 0 instead:
    ``Δ = 2·absmax / (2**b - 1)``, ``z = 2**(b-1)`` (PyTorch's symmetric convention), still
    stored as unsigned codes.

    With ``init="percentile_mse"`` (RepQ-ViT's initialization; asymmetric only) :meth:`observe`
    also keeps a copy of every observed tensor (all batches together, as if concatenated along
    the batch dim) and :meth:`finalize` runs
    :func:`~benchsuite.quant.init_search.search_uniform_rows` on them: for each ``p`` in
    ``percentiles`` clip at ``quantile(x, p)`` and ``quantile(x, 1 - p)``, keep the lowest MSE,
    per tensor or per channel. ``finalize`` releases the kept tensors; observing more and
    finalizing again searches only the tensors observed since. The running min/max are kept as
    in min-max mode.

    Parameters live in the buffers ``scale`` and ``zero_point`` (float32; ``zero_point`` holds
    integers when set by :meth:`finalize`). They hold one element per tensor, or one per channel
    laid out along ``channel_dim`` with size 1 elsewhere, for the rank of the observed tensors, so
    ``weight / q.scale`` broadcasts as expected. :meth:`fake_quantize` reshapes them to the rank of
    its input, so the same quantizer serves (B, N, C) and (B, C) activations alike. Before
    calibration the buffers are empty.

    Reductions use ``amin``/``amax``, and the search uses ``topk``/sort-based order statistics
    (never ``torch.quantile``), so tensors of any size work.

    With ``init="lp_search"`` (per tensor, asymmetric only) the observed tensors are kept likewise
    and :func:`~benchsuite.quant.init_search.search_uniform_lp` picks (Δ, z) minimizing the mean
    ``|x - x̂|^lp_norm`` (L_2.4 by default): QDrop's search, used by ADFQ-ViT for Q, K and V.

    ``straight_through=False`` rounds with plain ``torch.round`` when autograd is on: no gradient
    reaches ``x`` through the rounding (ADFQ-ViT's reference gradient mode), while a learnable Δ
    still gets ``x_int - z`` from the dequantizing multiplication. Forward values are identical.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(
        self,
        bits: int,
        granularity: Granularity = "tensor",
        channel_dim: int = -1,
        symmetric: bool = False,
        enabled: bool = True,
        *,
        init: InitMethod = "minmax",
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        lazy_init: bool = False,
        lp_norm: float = DEFAULT_LP_NORM,
        straight_through: bool = True,
    ) -> None:
        super().__init__(bits, enabled, lazy_init=lazy_init)
        if granularity not in ("tensor", "channel"):
            raise ValueError(f"granularity must be 'tensor' or 'channel', got {granularity!r}")
        if init not in ("minmax", "percentile_mse", "lp_search"):
            raise ValueError(f"init must be 'minmax', 'percentile_mse' or 'lp_search', got {init!r}")
        if init in ("percentile_mse", "lp_search") and symmetric:
            raise ValueError(f"the {init} search is for the asymmetric quantizer only")
        if init == "lp_search" and granularity != "tensor":
            raise ValueError("the lp_search initialization is per tensor only")
        if not lp_norm > 0:
            raise ValueError(f"lp_norm must be positive, got {lp_norm!r}")
        self.granularity: Granularity = granularity
        self.channel_dim = channel_dim
        self.symmetric = symmetric
        self.init: InitMethod = init
        self.percentiles = _check_percentiles(percentiles)
        self.lp_norm = float(lp_norm)
        self.straight_through = straight_through
        #: Observed tensors as (rows, values), kept for the search until finalize (not saved).
        self._samples: list[torch.Tensor] = []
        # Empty until calibrated; _load_from_state_dict resizes them so a calibrated state loads.
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))
        # Running statistics, 1-D (one entry per channel, or one entry), float32.
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))
        self._observed_ndim: int | None = None

    # -- state -------------------------------------------------------------------------------

    @property
    def per_channel(self) -> bool:
        return self.granularity == "channel"

    @property
    def initialized(self) -> bool:
        return self.scale.numel() > 0

    @property
    def has_observations(self) -> bool:
        """Whether :meth:`observe` saw at least one non-empty tensor since the last reset."""
        return self.min_val.numel() > 0

    def reset(self) -> None:
        """Forget statistics and parameters; a learnable ``scale`` becomes a buffer again."""
        for name in ("scale", "zero_point", "min_val", "max_val"):
            self._make_buffer(name, torch.empty(0, device=getattr(self, name).device))
        self._observed_ndim = None
        self._samples = []

    def make_scale_learnable(self) -> nn.Parameter:
        """Turn the calibrated ``scale`` buffer into an ``nn.Parameter`` (same values) and return it.

        Gradients then reach Δ LSQ-style through the straight-through forward (or only through
        the dequantizing multiplication with ``straight_through=False``). ``zero_point`` stays a
        frozen buffer. :meth:`finalize` and :meth:`set_params` overwrite the Parameter in place
        when the shape is unchanged; :meth:`reset` turns it back into an empty buffer.
        """
        return self._make_learnable("scale")

    # -- calibration -------------------------------------------------------------------------

    def _channel_axis(self, ndim: int) -> int:
        """``channel_dim`` as a non-negative axis of an ``ndim``-D tensor (checked, not wrapped)."""
        if not -ndim <= self.channel_dim < ndim:
            raise ValueError(f"channel_dim {self.channel_dim} does not exist in a {ndim}-D tensor")
        return self.channel_dim % ndim

    def _reduce_dims(self, x: torch.Tensor) -> list[int]:
        """All dims of ``x`` except the channel dim (all dims when per tensor)."""
        if not self.per_channel:
            return list(range(x.ndim))
        channel = self._channel_axis(x.ndim)
        return [d for d in range(x.ndim) if d != channel]

    def observe(self, x: torch.Tensor) -> None:
        """Update the running min/max with ``x`` (per channel along ``channel_dim`` if asked)."""
        if x.numel() == 0:
            return
        x = x.detach()
        dims = self._reduce_dims(x)
        # amin/amax with an empty dim list would be a no-op reduction, not a full one.
        low = (x.amin(dim=dims) if dims else x).float().reshape(-1)
        high = (x.amax(dim=dims) if dims else x).float().reshape(-1)
        if self.has_observations:
            if low.shape != self.min_val.shape:
                raise ValueError(
                    f"observed {low.numel()} channels along dim {self.channel_dim}, "
                    f"earlier batches had {self.min_val.numel()}"
                )
            low = torch.minimum(self.min_val, low)
            high = torch.maximum(self.max_val, high)
        self.min_val, self.max_val = low, high
        self._observed_ndim = x.ndim
        if self.init in ("percentile_mse", "lp_search"):
            axis = self._channel_axis(x.ndim) if self.per_channel else 0
            self._samples.append(_private_rows(x, self.granularity, axis))

    def finalize(self) -> None:
        """Compute ``scale`` and ``zero_point`` from the observed min/max.

        Raises ``RuntimeError`` when nothing was observed: a silently uncalibrated quantizer would
        leave its op in float and inflate a method's accuracy.
        """
        if not self.has_observations:
            raise RuntimeError(f"{self.__class__.__name__} cannot finalize: it observed no data")
        if self.init in ("percentile_mse", "lp_search"):
            if not self._samples:
                raise RuntimeError(
                    f"{self.__class__.__name__} cannot finalize: no tensors kept since the last "
                    f"finalize (the {self.init} search consumes them)"
                )
            rows = self._take_samples()
            if self.init == "lp_search":
                scale, zero_point = search_uniform_lp(rows, self.bits, self.lp_norm, min_scale=MIN_SCALE)
            else:
                scale, zero_point, _ = search_uniform_rows(rows, self.bits, self.percentiles, MIN_SCALE)
            self._set_tensor("scale", self._layout(scale.float()))
            self.zero_point = self._layout(zero_point.float())
            return
        low, high = self.min_val, self.max_val
        if self.symmetric:
            absmax = torch.maximum(low.abs(), high.abs())
            scale = (2 * absmax / self.qmax).clamp_min(MIN_SCALE)
            zero_point = torch.full_like(scale, float(2 ** (self.bits - 1)))
        else:
            scale = ((high - low) / self.qmax).clamp_min(MIN_SCALE)
            zero_point = torch.round(-low / scale)
        self._set_tensor("scale", self._layout(scale))
        self.zero_point = self._layout(zero_point)

    def _layout(self, values: torch.Tensor) -> torch.Tensor:
        """1-D parameters → (1,) per tensor, or C along ``channel_dim`` for the observed rank."""
        if not self.per_channel or self._observed_ndim is None:
            return values.reshape(-1)
        shape = [1] * self._observed_ndim
        shape[self._channel_axis(self._observed_ndim)] = values.numel()
        return values.reshape(shape)

    def set_params(self, scale: torch.Tensor | float, zero_point: torch.Tensor | float) -> None:
        """Set Δ and z directly, for methods that choose them otherwise than by min-max.

        Both must have one element (per tensor) or the same number of elements (per channel);
        any broadcastable layout is kept as given and reshaped to each input at forward time.
        ``zero_point`` is stored as given (RepQ-ViT's reference code uses an unrounded one).
        """
        scale_t = torch.as_tensor(scale, dtype=torch.float32).detach().clone()
        zero_t = torch.as_tensor(zero_point, dtype=torch.float32).detach().clone()
        if scale_t.ndim == 0:
            scale_t = scale_t.reshape(1)
        if zero_t.ndim == 0:
            zero_t = zero_t.reshape(1)
        if zero_t.numel() == 1 and scale_t.numel() > 1:
            zero_t = zero_t.reshape(-1).expand(scale_t.numel()).reshape(scale_t.shape).clone()
        if scale_t.numel() != zero_t.numel():
            raise ValueError(f"scale has {scale_t.numel()} elements, zero_point {zero_t.numel()}")
        if not self.per_channel and scale_t.numel() != 1:
            raise ValueError(f"a per-tensor quantizer takes one scale, got {scale_t.numel()}")
        if scale_t.numel() == 0 or not bool((scale_t > 0).all()):
            raise ValueError("scale must be non-empty and strictly positive")
        self._set_tensor("scale", scale_t.to(self.scale.device))
        self.zero_point = zero_t.reshape(scale_t.shape).to(self.scale.device)

    def set_per_tensor(self, scale: torch.Tensor | float, zero_point: torch.Tensor | float) -> None:
        """Turn this quantizer into a per-tensor one with Δ = ``scale`` and z = ``zero_point``.

        For RepQ-ViT-style reparameterization, where a calibrated per-channel input quantizer is
        replaced by the per-tensor (s̃, z̃) of :mod:`benchsuite.quant.reparam`. The running
        statistics and kept tensors are dropped (they were per channel).
        """
        device = self.scale.device
        self.granularity = "tensor"
        self.min_val = torch.empty(0, device=device)
        self.max_val = torch.empty(0, device=device)
        self._observed_ndim = None
        self._samples = []
        self.set_params(scale, zero_point)

    # -- quantization ------------------------------------------------------------------------

    def _broadcast(self, param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``param`` shaped to broadcast against ``x`` along ``channel_dim``."""
        if param.numel() == 1:
            return param.reshape(())
        channel = self._channel_axis(x.ndim)
        if x.shape[channel] != param.numel():
            raise ValueError(
                f"quantizer has {param.numel()} channels, input has {x.shape[channel]} "
                f"along dim {self.channel_dim} (shape {tuple(x.shape)})"
            )
        shape = [1] * x.ndim
        shape[channel] = -1
        return param.reshape(shape)

    def quant_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Δ, z) broadcastable against ``x``."""
        return self._broadcast(self.scale, x), self._broadcast(self.zero_point, x)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.quant_params(x)
        if not needs_grad(x, scale, zero_point) or not (self.straight_through or needs_grad(scale, zero_point)):
            # Same arithmetic, in place and without the straight-through bookkeeping: evaluation
            # and calibration spend most of their quantization time here. Plain rounding with a
            # fixed (Δ, z) passes no gradient at all, so it takes this path under autograd too.
            with torch.no_grad():
                x_int = torch.div(x, scale).round_().add_(zero_point).clamp_(0, self.qmax)
                return x_int.sub_(zero_point).mul_(scale).to(x.dtype)
        if self.straight_through:
            return _FakeQuantSTE.apply(x, scale, zero_point, float(self.qmax)).to(x.dtype)
        x_int = clamp_inclusive(torch.round(x / scale) + zero_point, 0, self.qmax)
        return ((x_int - zero_point) * scale).to(x.dtype)

    # -- serialization -----------------------------------------------------------------------

    SHAPED_AT_CALIBRATION: ClassVar[tuple[str, ...]] = ("scale", "zero_point", "min_val", "max_val")

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"granularity={self.granularity!r}"]
        if self.per_channel:
            parts.append(f"channel_dim={self.channel_dim}")
        if self.symmetric:
            parts.append("symmetric=True")
        if self.init != "minmax":
            parts.append(f"init={self.init!r}")
        if self.init == "lp_search":
            parts.append(f"lp_norm={self.lp_norm:g}")
        if not self.straight_through:
            parts.append("straight_through=False")
        if isinstance(self.scale, nn.Parameter):
            parts.append("learnable_scale=True")
        return ", ".join(parts)


def _check_percentiles(percentiles: Sequence[float]) -> tuple[float, ...]:
    chosen = tuple(float(p) for p in percentiles)
    if not chosen or any(not 0.0 <= p <= 1.0 for p in chosen):
        raise ValueError(f"percentiles must be a non-empty sequence in [0, 1], got {list(percentiles)}")
    return chosen


def _private_rows(x: torch.Tensor, granularity: Granularity, channel_axis: int) -> torch.Tensor:
    """``x`` as (rows, values) in its own memory (the caller may later edit ``x`` in place)."""
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    rows = to_rows(x, granularity, channel_axis)
    if rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        rows = rows.clone()
    return rows


class LogSqrt2Quantizer(Quantizer):
    """log√2 fake quantizer for post-softmax attention probabilities (RepQ-ViT), with STE.

    One scalar Δ, the largest level; no zero point. With ``L = 2**b``:

        q = round(-2 · log2(A / Δ))
        Â = Δ · 2^(-q/2)   for q clamped to [0, L - 1]
        Â = 0              where q ≥ L (underflow) or A ≤ 0

    so the output is one of ``{0} ∪ {Δ·2^(-k/2) : k = 0 .. L-1}`` (``L + 1`` symbols, as in the
    reference code): values above Δ map to Δ, values below the smallest level's rounding
    boundary ``Δ·2^(-(L - 1/2)/2)`` map to 0 rather than to the smallest level.

    Δ is chosen by :func:`~benchsuite.quant.init_search.search_log_sqrt2_scale`: candidates
    ``quantile(A, p)`` for ``p`` in ``percentiles``, lowest MSE wins. :meth:`observe` keeps the
    observed tensors until :meth:`finalize` (which releases them). The rounding of ``q`` is
    straight-through: where a value maps inside the grid, ``dÂ/dA = Â/A`` (about 1); where ``q``
    is clamped to 0 or underflows, the gradient is 0. With ``straight_through=False`` (ADFQ-ViT's
    reference gradient mode) the rounding is plain ``torch.round``: no gradient reaches ``A``, and
    Δ (if a method makes it a Parameter) gets only ``2^(-q/2)`` from the multiplication.

    Δ lives in the buffer ``scale`` (one float32 element; empty before calibration).
    """

    #: Codes per factor of 2 between levels: 2 for log√2, 1 for :class:`Log2Quantizer`.
    CODES_PER_OCTAVE: ClassVar[int] = 2

    scale: torch.Tensor

    def __init__(
        self,
        bits: int,
        enabled: bool = True,
        *,
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        lazy_init: bool = False,
        straight_through: bool = True,
    ) -> None:
        super().__init__(bits, enabled, lazy_init=lazy_init)
        self.percentiles = _check_percentiles(percentiles)
        self.straight_through = straight_through
        self.register_buffer("scale", torch.empty(0))
        self._samples: list[torch.Tensor] = []

    @property
    def delta(self) -> torch.Tensor:
        """Δ, the largest representable value (alias of ``scale``)."""
        return self.scale

    @property
    def initialized(self) -> bool:
        return self.scale.numel() > 0

    @property
    def has_observations(self) -> bool:
        """Whether tensors were observed and not yet consumed by :meth:`finalize`."""
        return bool(self._samples)

    def reset(self) -> None:
        self.scale = torch.empty(0, device=self.scale.device)
        self._samples = []

    def observe(self, x: torch.Tensor) -> None:
        """Keep a flat copy of ``x`` for the Δ search."""
        if x.numel() == 0:
            return
        self._samples.append(_private_rows(x.detach(), "tensor", 0))

    def finalize(self) -> None:
        """Search Δ on every tensor observed since the last finalize, then release them."""
        if not self._samples:
            raise RuntimeError(f"{self.__class__.__name__} cannot finalize: it observed no data")
        rows = self._take_samples()
        self._set_tensor("scale", self._search_scale(rows).float())

    def _search_scale(self, rows: torch.Tensor) -> torch.Tensor:
        """Δ for the kept ``rows`` (one row: every observed value)."""
        return search_log_sqrt2_scale(rows, self.bits, self.percentiles, MIN_SCALE)

    def make_scale_learnable(self) -> nn.Parameter:
        """Turn the calibrated Δ into an ``nn.Parameter`` (same value) and return it.

        The gradient reaches Δ through the straight-through forward (AIQViT trains it).
        """
        return self._make_learnable("scale")

    def set_params(self, scale: torch.Tensor | float) -> None:
        """Set Δ directly (a positive scalar)."""
        scale_t = torch.as_tensor(scale, dtype=torch.float32).detach().clone().reshape(-1)
        if scale_t.numel() != 1 or not bool((scale_t > 0).all()):
            raise ValueError(f"Δ must be one strictly positive value, got {scale!r}")
        self.scale = scale_t.to(self.scale.device)

    def levels(self) -> torch.Tensor:
        """The ``2**b`` non-zero output levels ``Δ·2^(-k/2)``, k = 0 .. 2**b - 1 (descending)."""
        if not self.initialized:
            raise RuntimeError("LogSqrt2Quantizer has no Δ yet")
        codes = torch.arange(self.n_levels, dtype=self.scale.dtype, device=self.scale.device)
        return self.scale.reshape(()) * torch.exp2(-codes / self.CODES_PER_OCTAVE)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.scale.reshape(()).to(x.dtype)
        if not needs_grad(x, delta) or not (self.straight_through or needs_grad(delta)):
            # Plain rounding with a fixed Δ passes no gradient at all (ADFQ-ViT's post-softmax
            # quantizer in its reference gradient mode): no autograd nodes on attention maps.
            with torch.no_grad():
                codes = torch.div(x, delta).log2_().mul_(-self.CODES_PER_OCTAVE).round_()
                # NaN (x < 0), +inf (x = 0) and codes past the last level all underflow to 0.
                underflow = (codes < self.n_levels).logical_not_()
                values = codes.clamp_(0, self.qmax).mul_(-1.0 / self.CODES_PER_OCTAVE).exp2_().mul_(delta)
                return values.masked_fill_(underflow, 0).to(x.dtype)
        positive = x > 0
        # Non-positive entries take log2(1) = 0 here (finite, so no NaN gradient) and become 0 below.
        ratio = torch.where(positive, x, delta) / delta
        exponents = -self.CODES_PER_OCTAVE * torch.log2(ratio)
        codes = round_ste(exponents) if self.straight_through else torch.round(exponents)
        underflow = ~positive | (codes.detach() >= self.n_levels)
        values = delta * torch.exp2(-clamp_inclusive(codes, 0, self.qmax) / self.CODES_PER_OCTAVE)
        return torch.where(underflow, torch.zeros_like(values), values).to(x.dtype)

    #: Tensors that take their shape at calibration (resized to the saved shapes on load).
    SHAPED_AT_CALIBRATION: ClassVar[tuple[str, ...]] = ("scale",)

    def extra_repr(self) -> str:
        parts = [super().extra_repr()]
        if self.initialized:
            parts.append(f"delta={float(self.scale):.6g}")
        if not self.straight_through:
            parts.append("straight_through=False")
        return ", ".join(parts)


class Log2Quantizer(LogSqrt2Quantizer):
    """log2 fake quantizer for post-softmax probabilities: levels ``Δ·2^(-k)``, k = 0 .. 2**b - 1.

    The post-softmax quantizer of FQ-ViT / PTQ4ViT-style baselines, and the "log2 instead of SULQ"
    ablation of I&S-ViT. Same state, search (percentile candidates for Δ, lowest MSE) and
    underflow-to-zero rule as :class:`LogSqrt2Quantizer`, one code per octave instead of two.
    """

    CODES_PER_OCTAVE: ClassVar[int] = 1

    def _search_scale(self, rows: torch.Tensor) -> torch.Tensor:
        from benchsuite.quant.shift_log import search_log_scale  # shift_log imports this module

        return search_log_scale(rows, self.bits, 1, self.percentiles)
