"""torch's "compiling the optimizer" pattern, ``torch.compile`` of a function that calls
``opt.step()`` (issue 22 item 13): the step runs eagerly inside it (``QuantOptimizer.step``
is ``torch.compiler.disable``d: a graph break) and equals the eager step bit for bit on
every path. Before, the fused step raised dynamo's "A view was created in no_grad mode".
In a child process: dynamo patches torch.optim process-wide once it has compiled."""

from __future__ import annotations

import textwrap

from child_process import run_child

CHILD = textwrap.dedent(
    """
    import torch
    from parq.optim import ProxPARQ, QuantOptimizer
    from parq.quant import UnifQuantizer

    def make(path):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(8, 32)) for _ in range(2)]
        base = torch.optim.AdamW([{"params": ps, "quant_bits": 2}], lr=1e-2)
        opt = QuantOptimizer(base, UnifQuantizer(), ProxPARQ(0, 20), quant_period=3,
                             quant_per_channel=True, **path)
        return ps, opt

    for path in ({}, {"fuse_base_step": False}, {"fused": False}):
        (ps, opt), (qs, eager) = make(path), make(path)

        @torch.compile
        def compiled_step():
            opt.step()

        for s in range(5):  # level updates at steps 0 and 3, PARQ's schedule moving
            g = torch.Generator().manual_seed(s)
            for p, q in zip(ps, qs):
                p.grad = torch.randn(p.shape, generator=g)
                q.grad = p.grad.clone()
            compiled_step()
            eager.step()
        assert all(torch.equal(p, q) for p, q in zip(ps, qs)), path
        assert all(torch.equal(opt.state[p]["latent"], eager.state[q]["latent"])
                   for p, q in zip(ps, qs)), path
        print("ok", path)
    """
)


def test_compiled_step_equals_the_eager_step():
    out = run_child(CHILD)
    assert out.count("ok") == 3, out
