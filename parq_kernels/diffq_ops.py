"""The op contracts of DiffQ (SPEC.md §11): noise injection, its backward, true quantization.

Three multi-tensor, in-place ops with the backend table of ``quant_prox_`` (reference,
cpu, triton; see :mod:`parq_kernels.backends`). One call serves every quantized parameter of a
model on one device. Tensor ``i`` is a weight ``w`` of ``n_i`` elements (any shape,
contiguous, float32 / float16 / bfloat16) cut into groups of ``G_i = group_sizes[i]``
consecutive elements (``G_i >= 1``; the last group may be short), with one float32 logit
per group: ``logits[i]`` is contiguous of ``ceil(n_i / G_i)`` elements. The math
(bits and noise scale ``D`` of a logit, ``param``: ``PARAM_BITS`` / ``PARAM_NOISE``) is
in :mod:`parq_kernels.reference_diffq`, the ground truth.

``diffq_noise_(weights, logits, noise, out, ranges, group_sizes, min_bits, max_bits,
param)``: ``out[i] = w + R_i * D[j // G] * noise[i]`` (written, shape and dtype of ``w``);
``noise[i]`` float32, shape of ``w`` (read: the caller draws ``N(0,1)/2`` or
``U(-1/2, 1/2)``); ``ranges`` float32 ``(len(weights),)`` gets ``R_i = max(w) - min(w)``
(0 for an empty tensor).

``diffq_noise_backward_(grad_out, logits, noise, ranges, grad_logits, group_sizes,
min_bits, max_bits, param)``: ``grad_logits[i][g] = dD/dl(l_g) * R_i * sum_{j in g}
grad_out[i][j] * noise[i][j]`` (written, float32, shape of ``logits[i]``); ``grad_out[i]``
has the shape of ``w`` and any float dtype. (The gradient of ``w`` is ``grad_out``
itself: ``R`` is held constant.)

``diffq_quantize_(weights, logits, out, levels, minmax, group_sizes, min_bits,
max_bits, param, extra_bits)``: ``out[i]`` (written, shape and dtype of ``w``) the true
quantized weights; ``levels`` is empty or holds, per tensor, an int16 tensor with
``n_i`` elements (written, the integer level of each element); ``minmax`` float32
``(len(weights), 2)`` gets ``(min(w), max(w))``.
"""

from __future__ import annotations

import torch
from torch import Tensor

import parq_kernels.ops  # noqa: F401  (defines the "parq_kernels" namespace first)
from parq_kernels.reference_diffq import PARAM_BITS, PARAM_NOISE

NOISE_SCHEMA = (
    "diffq_noise_(Tensor[] weights, Tensor[] logits, Tensor[] noise, Tensor(a!)[] out, "
    "Tensor(b!) ranges, int[] group_sizes, float min_bits, float max_bits, int param, "
    'str backend="") -> ()'
)
NOISE_BACKWARD_SCHEMA = (
    "diffq_noise_backward_(Tensor[] grad_out, Tensor[] logits, Tensor[] noise, Tensor ranges, "
    "Tensor(a!)[] grad_logits, int[] group_sizes, float min_bits, float max_bits, int param, "
    'str backend="") -> ()'
)
QUANTIZE_SCHEMA = (
    "diffq_quantize_(Tensor[] weights, Tensor[] logits, Tensor(a!)[] out, Tensor(b!)[] levels, "
    "Tensor(c!) minmax, int[] group_sizes, float min_bits, float max_bits, int param, "
    'float extra_bits, str backend="") -> ()'
)
DIFFQ_OPS = ("diffq_noise_", "diffq_noise_backward_", "diffq_quantize_")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)

_lib = torch.library.Library("parq_kernels", "FRAGMENT")
_lib.define(NOISE_SCHEMA)
_lib.define(NOISE_BACKWARD_SCHEMA)
_lib.define(QUANTIZE_SCHEMA)


