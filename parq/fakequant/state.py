"""The state machine of quantized modules (SPEC.md §12).

Every :class:`QModule` (``QWrapper``, ``QOp``) has a :class:`QModuleState` that says
which of its quantizers run and which observers update:

| state | weights | activations |
|---|---|---|
| ``BYPASSED`` (1, default) | float | float |
| ``QUANT_AWARE_TRAIN_WEIGHT_ONLY`` (2) | observe + quantize | float |
| ``QUANT_AWARE_TRAIN_ACT_ONLY`` (3) | float | observe + quantize |
| ``QUANT_AWARE_TRAIN`` (4) | observe + quantize | observe + quantize |
| ``CALIBRATION`` (5) | observe | observe |
| ``CALIBRATION_WEIGHT_ONLY`` (6) | observe | float |
| ``CALIBRATION_ACT_ONLY`` (7) | float | observe |
| ``QUANT_EVAL_WEIGHT_ONLY`` (8) | quantize | float |
| ``QUANT_EVAL_ACT_ONLY`` (9) | float | quantize |
| ``QUANT_EVAL`` (10) | quantize | quantize |

"observe" calls the quantizer's ``pre_observe`` before and ``post_observe`` after;
calibration observes without quantizing (the module computes in float); evaluation
quantizes with the ranges frozen. The state is independent of ``train()`` / ``eval()``
(which only decide, as usual, batch or running BatchNorm statistics).

``set_qmodule_state(module, state)`` sets the state of every QModule in ``module``
(itself included); the context manager ``qmodule_state(module, state)`` does the same and
restores each module's previous state on exit. Under ``torch.compile`` the state is a
guard: a change recompiles once per state.
"""

from __future__ import annotations

import enum
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn

from parq.fakequant.quantizers import Quantizer


class QModuleState(enum.IntEnum):
    BYPASSED = 1
    QUANT_AWARE_TRAIN_WEIGHT_ONLY = 2
    QUANT_AWARE_TRAIN_ACT_ONLY = 3
    QUANT_AWARE_TRAIN = 4
    CALIBRATION = 5
    CALIBRATION_WEIGHT_ONLY = 6
    CALIBRATION_ACT_ONLY = 7
    QUANT_EVAL_WEIGHT_ONLY = 8
    QUANT_EVAL_ACT_ONLY = 9
    QUANT_EVAL = 10


@dataclass(frozen=True)
class Actions:
    """What a state does: observe / quantize weights, observe / quantize activations."""

    observe_weights: bool
    quantize_weights: bool
    observe_acts: bool
    quantize_acts: bool


_S = QModuleState
ACTIONS: dict[QModuleState, Actions] = {
    _S.BYPASSED: Actions(False, False, False, False),
    _S.QUANT_AWARE_TRAIN_WEIGHT_ONLY: Actions(True, True, False, False),
    _S.QUANT_AWARE_TRAIN_ACT_ONLY: Actions(False, False, True, True),
    _S.QUANT_AWARE_TRAIN: Actions(True, True, True, True),
    _S.CALIBRATION: Actions(True, False, True, False),
    _S.CALIBRATION_WEIGHT_ONLY: Actions(True, False, False, False),
    _S.CALIBRATION_ACT_ONLY: Actions(False, False, True, False),
    _S.QUANT_EVAL_WEIGHT_ONLY: Actions(False, True, False, False),
    _S.QUANT_EVAL_ACT_ONLY: Actions(False, False, False, True),
    _S.QUANT_EVAL: Actions(False, True, False, True),
}


def as_state(state: object) -> QModuleState:
    """``state`` as a :class:`QModuleState` (a member, its value 1..10 as any integer type,
    or its name, case-insensitive)."""
    if isinstance(state, QModuleState):
        return state
    if isinstance(state, numbers.Integral) and not isinstance(state, bool):
        try:
            return QModuleState(int(state))
        except ValueError:
            pass
    elif isinstance(state, str) and state.upper() in QModuleState.__members__:
        return QModuleState[state.upper()]
    names = ", ".join(s.name for s in QModuleState)
    raise ValueError(f"state must be a QModuleState ({names}) or its value 1..10, got {state!r}")


def apply_quantizer(
    quantizer: Quantizer | None, x: Tensor, observe: bool, quantize: bool
) -> Tensor:
    """Run ``quantizer`` on ``x`` as a state says: ``pre_observe`` / ``quantize`` /
    ``post_observe``. Returns ``x`` itself when nothing quantizes."""
    if quantizer is None:
        return x
    if observe:
        quantizer.pre_observe(x)
    if quantize:
        x = quantizer.quantize(x)
    if observe:
        quantizer.post_observe(x)
    return x


class QModule(nn.Module):
    """Base class of the modules that carry a :class:`QModuleState` (``qstate``)."""

    def __init__(self) -> None:
        super().__init__()
        self.qstate = QModuleState.BYPASSED

    @property
    def actions(self) -> Actions:
        # int comparisons, not ACTIONS[self.qstate]: torch.compile guards a compared int
        # attribute (a state change recompiles) but not a dict lookup keyed by an enum one
        state = int(self.qstate)
        for s, actions in ACTIONS.items():
            if state == int(s):
                return actions
        raise ValueError(f"qstate must be a QModuleState, got {self.qstate!r}")

    def extra_repr(self) -> str:
        return f"qstate={self.qstate.name}"


def _qmodules(module: nn.Module) -> list[QModule]:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    found = [m for m in module.modules() if isinstance(m, QModule)]
    if not found:
        raise ValueError(
            f"module ({type(module).__name__}) contains no QWrapper / QOp: wrap its layers "
            "first (QWrapper, QOp, FusedResNet, FusedMobileNetV2)"
        )
    return found


def set_qmodule_state(module: nn.Module, state: QModuleState | int | str) -> int:
    """Set the state of every QModule in ``module`` (itself included); returns how many."""
    state = as_state(state)
    found = _qmodules(module)
    for m in found:
        m.qstate = state
    return len(found)


@contextmanager
def qmodule_state(module: nn.Module, state: QModuleState | int | str) -> Iterator[nn.Module]:
    """``with qmodule_state(model, QModuleState.QUANT_EVAL): ...``: set every QModule's
    state for the block and restore each module's own previous state after it (also on
    an exception). Yields ``module``."""
    state = as_state(state)
    found = _qmodules(module)
    previous = [m.qstate for m in found]
    for m in found:
        m.qstate = state
    try:
        yield module
    finally:
        for m, old in zip(found, previous, strict=True):
            m.qstate = old


__all__ = [
    "QModuleState",
    "QModule",
    "Actions",
    "ACTIONS",
    "as_state",
    "apply_quantizer",
    "set_qmodule_state",
    "qmodule_state",
]
