"""The Python-backend model that ``mame-export triton --backend python`` writes as
``model.py``: it runs the version folder's ``model.onnx`` with ONNX Runtime on the CPU.

Copied verbatim into the repository, so it imports nothing from ``mame_export``: only numpy,
onnxruntime and the backend's own ``triton_python_backend_utils``. The requests of one
dynamic batch are concatenated along the batch axis and run as one session call.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

# The backend's stub embeds an isolated interpreter that ignores PYTHONPATH: take it here, so
# the server can be pointed at the environment that has numpy and onnxruntime.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                if p and p not in sys.path]

import numpy as np  # noqa: E402 - after the path above

# The ONNX graph's file name inside the version folder (the ONNX Runtime backend's default).
GRAPH_FILE = "model.onnx"


class TritonPythonModel:
    """One ONNX Runtime session per model instance."""

    def initialize(self, args: dict[str, Any]) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        folder = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        # Instances share the CPU: each takes one intra-op thread unless told otherwise.
        options.intra_op_num_threads = int(os.environ.get("MAME_TRITON_ORT_THREADS", "1"))
        self.session = ort.InferenceSession(os.path.join(folder, GRAPH_FILE), options,
                                            providers=["CPUExecutionProvider"])

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        # DLPack both ways, not as_numpy(): the stub's numpy bindings predate numpy 2 and read
        # a numpy 2 array's size wrong (an output then fails as "shape does not match size").
        feeds_per_request = [
            {n: np.from_dlpack(pb_utils.get_input_tensor_by_name(r, n)) for n in self.inputs}
            for r in requests]
        if self.batched and len(requests) > 1:
            sizes = [next(iter(f.values())).shape[0] for f in feeds_per_request]
            feeds = {n: np.concatenate([f[n] for f in feeds_per_request]) for n in self.inputs}
            results = self.session.run(self.outputs, feeds)
            cuts = np.cumsum(sizes)[:-1]
            per_request = list(zip(*(np.split(r, cuts) for r in results), strict=True))
        else:
            per_request = [self.session.run(self.outputs, f) for f in feeds_per_request]
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor.from_dlpack(n, np.ascontiguousarray(a))
            for n, a in zip(self.outputs, outs, strict=True)])
            for outs in per_request]
