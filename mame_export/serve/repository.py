"""Writing a Triton model repository: ``DIR/<name>/config.pbtxt`` and
``DIR/<name>/<version>/`` with the graph (``model.onnx`` and its external data) or the engine
(``model.<gpu>.plan``), the sidecars beside it, and ``model.py`` for the Python backend.

A new model folder, or a new version folder in an existing one, is built in a private folder
and moved into place with one rename: a run that fails leaves the repository as it was, and
adding a version never touches the versions already there.
"""

from __future__ import annotations

import inspect
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from mame_export.artifacts import (
    atomic_write_text,
    check_out_dir,
    clean_stale_dirs,
    commit_dir,
    make_dirs,
    private_dir,
    remove_dirs,
)
from mame_export.errors import check_file, path_problem, stderr_log, warn
from mame_export.graph import GraphReadError, graph_precision, load_graph
from mame_export.serve import backend_model
from mame_export.serve.config import (
    DEFAULT_MAX_BATCH,
    ModelIO,
    ServeError,
    ServeOptions,
    build_config,
    check_config,
    check_model_name,
    config_text,
    model_config_pb2,
    model_io,
    model_name_for,
    parse_config,
)

ENGINE_SUFFIXES = (".plan", ".engine")


class EngineGpuError(ServeError):
    """A TensorRT engine built for another GPU model than the repository is for."""


@dataclass
class Prepared:
    """A source ready to be written: its IO, the files of its version folder (destination
    name -> source path, or text) and what the config needs."""

    io: ModelIO
    platform: str
    precision: str
    max_batch: int
    default_name: str = "model"
    files: dict[str, Path] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    default_file: str | None = None
    cc_files: dict[str, str] = field(default_factory=dict)


def _external_data(graph: Path, model: onnx.ModelProto) -> list[str]:
    names = sorted({e.value for init in model.graph.initializer
                    if init.data_location == onnx.TensorProto.EXTERNAL
                    for e in init.external_data if e.key == "location"})
    for n in names:
        if path_problem(graph.parent / n) is not None:
            raise GraphReadError(f"graph {graph} keeps its weights in {n}, which "
                                 f"{path_problem(graph.parent / n)}")
    return names


def _max_batch(io: ModelIO, opts: ServeOptions, profile_max: int | None = None) -> int:
    if not io.dynamic_batch:
        if opts.max_batch is not None or opts.preferred_batch:
            raise ServeError(f"the graph has a fixed batch of {io.batch}, so max_batch_size is 0 "
                             "and --max-batch/--preferred-batch cannot apply; export with "
                             "--dynamic-batch to let Triton batch requests")
        return 0
    if profile_max is not None:
        if opts.max_batch is not None and opts.max_batch > profile_max:
            raise ServeError(f"--max-batch {opts.max_batch} is above the engine's profile "
                             f"maximum {profile_max}; rebuild it with --max-batch")
        return opts.max_batch or profile_max
    return opts.max_batch or DEFAULT_MAX_BATCH


def prepare_graph(graph: Path, opts: ServeOptions) -> Prepared:
    """An ONNX graph: for onnxruntime_onnx, or with ``model.py`` for the Python backend."""
    model = load_graph(graph)
    io = model_io(model, str(graph))
    platform = "python" if opts.backend == "python" else "onnxruntime_onnx"
    prep = Prepared(io, platform, graph_precision(model), _max_batch(io, opts),
                    default_name=model_name_for(graph.stem), default_file="model.onnx")
    for name in _external_data(graph, model):
        prep.files[name] = graph.parent / name  # the graph names it: it keeps its name
    sidecar = graph.with_suffix(".json")
    if path_problem(sidecar) is None:
        prep.files["model.json"] = sidecar
    else:
        warn(f"no metadata sidecar {sidecar}: the model is served without its record")
    prep.files["model.onnx"] = graph  # last: the graph lands after its data
    if platform == "python":
        prep.texts["model.py"] = inspect.getsource(backend_model)
        prep.default_file = None
    return prep


