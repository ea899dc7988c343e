"""Triton backend of the fused QuantOptimizer op (``parq_kernels::quant_prox_``).

Serves CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (set before
triton is imported) for testing. The math is SPEC.md §3-§4; the ground truth is
:mod:`parq_kernels.reference`.

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
"""

from parq_kernels.triton.launch import quant_prox_

__all__ = ["quant_prox_"]
