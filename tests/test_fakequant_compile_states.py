"""A compiled model follows its QModule states (issue 22 item 1): after
``set_qmodule_state`` the compiled model observes, quantizes or bypasses as the state
says, like the eager model (before, dynamo kept the first state's graph: QUANT_EVAL still
updated the observer, BYPASSED still quantized). In a child process: dynamo's caches and
patches are process-wide. backend="eager": what is tested is dynamo's guards, not a
compiler."""

from __future__ import annotations

import textwrap

from child_process import run_child

CHILD = textwrap.dedent(
    """
    import copy
    import torch
    from torch import nn
    from parq.fakequant import AffineQuantizer, ExpAvgMinMax, QModuleState, QWrapper
    from parq.fakequant import set_qmodule_state

    torch.manual_seed(0)
    m = QWrapper(nn.Linear(8, 8), acts_quantizer=AffineQuantizer(8, ExpAvgMinMax(0.9)))
    twin = copy.deepcopy(m)  # stepped eagerly
    cm = torch.compile(m, backend="eager")
    S = QModuleState
    order = [S.QUANT_AWARE_TRAIN, S.QUANT_EVAL, S.BYPASSED, S.CALIBRATION, S.QUANT_AWARE_TRAIN,
             S.QUANT_EVAL_ACT_ONLY, S.BYPASSED, S.QUANT_EVAL]
    for i, state in enumerate(order):
        set_qmodule_state(m, state)
        set_qmodule_state(twin, state)
        x = torch.randn(4, 8) * (1 + i)
        y, want = cm(x), twin(x)
        assert torch.equal(y, want), (state, (y - want).abs().max())
        for (k, a), (_, b) in zip(m.state_dict().items(), twin.state_dict().items()):
            assert torch.equal(a, b), (state, k)
        print("ok", state.name)
    """
)


def test_compiled_model_follows_each_state_change():
    out = run_child(CHILD)
    assert out.count("ok") == 8, out
