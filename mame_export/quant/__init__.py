"""INT8 QDQ graphs that keep the merge exact (``--precision int8``).

- :mod:`~mame_export.quant.scope`: the merge runs under a name scope (``mame_merge``) that
  the exporter writes into every node it makes; :func:`~mame_export.quant.scope.merge_nodes`
  reads it back. The one rule the quantizer, the audit and the tests share.
- :mod:`~mame_export.quant.calib`: calibration images read with the model family's own
  preprocessing (or seeded random inputs, with a warning).
- :mod:`~mame_export.quant.qdq`: ONNX Runtime's ``quantize_static`` in QDQ form, signed
  symmetric INT8 (zero points 0: TensorRT's explicit quantization), per-channel weights,
  the merge's nodes excluded; and a per-layer error report (ONNX Runtime's
  ``qdq_loss_debug``).

This package imports nothing itself: the audit (below the request layer) imports only
``quant.scope``.
"""
