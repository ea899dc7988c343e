"""Exporting a QAT-trained model.

* :mod:`parq.export.torchao_convert`: ``QuantOptimizer.torchao_convert`` /
  ``get_filter_fns``, conversion to torchao's low-bit tensors (needs ``torchao``:
  ``pip install "parq[torchao]"``); which torchao config each torchao quantizer
  converts with is :mod:`parq.quant.config_torchao`'s.

Nothing here imports torchao until it is used.
"""
