"""ONNX Runtime on CPU or CUDA behind the runner life cycle."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from mame_export.runners.base import Feeds, Runner, TimedStep, cast_input
from mame_export.runners.decisions import with_decision_outputs

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _ort() -> Any:
    import onnxruntime as ort

    return ort


def ort_availability(provider: str) -> tuple[bool, str]:
    """Whether ONNX Runtime can run with ``provider`` ("cpu" or "cuda") here."""
    try:
        ort = _ort()
    except ImportError:
        return False, "onnxruntime is not installed"
    if provider == "cuda":
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - best effort, the provider list decides
                pass
        if PROVIDERS["cuda"] not in ort.get_available_providers():
            return False, "ONNX Runtime has no CUDAExecutionProvider (install onnxruntime-gpu)"
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device"
    return True, ""


class OrtRunner(Runner):
    """ONNX Runtime on CPU or CUDA (``provider`` = "cpu" or "cuda").

    ``spinning=False`` stops the intra-op threads from busy-waiting for work after
    a run. Leave it on for one session alone; turn it off when several sessions
    take turns on a few cores, where the idle sessions' spinning threads take the
    cores from the one that runs (measured: +60% latency on 2 cores).
    """

    def __init__(self, onnx_path: str | os.PathLike, provider: str = "cpu",
                 threads: int | None = None, spinning: bool = True,
                 name: str | None = None) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {sorted(PROVIDERS)}")
        self.path, self.provider, self.threads = Path(onnx_path), provider, threads
        self.spinning = spinning
        self.name = name or ("onnxrt-cuda" if provider == "cuda" else "onnxrt")
        self.session: Any = None
        self._input_types: dict[str, str] = {}
        # The decisions' session, its decision tensors and the graph's own outputs. While it
        # lives, the main session is released: one copy of the weights at a time (a large
        # denoiser's fp32 weights are gigabytes; two sessions did not fit 24 GiB).
        self._decisions: tuple[Any, list[str], list[str]] | None = None

    def availability(self) -> tuple[bool, str]:
        return ort_availability(self.provider)

    def _session(self, model: Path | bytes) -> Any:
        """A session on the graph at a path, or on a serialized graph whose external data
        (if any) lies beside ``self.path``."""
        ort = _ort()
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        if not self.spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if isinstance(model, bytes):
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                          str(self.path.resolve().parent))
        source = model if isinstance(model, bytes) else str(model)
        session = ort.InferenceSession(source, opts, providers=[PROVIDERS[self.provider]])
        if self.provider == "cuda" and PROVIDERS["cuda"] not in session.get_providers():
            raise RuntimeError("ONNX Runtime fell back from CUDA to CPU for this graph")
        return session

    def _activate(self) -> None:
        self.session = self._session(self.path)
        self._input_types = {i.name: i.type for i in self.session.get_inputs()}

    def _deactivate(self) -> None:
        self.session = None  # the session owns its device memory and threads
        self._decisions = None

    def _main(self) -> Any:
        """The graph's own session (made again, and the decisions' one let go, if the
        decisions' session had taken its place)."""
        self.activate()
        if self.session is None:
            self._decisions = None
            self._activate()
        return self.session

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._main().get_inputs()]

    def _feeds(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """Each input in the element type the graph declares (fp16 graphs take fp16)."""
        return {k: cast_input(v, self._input_types.get(k)) for k, v in feeds.items()}

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        session = self._main()
        names = [o.name for o in session.get_outputs()]
        outs = session.run(names, self._feeds(feeds))
        return {n: np.asarray(o, dtype=np.float32) for n, o in zip(names, outs, strict=True)}

    def infer_with_decisions(self, feeds: Feeds
                             ) -> tuple[dict[str, np.ndarray], list[np.ndarray]] | None:
        """A second session, on a copy of the graph that also outputs its decision tensors
        (the graph itself is left as it is, so its own run is what parity compares); the
        main session is let go while it lives, and made again by the next ``infer``."""
        self.activate()
        if self._decisions is None:
            model = onnx.load(str(self.path), load_external_data=False)
            names = [o.name for o in model.graph.output]  # no session needed to read them
            graph, decisions = with_decision_outputs(model)
            self.session = None  # released before the copy loads (see __init__)
            self._decisions = self._session(graph.SerializeToString()), decisions, names
        session, decisions, names = self._decisions
        fetch = list(dict.fromkeys(names + decisions))
        got = dict(zip(fetch, session.run(fetch, self._feeds(feeds)), strict=True))
        return ({n: np.asarray(got[n], dtype=np.float32) for n in names},
                [np.asarray(got[n], dtype=bool) for n in decisions])

    def _timed_step(self, feeds: Sequence[Feeds]) -> TimedStep:
        session = self._main()
        out_names = [o.name for o in session.get_outputs()]
        staged = [self._feeds(f) for f in feeds]
        if self.provider == "cpu":
            return TimedStep(lambda f: session.run(out_names, f), staged, hold=self)
        # CUDA: inputs staged on the device once (IO binding); outputs stay there, so no
        # host copies are timed. The wall clock stops when the outputs are ready.
        ort = _ort()
        bindings = []
        for f in staged:
            b = session.io_binding()
            for k, v in f.items():
                b.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0))
            for n in out_names:
                b.bind_output(n, "cuda")
            bindings.append(b)
        last: list[Any] = [bindings[0]]

        def run(b: Any) -> None:
            session.run_with_iobinding(b)
            last[0] = b

        return TimedStep(run, bindings, sync=lambda: last[0].synchronize_outputs(),
                         hold=self)
