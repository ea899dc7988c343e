"""The profiling wrapper of ``QuantOptimizer.step``: torch's ``Optimizer.profile_hook_step``
(the step in a ``Optimizer.step#<class>.step`` profiler range, with the global and the
optimizer's step pre- and post-hooks around it), with torch's C++ range object
(``torch._C._profiler._RecordFunctionFast``) in place of ``torch.autograd.profiler.
record_function``.

``torch.optim.Optimizer`` wraps every optimizer's ``step`` this way; ``record_function``
enters and leaves its range through two ``torch.ops`` calls from Python, and on a small
model's step that is the largest single cost: ~8 us for the range itself, and the step run
inside it took ~25 us longer than outside it (8 weights of (16, 16), SGD, one thread, AMD
EPYC; with the C++ range: +2 us). The profiler sees the same range, by the same name; the
hooks run in torch's order with torch's rules (a pre-hook may return new ``(args, kwargs)``).
Where this torch lacks the C++ range or the hook registries, torch's own wrapper is used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import optimizer as torch_optimizer

_FAST_RANGE = getattr(torch._C._profiler, "_RecordFunctionFast", None)
_GLOBAL_PRE = getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)
_GLOBAL_POST = getattr(torch_optimizer, "_global_optimizer_post_hooks", None)


def profile_hook_step(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` (an optimizer's unbound ``step``) wrapped as torch's
    ``Optimizer.profile_hook_step`` wraps it, with the C++ profiler range."""
    if _FAST_RANGE is None or _GLOBAL_PRE is None or _GLOBAL_POST is None:
        return Optimizer.profile_hook_step(func)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        self = args[0]
        with _FAST_RANGE(f"Optimizer.step#{self.__class__.__name__}.step"):
            for pre_hook in chain(_GLOBAL_PRE.values(), self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(
                            f"{func} must return None or a tuple of (new_args, new_kwargs), "
                            f"but got {result}."
                        )
            out = func(*args, **kwargs)
            self._optimizer_step_code()
            for post_hook in chain(self._optimizer_step_post_hooks.values(), _GLOBAL_POST.values()):
                post_hook(self, args, kwargs)
            return out

    return wrapper
