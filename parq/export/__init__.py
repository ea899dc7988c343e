"""Exporting a QAT-trained model.

* :mod:`parq.export.torchao_convert`: ``QuantOptimizer.torchao_convert`` /
  ``get_filter_fns``, conversion to torchao's low-bit tensors (needs ``torchao``:
  ``pip install "parq[torchao]"``), with the config mapping in
  :mod:`parq.export.torchao_configs`.

Nothing here imports torchao until it is used.
"""
