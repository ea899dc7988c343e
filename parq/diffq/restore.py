"""``restore_quantized_state(model, state)``: the public ``diffq`` package's way to load a
quantized state without the quantizer object (SPEC.md §11).

``state["meta"]`` names the quantizer class and its constructor arguments; the class is
rebuilt on ``model``, writes the weights (:meth:`BaseQuantizer.restore_quantized_state`,
entry format in :mod:`parq.diffq.state`) and is detached again. This module sits above the
three quantizers (it imports them; none of them imports it), so the dispatch needs no
import inside a function. A state written by the public ``diffq`` 0.2.x (no ``"format"``
entry) is read by :mod:`parq.diffq.diffq_files` instead.
"""

from __future__ import annotations

from torch import nn

from parq.diffq.diffq import DiffQuantizer
from parq.diffq.diffq_files import is_diffq_state, restore_diffq_state
from parq.diffq.lsq import LSQ
from parq.diffq.uniform import UniformQuantizer

CLASSES = {c.__name__: c for c in (DiffQuantizer, UniformQuantizer, LSQ)}


def restore_quantized_state(model: nn.Module, state: dict) -> None:
    """Rebuild the quantizer described by ``state["meta"]`` on ``model``, write the
    quantized weights into the model and remove the quantizer's hooks (a diffq 0.2.x state:
    :func:`~parq.diffq.diffq_files.restore_diffq_state`)."""
    if is_diffq_state(state):
        restore_diffq_state(model, state)
        return
    if not isinstance(state, dict) or "meta" not in state:
        raise ValueError("state must be a dict from get_quantized_state() (no 'meta' entry)")
    meta = state["meta"]
    name = meta["klass"] if isinstance(meta["klass"], str) else meta["klass"].__name__
    if name not in CLASSES:
        raise ValueError(f"state: unknown quantizer {name!r}; expected one of {list(CLASSES)}")
    quantizer = CLASSES[name](model, **meta["init_kwargs"])
    try:
        quantizer.restore_quantized_state(state)
    finally:
        quantizer.detach()