def local_gpu() -> str | None:
    """This machine's GPU name, or None without one (or without torch's CUDA)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(torch.cuda.current_device()) \
        if torch.cuda.is_available() else None


def prepare_engine(plan: Path, opts: ServeOptions, log: Callable[[str], None]) -> Prepared:
    """A TensorRT engine for tensorrt_plan, checked against the GPU the repository is for;
    its IO comes from the graph it was built from (named in its sidecar)."""
    from mame_export.trt.engine import read_sidecar, sidecar_path, slugify

    if opts.backend == "python":
        raise ServeError("--backend python runs the ONNX graph: give the graph, not the engine")
    if opts.device == "cpu":
        raise ServeError("a TensorRT engine runs on a GPU: --device cpu does not apply")
    meta = read_sidecar(plan)
    if meta is None or not isinstance(meta.get("gpu"), dict):
        raise ServeError(f"engine {plan} has no readable sidecar {sidecar_path(plan)}: the "
                         "config needs the GPU, profile and graph it records")
    built_for = str(meta["gpu"].get("name"))
    target = opts.gpu or local_gpu()
    if target is None:
        log(f"no GPU here and no --gpu: the repository is for the engine's GPU, {built_for}")
    elif slugify(target) != slugify(built_for):
        raise EngineGpuError(f"engine {plan.name} was built for {built_for}, but the repository "
                             f"is for {target}: an engine runs only on the GPU model it was "
                             "built on; rebuild it there with `mame-export MODEL --trt`")
    source = Path(str((meta.get("source_graph") or {}).get("path", "")))
    try:
        model = load_graph(source)
    except GraphReadError as e:
        raise ServeError(f"engine {plan.name}: its source graph is needed for the outputs' "
                         f"names and dims, and {e}") from None
    io = model_io(model, str(source))
    profiles = meta.get("profiles") or []
    profile_max = (int(next(iter(profiles[0].values()))["max"][0])
                   if io.dynamic_batch and profiles else None)
    file = f"model.{slugify(built_for)}.plan"
    prep = Prepared(io, "tensorrt_plan", str(meta.get("precision", "fp32")),
                    _max_batch(io, opts, profile_max), default_name=model_name_for(source.stem),
                    default_file=file)
    capability = (meta["gpu"].get("compute_capability") or "").strip()
    if capability:
        prep.cc_files[capability] = file
    prep.files[file + ".json"] = sidecar_path(plan)
    if path_problem(source.with_suffix(".json")) is None:
        prep.files["model.json"] = source.with_suffix(".json")
    prep.files[file] = plan
    return prep


def _versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _first_difference(old: Any, new: Any) -> str:
    fields = {f.name for f, _ in old.ListFields()} | {f.name for f, _ in new.ListFields()}
    return next((f for f in sorted(fields) if getattr(old, f) != getattr(new, f)), "?")


def _fill_version(folder: Path, prep: Prepared) -> list[str]:
    folder.mkdir()
    for name, src in prep.files.items():
        shutil.copyfile(src, folder / name)
    for name, text in prep.texts.items():
        atomic_write_text(folder / name, text)
    return sorted([*prep.files, *prep.texts])


def write_model(source: Path, repo: Path, opts: ServeOptions,
                log: Callable[[str], None] = stderr_log) -> dict[str, Any]:
    """Write one model version from an ONNX graph or a TensorRT engine into the repository
    ``repo``; returns what was written. Everything is checked before anything is written,
    and the config is parsed back with Triton's schema and checked against the graph."""
    opts.validate()
    model_config_pb2()  # the schema is needed: say so before any work
    source = check_file(source, "source", ServeError)
    check_out_dir(repo)
    if source.suffix.lower() in ENGINE_SUFFIXES:
        prep = prepare_engine(source, opts, log)
    else:
        prep = prepare_graph(source, opts)
    name = check_model_name(opts.name or prep.default_name)
    cfg = build_config(prep.io, name, prep.platform, opts, prep.max_batch, prep.default_file,
                       prep.cc_files, prep.precision)
    text = config_text(cfg)
    model_dir = repo / name
    where = model_dir / "config.pbtxt"
    check_config(text, prep.io, str(where))
    if model_dir.exists():
        if not model_dir.is_dir():
            raise ServeError(f"cannot write {model_dir}: a file of that name is in the way")
        old_problem = path_problem(where)
        if old_problem is not None:
            raise ServeError(f"{model_dir} is not a model folder: its config.pbtxt {old_problem}")
        old = parse_config(where.read_text(errors="replace"), str(where))
        if old != cfg:
            raise ServeError(f"{where} differs from this source's config (in "
                             f"'{_first_difference(old, cfg)}'): a new version must keep the "
                             "model's config; use another --name for a different one")
        existing = _versions(model_dir)
        version = opts.version or (existing[-1] + 1 if existing else 1)
        if version in existing:
            raise ServeError(f"version {version} of model {name} exists in {repo}; pick "
                             "another --model-version (versions are never overwritten)")
        with private_dir(model_dir) as tmp:
            files = _fill_version(tmp / str(version), prep)
            commit_dir(tmp / str(version), model_dir / str(version))
    else:
        version = opts.version or 1
        created = make_dirs(repo)
        try:
            clean_stale_dirs(repo)  # private folders of killed runs
            with private_dir(repo) as tmp:
                (tmp / name).mkdir()
                atomic_write_text(tmp / name / "config.pbtxt", text)
                check_config((tmp / name / "config.pbtxt").read_text(), prep.io, str(where))
                files = _fill_version(tmp / name / str(version), prep)
                commit_dir(tmp / name, model_dir)
        except BaseException:
            remove_dirs(created)
            raise
    log(f"wrote {model_dir / str(version)} ({prep.platform}, max_batch_size "
        f"{cfg.max_batch_size}) and {where}")
    return {"repository": str(repo), "model": name, "version": version,
            "platform": prep.platform, "config": str(where), "config_text": text,
            "max_batch_size": cfg.max_batch_size, "files": files,
            "dynamic_batch": prep.io.dynamic_batch}
