"""``DiffQuantizer``: differentiable quantization with learned bit widths (SPEC.md §11).

One logit per group of ``group_size`` consecutive elements (one per tensor when
``group_size=0``), registered on the owning module as ``<name><suffix>``. Training
forward: ``w + R * D * e`` (pseudo-quantization noise, one fused op for the model);
eval: the true quantized weights (one fused op). ``model_size()`` is differentiable in
the logits, so ``loss + penalty * model_size()`` trades accuracy for size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from parq.diffq.base import BaseQuantizer, QParam, _check_float, _check_int
from parq.diffq.functions import GroupConfig, inject_noise, true_quantize
from parq.diffq.state import minmax_entry, pack_levels, restore_entries
from parq_kernels.reference_diffq import (
    MAX_QUANT_BITS,
    PARAM_BITS,
    PARAM_NOISE,
    bits_from_logits,
    logits_from_bits,
    true_bits,
)

PARAMS = {"bits": PARAM_BITS, "noise": PARAM_NOISE}
NOISES = ("gaussian", "uniform")


class DiffQuantizer(BaseQuantizer):
    """DiffQ (Défossez et al., 2022) with the arguments of the public ``diffq`` package.

    Args: ``model``; ``min_size`` (MB: smaller parameters stay float); ``float16``
    (unquantized parameters count 16 bits, else 32); ``group_size`` (elements per learned
    bit width, 0: one per tensor); ``min_bits`` / ``max_bits`` (range of the bits);
    ``param`` (``"bits"`` or ``"noise"``: what the sigmoid of a logit interpolates);
    ``noise`` (``"gaussian"`` or ``"uniform"``); ``init_bits``; ``extra_bits`` (added to
    the learned bits for the true quantization and the size); ``suffix``; ``exclude``
    (fnmatch patterns); ``detect_bound`` (tied parameters once).
    """

    needs_optimizer = True

    def __init__(
        self,
        model: nn.Module,
        min_size: float = 0.01,
        float16: bool = False,
        group_size: int = 1,
        min_bits: float = 2,
        max_bits: float = 15,
        param: str = "bits",
        noise: str = "gaussian",
        init_bits: float = 8,
        extra_bits: float = 0,
        suffix: str = "_diffq",
        exclude: list[str] | tuple[str, ...] = (),
        detect_bound: bool = True,
    ) -> None:
        group_size = _check_int("group_size", group_size, 0)
        min_bits = _check_float("min_bits", min_bits, 1.0)
        max_bits = _check_float("max_bits", max_bits)
        if not min_bits < max_bits <= MAX_QUANT_BITS:
            raise ValueError(f"need min_bits < max_bits <= {MAX_QUANT_BITS}, got min_bits="
                             f"{min_bits}, max_bits={max_bits}")  # fmt: skip
        if param not in PARAMS:
            raise ValueError(f"param must be one of {list(PARAMS)}, got {param!r}")
        if noise not in NOISES:
            raise ValueError(f"noise must be one of {list(NOISES)}, got {noise!r}")
        init_bits = _check_float("init_bits", init_bits)
        if not min_bits <= init_bits <= max_bits:
            raise ValueError(f"init_bits must be in [min_bits, max_bits] = [{min_bits}, "
                             f"{max_bits}], got {init_bits}")  # fmt: skip
        extra_bits = _check_float("extra_bits", extra_bits)
        if not isinstance(suffix, str) or not suffix:
            raise ValueError(f"suffix must be a non-empty string, got {suffix!r}")
        self.group_size, self.min_bits, self.max_bits = group_size, min_bits, max_bits
        self.param, self.noise, self.init_bits = param, noise, init_bits
        self.extra_bits, self.suffix = extra_bits, suffix
        self.generator: torch.Generator | None = None  # noise source (None: torch's default)
        self.backend = ""  # of the fused ops: "" picks automatically (parq_kernels.backends)
        super().__init__(model, min_size, float16, exclude, detect_bound)
        for qp in self._qparams:
            ng = self._num_groups(qp)
            init = torch.full((ng,), init_bits)
            self._register(qp, suffix, logits_from_bits(init, min_bits, max_bits, self._code))

    @property
    def _code(self) -> int:
        return PARAMS[self.param]

    def _group(self, qp: QParam) -> int:
        """Elements per group of ``qp`` (its numel when ``group_size=0``; at least 1)."""
        return max(1, self.group_size or qp.param.numel())

    def _num_groups(self, qp: QParam) -> int:
        return -(-qp.param.numel() // self._group(qp))

    def _config(self) -> GroupConfig:
        return GroupConfig(tuple(self._group(qp) for qp in self._qparams), self.min_bits,
                           self.max_bits, self._code, self.extra_bits, self.backend)  # fmt: skip

    def _init_kwargs(self) -> dict:
        return super()._init_kwargs() | {
            "group_size": self.group_size, "min_bits": self.min_bits, "max_bits": self.max_bits,
            "param": self.param, "noise": self.noise, "init_bits": self.init_bits,
            "extra_bits": self.extra_bits, "suffix": self.suffix}  # fmt: skip

    # -- bits <-> logits -------------------------------------------------------------
    def _get_bits(self, logit: Tensor) -> Tensor:
        """The (fractional, differentiable) bits of each group of a logit tensor."""
        return bits_from_logits(logit, self.min_bits, self.max_bits, self._code)

    def _get_logit(self, bits: Tensor) -> Tensor:
        """The logits whose bits are ``bits`` (the inverse of :meth:`_get_bits`)."""
        return logits_from_bits(bits, self.min_bits, self.max_bits, self._code)

    def get_bits(self) -> dict[str, Tensor]:
        """The learned bits of every quantized parameter (by full name), detached."""
        return {qp.name: self._get_bits(qp.logit.detach()) for qp in self._qparams}

    # -- forward ---------------------------------------------------------------------
    def _weights_logits(self) -> tuple[list[Tensor], list[Tensor]]:
        return [qp.param for qp in self._qparams], [qp.logit for qp in self._qparams]

    def _train_weights(self) -> list[Tensor]:
        weights, logits = self._weights_logits()
        return inject_noise(weights, logits, self._config(), self.noise, self.generator)

    def _eval_weights(self) -> list[Tensor]:
        weights, logits = self._weights_logits()
        return true_quantize(weights, logits, self._config())[0]

    # -- size ------------------------------------------------------------------------
    def _qparam_size(self, qp: QParam, exact: bool) -> Tensor:
        if exact:
            b = true_bits(qp.logit.detach(), self.min_bits, self.max_bits, self._code,
                          self.extra_bits)  # fmt: skip
        else:
            b = self.extra_bits + self._get_bits(qp.logit)
        G, ng = min(self._group(qp), max(1, qp.param.numel())), b.numel()  # G <= numel
        span = max(1.0, 1 + round(float(b.detach().max())) - self.min_bits)
        return G * b.sum() + 64 + 8 + math.ceil(math.log2(span)) * ng

    # -- quantized state -------------------------------------------------------------
    def _quantized_entries(self, packed: bool) -> list[dict]:
        if not self._qparams:
            return []
        weights, logits = self._weights_logits()
        _, levels, minmax = true_quantize(weights, logits, self._config(), with_levels=True)
        entries = []
        for qp, lv, (mn, mx) in zip(self._qparams, levels, minmax, strict=True):
            b = true_bits(qp.logit.detach(), self.min_bits, self.max_bits, self._code,
                          self.extra_bits)  # fmt: skip
            entries.append(minmax_entry(qp.param, self._group(qp), b, mn, mx, lv))
        if packed:
            pack_levels(entries)
        return entries

    def _restore_entries(self, entries: list[dict]) -> None:
        for qp, entry in zip(self._qparams, entries, strict=True):
            if int(entry["group_size"]) != self._group(qp):
                raise ValueError(f"state: {qp.name} has group size {entry['group_size']}, the "
                                 f"quantizer {self._group(qp)}")  # fmt: skip
        restore_entries(self._qparams, entries)
