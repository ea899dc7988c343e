"""BinaryConnect on the CUDA backend: its pass with HARD, then the clamp.

``ProxKind.BINARYCONNECT`` is ``hard(x)`` for the weights plus BinaryConnect's clipped
latent (SPEC.md §9): ``latent = clamp(latent, Q_0, Q_{K-1})`` per row after the base
update (``gamma Q`` with the shrink, the latent being unshrunk). The CPU and Triton
kernels clamp inside their write pass (``csrc/cpu/sources.h``,
``parq_kernels/triton/apply.py``). The CUDA kernel (which could not be built or run
here) projects with HARD; :func:`serve_binaryconnect` wraps its ops so that a
BINARYCONNECT call runs the kernel with HARD and then :func:`reference.clamp_latents_`
over the latents and the (fresh or stored) levels: one extra read and write of the
latent, the same float32 clamp as the reference.
"""

from __future__ import annotations

from collections.abc import Callable

from parq_kernels import reference
from parq_kernels.kinds import ProxKind

# (index of prox_kind, of latents, of quants, of gamma) in each op's positional arguments
_POSITIONS = {"quant_prox_": (9, 1, 2, 11), "fused_step_": (15, 1, 6, 17)}


def serve_binaryconnect(op: str, fn: Callable) -> Callable:
    """``fn`` (a backend's ``op``), serving ``ProxKind.BINARYCONNECT`` as HARD + clamp."""
    kind_at, lat_at, q_at, gamma_at = _POSITIONS[op]

    def call(*args):
        if int(args[kind_at]) != ProxKind.BINARYCONNECT:
            return fn(*args)
        args = list(args)
        args[kind_at] = int(ProxKind.HARD)
        fn(*args)
        reference.clamp_latents_(args[lat_at], args[q_at], float(args[gamma_at]))
        return None

    call.__name__ = getattr(fn, "__name__", op)
    return call