def num_groups(numel: int, group_size: int) -> int:
    """``ceil(numel / group_size)``: logits of a tensor of ``numel`` elements."""
    return -(-numel // group_size)


def _impl(tensors: list[Tensor], backend: str, op: str):
    from parq_kernels import backends

    name = backends.resolve(tensors[0].device, backend or None, op=op)
    return backends.get_impl(name, op)


def check_args(op: str, weights: list[Tensor], logits: list[Tensor], group_sizes: list[int],
               min_bits: float, max_bits: float, param: int, others: dict[str, list[Tensor]],
               weight_dtype_of: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Raise ``ValueError`` naming the tensor for arguments outside the contract (module
    doc); ``others`` maps a name to tensors of the shape of the weights (and of their
    dtype for the names in ``weight_dtype_of``; float32 otherwise)."""
    n = len(weights)
    if len(logits) != n or len(group_sizes) != n:
        raise ValueError(f"{op}: {n} weights but {len(logits)} logits and {len(group_sizes)} "
                         "group sizes")  # fmt: skip
    if param not in (PARAM_BITS, PARAM_NOISE):
        raise ValueError(f"{op}: param must be {PARAM_BITS} (bits) or {PARAM_NOISE} (noise)")
    if not 1 <= min_bits < max_bits:
        raise ValueError(f"{op}: need 1 <= min_bits < max_bits, got {min_bits}, {max_bits}")
    device = weights[0].device if weights else None
    for i, (w, lg, G) in enumerate(zip(weights, logits, group_sizes, strict=True)):
        if w.dtype not in FLOATS or not w.is_contiguous() or w.device != device:
            raise ValueError(f"{op}: weights[{i}] must be a contiguous float tensor on {device}")
        if G < 1:
            raise ValueError(f"{op}: group_sizes[{i}] must be >= 1, got {G}")
        want = num_groups(w.numel(), G)
        if (lg.dtype != torch.float32 or lg.numel() != want or not lg.is_contiguous()
                or lg.device != device):  # fmt: skip
            raise ValueError(f"{op}: logits[{i}] must be contiguous float32 with {want} "
                             f"elements on {device}, got {lg.dtype} with {lg.numel()}")  # fmt: skip
        for name, tensors in others.items():
            if not tensors and name == "levels":
                continue
            t = tensors[i]
            dtype = w.dtype if name in weight_dtype_of else (
                torch.int16 if name == "levels" else torch.float32)  # fmt: skip
            if (t.dtype != dtype or t.numel() != w.numel() or not t.is_contiguous()
                    or t.device != device):  # fmt: skip
                raise ValueError(f"{op}: {name}[{i}] must be a contiguous {dtype} tensor with "
                                 f"{w.numel()} elements on {device}, got {t.dtype} with "
                                 f"{t.numel()} on {t.device}")  # fmt: skip


def _check_vector(op: str, name: str, t: Tensor, shape: tuple[int, ...], device) -> None:
    if t.dtype != torch.float32 or tuple(t.shape) != shape or (device and t.device != device):
        raise ValueError(f"{op}: {name} must be float32 of shape {shape} on {device}, got "
                         f"{t.dtype} of shape {tuple(t.shape)}")  # fmt: skip


def _noise_impl(weights, logits, noise, out, ranges, group_sizes, min_bits, max_bits, param,
                backend=""):  # fmt: skip
    others = {"noise": noise, "out": out}
    check_args("diffq_noise_", weights, logits, group_sizes, min_bits, max_bits, param, others,
               ("out",))  # fmt: skip
    if weights:
        _check_vector("diffq_noise_", "ranges", ranges, (len(weights),), weights[0].device)
        _impl(weights, backend, "diffq_noise_")(
            weights, logits, noise, out, ranges, group_sizes, min_bits, max_bits, param
        )


def _noise_backward_impl(grad_out, logits, noise, ranges, grad_logits, group_sizes, min_bits,
                         max_bits, param, backend=""):  # fmt: skip
    others = {"noise": noise}
    check_args("diffq_noise_backward_", grad_out, logits, group_sizes, min_bits, max_bits, param,
               others)  # fmt: skip
    if grad_out:
        device = grad_out[0].device
        _check_vector("diffq_noise_backward_", "ranges", ranges, (len(grad_out),), device)
        for i, (gl, lg) in enumerate(zip(grad_logits, logits, strict=True)):
            if gl.dtype != torch.float32 or gl.shape != lg.shape or not gl.is_contiguous():
                raise ValueError(f"diffq_noise_backward_: grad_logits[{i}] must be contiguous "
                                 "float32 of the shape of logits[{i}]")  # fmt: skip
        _impl(grad_out, backend, "diffq_noise_backward_")(
            grad_out, logits, noise, ranges, grad_logits, group_sizes, min_bits, max_bits, param
        )


def _quantize_impl(weights, logits, out, levels, minmax, group_sizes, min_bits, max_bits, param,
                   extra_bits, backend=""):  # fmt: skip
    others = {"out": out, "levels": levels}
    if levels and len(levels) != len(weights):
        raise ValueError(f"diffq_quantize_: levels must be empty or hold {len(weights)} tensors")
    check_args("diffq_quantize_", weights, logits, group_sizes, min_bits, max_bits, param,
               others, ("out",))  # fmt: skip
    if weights:
        _check_vector("diffq_quantize_", "minmax", minmax, (len(weights), 2), weights[0].device)
        _impl(weights, backend, "diffq_quantize_")(weights, logits, out, levels, minmax,
                                                    group_sizes, min_bits, max_bits, param,
                                                    extra_bits)  # fmt: skip


_lib.impl("diffq_noise_", _noise_impl, "CompositeExplicitAutograd")
_lib.impl("diffq_noise_backward_", _noise_backward_impl, "CompositeExplicitAutograd")
_lib.impl("diffq_quantize_", _quantize_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("parq_kernels::diffq_noise_")
def _noise_fake(*args, **kwargs):
    return None


@torch.library.register_fake("parq_kernels::diffq_noise_backward_")
def _noise_backward_fake(*args, **kwargs):
    return None


@torch.library.register_fake("parq_kernels::diffq_quantize_")
def _quantize_fake(*args, **kwargs):
    return None


def diffq_noise_(weights: list[Tensor], logits: list[Tensor], noise: list[Tensor],
                 out: list[Tensor], ranges: Tensor, group_sizes: list[int], min_bits: float,
                 max_bits: float, param: int, backend: str = "") -> None:  # fmt: skip
    """``out[i] = w + R * D * noise[i]`` and ``ranges[i] = R`` (module doc)."""
    torch.ops.parq_kernels.diffq_noise_(weights, logits, noise, out, ranges,
                                        [int(g) for g in group_sizes], float(min_bits),
                                        float(max_bits), int(param), backend)  # fmt: skip


def diffq_noise_backward_(grad_out: list[Tensor], logits: list[Tensor], noise: list[Tensor],
                          ranges: Tensor, grad_logits: list[Tensor], group_sizes: list[int],
                          min_bits: float, max_bits: float, param: int,
                          backend: str = "") -> None:  # fmt: skip
    """The gradient of the logits of :func:`diffq_noise_` (module doc)."""
    torch.ops.parq_kernels.diffq_noise_backward_(grad_out, logits, noise, ranges, grad_logits,
                                                 [int(g) for g in group_sizes], float(min_bits),
                                                 float(max_bits), int(param), backend)  # fmt: skip


def diffq_quantize_(weights: list[Tensor], logits: list[Tensor], out: list[Tensor],
                    levels: list[Tensor], minmax: Tensor, group_sizes: list[int],
                    min_bits: float, max_bits: float, param: int, extra_bits: float,
                    backend: str = "") -> None:  # fmt: skip
    """True quantization of ``weights`` into ``out`` (and ``levels``) (module doc)."""
    torch.ops.parq_kernels.diffq_quantize_(weights, logits, out, levels, minmax,
                                           [int(g) for g in group_sizes], float(min_bits),
                                           float(max_bits), int(param), float(extra_bits),
                                           backend)  # fmt: skip


__all__ = ["diffq_noise_", "diffq_noise_backward_", "diffq_quantize_", "num_groups",
           "check_args", "DIFFQ_OPS", "PARAM_BITS", "PARAM_NOISE"]  # fmt: skip
