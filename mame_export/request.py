"""An export request: every setting that decides a graph, checked before any work."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mame_export.errors import UserError
from mame_export.export import PRECISIONS
from mame_export.patch import DEFAULT_TAU
from mame_export.plan import check_ratio, check_target_macs, check_tau

# Limits checked before any work starts.
MAX_BATCH = 4096  # also the dynamic batch axis's upper bound in the graph
MAX_PARITY_BATCHES = 1000
MAX_SEED = 2**63 - 1
# The opsets every export is tested at (tests/test_reliability.py exports each): the
# dynamo exporter writes 18 and converts up; 17 cannot be written, and at 23 it emits
# the ONNX Attention op, whose mask ONNX Runtime's CPU provider rejects.
OPSETS = (18, 22)


@dataclass
class ExportRequest:
    """Everything that decides an export; recorded verbatim in the metadata."""

    model: str
    r: float = 0.5
    target_macs: float | None = None  # solve r for this MACs ratio instead
    tau: float | None = None  # None: the mode's default (patch.DEFAULT_TAU)
    layers: list[int] | None = None
    mode: str = "static"
    prop_attn: bool = True
    batch: int | None = None  # None: the model's default (2 for UNets: CFG)
    dynamic_batch: bool = False
    img_size: int | None = None
    weights: str = "auto"
    opset: int = 18
    precision: str = "fp32"
    out_dir: Path = Path("graphs")
    parity_batches: int = 3
    seed: int | None = None
    runners: tuple[str, ...] = ("onnxrt", "onnxrt-cuda")  # compared against eager PyTorch
    llava: bool = False  # export what LLaVA's projector consumes (families with "llava")
    trt: Any = None  # mame_export.trt.engine.EngineOptions when an engine is wanted
    engines_dir: Path = Path("engines")

    def validate(self, export: bool = True, check_opset: bool = True) -> None:
        """One-line UserErrors for bad settings, before any work; ``export=False`` allows
        adaptive mode (a plan or an eager run, not a graph); ``check_opset=False`` accepts
        any recorded opset (a graph's sidecar: parity does not export)."""
        try:
            check_ratio(self.r)
            if self.tau is not None:
                check_tau(self.tau)
            if self.target_macs is not None:
                check_target_macs(self.target_macs)
        except ValueError as e:
            raise UserError(str(e)) from None
        if self.mode not in ("static", "adaptive"):
            raise UserError(f"--mode must be static or adaptive; got {self.mode!r}")
        if export and self.mode != "static":
            raise UserError(
                f"mode {self.mode!r} cannot be exported: adaptive MaMe has data-dependent token "
                "counts (eager only); export with --mode static"
            )
        # (An empty list is the library's "no merge block"; the CLI refuses an empty --layers.)
        if self.layers is not None and any(not _is_int(i) or i < 0 for i in self.layers):
            raise UserError(f"--layers must be block indices >= 0; got {self.layers}")
        if self.batch is not None and not (_is_int(self.batch) and 1 <= self.batch <= MAX_BATCH):
            raise UserError(f"--batch must be in [1, {MAX_BATCH}]; got {self.batch}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if check_opset and not (_is_int(self.opset) and OPSETS[0] <= self.opset <= OPSETS[1]):
            raise UserError(f"--opset must be in [{OPSETS[0]}, {OPSETS[1]}] (the opsets "
                            f"mame-export exports and tests); got {self.opset}")
        if self.img_size is not None and not (_is_int(self.img_size) and self.img_size >= 1):
            raise UserError(f"--img-size must be positive; got {self.img_size}")
        check_parity_settings(self.parity_batches, self.seed)
        if self.trt is not None:
            self.trt.validate()
            if self.trt.precision != self.precision:
                raise UserError("engine and graph precision must match (strongly typed engines)")
            for flag, v in (("--min-batch", self.trt.min_batch), ("--opt-batch",
                            self.trt.opt_batch), ("--max-batch", self.trt.max_batch)):
                if v is not None and v > MAX_BATCH:
                    raise UserError(f"{flag} must be at most {MAX_BATCH}; got {v}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_parity_settings(batches: int, seed: int | None) -> None:
    """One-line UserErrors for parity settings out of range (checked before any work)."""
    if not (_is_int(batches) and 1 <= batches <= MAX_PARITY_BATCHES):
        raise UserError(f"--parity-batches must be in [1, {MAX_PARITY_BATCHES}]; got {batches}")
    if seed is not None and not (_is_int(seed) and 0 <= seed <= MAX_SEED):
        raise UserError(f"--seed must be in [0, 2**63 - 1]; got {seed}")


def settings_tag(req: ExportRequest) -> str:
    """8 hex digits naming every setting that changes the graph but is not spelled out in
    its file name (tau, layers, proportional attention, mode, weights, opset): two exports
    that differ in any of them never share a file."""
    tau = DEFAULT_TAU.get(req.mode, 1.0) if req.tau is None else req.tau
    weights = req.weights if req.weights in ("auto", "random") else \
        str(Path(req.weights).resolve())
    key = {"tau": float(tau), "layers": sorted(set(req.layers)) if req.layers else "default",
           "prop_attn": bool(req.prop_attn), "mode": req.mode, "weights": weights,
           "opset": req.opset}
    if req.llava:  # only when set, so the names of earlier graphs stay the same
        key["llava"] = True
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
