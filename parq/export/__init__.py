"""Exporting a QAT-trained model.

* :func:`save_quantized` / :func:`load_quantized` (:mod:`parq.export.packed`, SPEC.md
  §10): one ``safetensors`` file holding each quantized parameter as its level sets and
  its level indices packed ``w = ceil(log2 K)`` bits each (:mod:`parq.export.format`);
  :func:`size_report` (:mod:`parq.export.size_report`) says what that saves.
  ``python -m parq.export report FILE`` prints the report of a saved file.
* conversion to torchao's low-bit tensors is the optimizer's own
  (``QuantOptimizer.torchao_convert`` / ``get_filter_fns``, :mod:`parq.optim.torchao_convert`:
  ``parq.optim`` never imports ``parq.export``); which torchao config each torchao
  quantizer converts with is :mod:`parq.quant.config_torchao`'s.

Nothing here imports torchao until it is used.
"""

from parq.export.format import PackedFormatError, PackedParam
from parq.export.packed import ExportResult, load_quantized, save_quantized
from parq.export.size_report import ParamSize, SizeReport, report_file, size_report

__all__ = ["save_quantized", "load_quantized", "size_report", "report_file", "SizeReport",
           "ParamSize", "ExportResult", "PackedParam", "PackedFormatError"]  # fmt: skip
