"""Triton backend of the fused QuantOptimizer ops (``parq_kernels::quant_prox_`` and
``parq_kernels::fused_step_``), of the packed-export ops (:mod:`.pack`) and of the DiffQ
ops (:mod:`.diffq`).

Serves CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (set before
triton is imported) for testing. The math is SPEC.md §3-§4 and §8; the ground
truth is :mod:`parq_kernels.reference` and :mod:`parq_kernels.reference_step`.

Design
------
*Rows to programs.* Each parameter of a call is a 2-D ``(rows, n)`` tensor
whose rows are quantization groups. Rows are cut into tiles
(:mod:`.plan`): short rows (``n <= 4096``) are packed whole, ``4096 //
next_pow2(n)`` rows per tile (fewer if fewer rows exist; 16x more under the
interpreter, where each program costs milliseconds); long rows (a per-tensor group, or wide
channels) are split into 4096-column chunks, one tile each. Tiles of one
``(ROWS, BLOCK)`` shape form a class; each class is one launch per phase,
so the number of launches depends on the distinct row-length classes of the
group, never on the number of parameters.

*Tables.* A per-call plan holds, per class, an int64 tile table (element
offsets of the tile in the params / latents / quants lists, relative to the
first tensor of each list; first global row; rows; valid columns; row stride;
parameter index; first partial slot; first column; "starts its row"), and a
row table (partial slots and length of each row). Plans are built once per
parameter set and cached, keyed on the tensors' addresses and shapes; nothing
is read back from the device.

*Passes.* Non-update steps: one ``_apply_kernel`` launch per class, a single
read of the weights, writing the latent copy and the projected weights
(nearest stored level, or interval lookup for soft/PARQ) and the non-finite
flag. Update steps first compute row statistics (:mod:`.stats`). When every
row lies whole in one tile (rows of at most 4096), one launch per class reads
the weights once and computes everything in registers: the mean (``center``),
the scale / extrema, and all greedy-LSBQ coefficients ``v_1..v_b``. Otherwise
(long rows) the statistics come in passes: a partial-reduction kernel over
tiles and a finalize kernel over rows that adds each row's partials in a fixed
order (deterministic; no atomics); one pass for ``center``, one for the scale /
extrema / ``v_1``, one more per further greedy bit (``v_k`` depends on the
whole row's ``v_{k-1}``). Optimal LSBQ instead scatters ``|x'|`` into a padded
``(rows, max_len)`` matrix that torch sorts and scans in float64 (batched, on
the device). A per-row kernel writes the levels ``Q`` (binary LSBQ levels are
then sorted by ``torch.sort``), and the apply pass uses the quantizer's own
``q`` (arithmetic, no search) and copies ``Q`` into ``quants``. So an update
step reads the weights twice (whole rows) and costs ``2 * classes + 1`` launches
(plus one ``torch.sort`` for binary levels); other steps read them once.

The apply kernel gets 16-byte alignment hints (``tl.multiple_of``) when
every offset and stride of its class allows vector loads.
Non-uniform lookups compare-and-select over the ``K`` levels for ``K <= 16``
and binary-search (gathers) for larger ``K``. Everything is computed in
float32; ``p`` and the latent copy are stored in the parameter's dtype.

Fused step
----------
``fused_step_`` (:mod:`.step`, kernels in :mod:`.step_kernels`, the update in
:mod:`.base_update`) applies torch's SGD / Adam / AdamW update to the latent
and then quantizes and projects it, with the same plan, passes and jit helpers
as ``quant_prox_``; only the read changes. The statistics and apply bodies
(``whole_rows_stats``, ``partial_stats``, ``flag_and_project``) are shared, so
both ops give the same values from the same ``x``. Like the CPU kernels
(csrc/cpu/sources.h), the base update is folded into the *first read* of each
tile, which writes the latent and the state and hands on the stored latent:

* non-update steps: one ``_step_apply_kernel`` launch per class, reading latent,
  gradient and state and writing latent, state and ``p``: per fp32 element
  16 B for SGD, 24 B for SGD with momentum, 32 B for Adam/AdamW (40 B with
  amsgrad);
* update steps, whole rows: ``_step_whole_rows_stats_kernel`` (base update +
  all statistics), levels, then ``_step_apply_kernel`` reading the updated
  latent and writing ``p`` only; long rows: the first partials pass applies
  the update, later passes and the apply pass read the latent. The launches
  are exactly those of ``quant_prox_`` (``2 * classes + 1`` for whole rows);
  the bytes are the non-update step's plus one read of the latent per
  statistics pass (whole rows: one pass, so 28 B for SGD with momentum, 36 B
  for AdamW). SPEC.md §8 asks "nothing added" for rows that fit on chip: that
  needs the levels and the projection in the statistics kernel itself (binary
  LSBQ levels sorted in registers), left for later; update steps come once
  per ``quant_period`` steps.

Gradients are reallocated by ``zero_grad(set_to_none=True)``, so they are not
in the cached plan: the launcher passes per-parameter gradient offsets
(relative to ``grads[0]``) as a small int64 device table, built per call on the
host and cached in an LRU keyed on the gradients' addresses (a miss costs one
asynchronous copy from pinned memory; nothing synchronizes with the host). The
optimizer state's offsets are stable and cached like the plan; each tile adds
its offset inside its parameter (``F_EOFF``). Vector hints (``ALIGN``) hold
only when all five lists allow them. Hyperparameters are kernel arguments
(float32) computed per call on the host, Adam's bias corrections in double as
torch does; option flags are one ``OPT`` constexpr. The update uses IEEE
division and square root (``div_rn``, ``sqrt_rn``) like torch's kernels.
"""

from parq_kernels.triton.diffq import diffq_noise_, diffq_noise_backward_, diffq_quantize_
from parq_kernels.triton.launch import quant_prox_
from parq_kernels.triton.pack import dequantize_, pack_, unpack_
from parq_kernels.triton.step import fused_step_

__all__ = ["quant_prox_", "fused_step_", "pack_", "unpack_", "dequantize_", "diffq_noise_",
           "diffq_noise_backward_", "diffq_quantize_"]  # fmt: skip
