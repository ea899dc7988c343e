"""parq benchmark suite: ``python -m benchmarks [--quick|--full|--smoke] [--out DIR]``.

* :mod:`benchmarks.environment` — versions, device, backends, copy bandwidth
* :mod:`benchmarks.op_bench` — the fused op ``quant_prox_`` per backend
* :mod:`benchmarks.step_bench` — whole ``QuantOptimizer.step()`` on model-shaped parameters
* :mod:`benchmarks.report` — derived columns, tables, CSV/JSON/Markdown/PNG

See ``benchmarks/README.md`` for how to read the results.
"""
