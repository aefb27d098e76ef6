"""What a command asks for, and the one resolved job every command runs on.

:class:`ExportRequest` holds the settings as the user gave them (the CLI's flags, the
Python API's arguments, a graph's sidecar). :func:`resolve_job` turns it into a frozen
:class:`Job`, checked once, at the edge: the model spec (with ``--llava`` applied) and
its family, the mode's tau, the default batch, the precision's dtype, the engine
options, and what the model's structure refuses at this input size (before any weights
are built, read or downloaded). Building the model (``mame_export.job.build``) then
fills in what needs the model: r solved from a MACs target, and the IO spec. Export,
plan, eval, profile and parity all take that job; nothing after it re-validates.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch.nn as nn

from mame_export import settings
from mame_export.errors import UserError, stderr_log, warn
from mame_export.families import Family, IOSpec, ModelSpec, get_family, resolve
from mame_export.families.base import UnsupportedModelError, with_kwargs
from mame_export.patch import DEFAULT_TAU, MODES, apply, merge_plan, solve_r
from mame_export.plan import MergePlan
from mame_export.planfile import PlanFile
from mame_export.settings import MAX_BATCH, OPSETS  # noqa: F401 - re-exported

Log = Callable[[str], None]

# The batch sizes a dynamic-batch graph is checked at (parity), besides its largest one.
DYNAMIC_PARITY_BATCHES = (1, 3)
DEFAULT_DYNAMIC_MAX_BATCH = 8  # the largest batch checked when --max-batch is not given


@dataclass
class ExportRequest:
    """Everything that decides an export, as given; see :func:`resolve_job`."""

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
    threads: int | None = None  # CPU threads for PyTorch and ONNX Runtime (None: all)
    # A plan file (path or mame_export.planfile.PlanFile, from ``mame-export tune``): its
    # tokens per block, similarity, tau and proportional attention replace r, layers, tau
    # and prop_attn (eval and profile: it is one more variant beside the uniform ones).
    plan: Any = None
    calib: Path | None = None  # calibration images of a quantized graph (--calib DIR)
    calib_method: str = "minmax"  # mame_export.settings.CALIB_METHODS
    # module-path patterns whose MatMul/Gemm/Conv stay in high precision (--quant-keep)
    quant_keep: tuple[str, ...] = ()

    def validate(self, export: bool = True, check_opset: bool = True) -> None:
        """One-line UserErrors for bad settings, before any work; ``export=False`` allows
        adaptive mode (a plan or an eager run, not a graph); ``check_opset=False`` accepts
        any recorded opset (a graph's sidecar: parity does not export)."""
        check_settings(self, export=export, check_opset=check_opset)

    def resolve(self, export: bool = True, spec: ModelSpec | None = None) -> Job:
        return resolve_job(self, export=export, spec=spec)


@dataclass(frozen=True)
class Job:
    """One resolved, validated job (see the module docstring). Immutable: a stage that
    learns more (the solved r, the IO spec) makes a new one with :meth:`with_model`."""

    model: str  # the name as given (an alias or a family's own name)
    spec: ModelSpec  # the registry entry, ``--llava`` applied
    family: Family
    rs: tuple[float, ...]  # the merge ratios (export and plan: one)
    target_macs: tuple[float, ...] | None  # solve rs for these MACs ratios instead
    tau: float  # the mode's default filled in
    layers: tuple[int, ...] | None
    prop_attn: bool
    mode: str
    batch: int  # the spec's default filled in
    dynamic_batch: bool
    img_size: int | None  # as asked (None: the model's own)
    weights: str
    precision: str
    opset: int
    out_dir: Path
    parity_batches: int
    seed: int | None
    runners: tuple[str, ...]
    trt: Any  # EngineOptions or None
    engines_dir: Path
    llava: bool
    threads: int | None
    export: bool  # a graph will be made (adaptive mode refused, exportable structure)
    io: IOSpec | None = field(default=None, compare=False)  # known once the model is built
    solved: bool = False  # rs come from target_macs and were solved on the model
    plan_file: PlanFile | None = None  # a tuned schedule (mame-export tune)
    # True (eval, profile): the plan file is a variant of its own and rs / tau / layers /
    # prop_attn are the uniform plans it is compared with; False: it is the job's schedule.
    plan_is_variant: bool = False
    calib: Path | None = None  # calibration images (quantized precisions)
    calib_method: str = "minmax"
    quant_keep: tuple[str, ...] = ()  # layers kept in high precision (--quant-keep)

    @property
    def r(self) -> float:
        return self.rs[0]

    @property
    def dtype(self) -> Any:
        from mame_export.export import DTYPES

        return DTYPES[self.precision]

    @property
    def tuned(self) -> bool:
        """The job's own schedule comes from a plan file (export, plan, parity)."""
        return self.plan_file is not None and not self.plan_is_variant

    def patch_settings(self, uniform: bool = False) -> dict[str, Any]:
        """The keyword arguments of ``mame_export.apply`` for this job (r aside): the plan
        file's schedule when the job is :attr:`tuned` (``uniform``: the uniform plan's)."""
        out = dict(tau=self.tau, layers=None if self.layers is None else list(self.layers),
                   prop_attn=self.prop_attn, mode=self.mode,
                   **self.family.patch_options(self.spec, self.img_size))
        if self.tuned and not uniform:
            assert self.plan_file is not None
            out.update(self.plan_file.apply_kwargs(), layers=None)
        return out

    def plan_variant_settings(self) -> dict[str, Any]:
        """``apply``'s keyword arguments for the plan file's variant (eval, profile)."""
        assert self.plan_file is not None
        return dict(mode="static", **self.family.patch_options(self.spec, self.img_size),
                    **self.plan_file.apply_kwargs())

    def parity_batch_sizes(self) -> tuple[int, ...]:
        """The batch of each parity input set: the static batch, or, for a dynamic-batch
        graph, 1, 3 and its largest checked batch in turn."""
        if not self.dynamic_batch:
            return (self.batch,)
        top = (self.trt.max_batch if self.trt is not None and self.trt.max_batch
               else DEFAULT_DYNAMIC_MAX_BATCH)
        return tuple(dict.fromkeys((*DYNAMIC_PARITY_BATCHES, top)))

    def with_model(self, rs: Sequence[float] | None = None, io: IOSpec | None = None) -> Job:
        """This job with what building the model settled: solved rs and the IO spec."""
        return replace(self, rs=tuple(rs) if rs is not None else self.rs,
                       solved=self.solved or rs is not None, io=io or self.io)


def check_settings(req: ExportRequest, export: bool = True, check_opset: bool = True) -> None:
    """Every setting of ``req`` against its one check in :mod:`mame_export.settings`."""
    settings.check_r(req.r)
    if req.tau is not None:
        settings.check_tau(req.tau)
    if req.target_macs is not None:
        settings.check_target_macs(req.target_macs)
    if req.mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}; got {req.mode!r}")
    if export and req.mode != "static":
        raise UserError(
            f"mode {req.mode!r} cannot be exported: adaptive MaMe has data-dependent token "
            "counts (eager only); export with --mode static"
        )
    # (An empty list is the library's "no merge block"; the CLI refuses an empty --layers.)
    if req.layers is not None and any(not settings.is_int(i) or i < 0 for i in req.layers):
        raise UserError(f"--layers must be block indices >= 0; got {req.layers}")
    if req.batch is not None:
        settings.check_batch(req.batch)
    settings.check_graph_precision(req.precision)
    settings.check_calib_options(req.precision, req.calib, req.calib_method)
    settings.check_quant_keep(req.precision, req.quant_keep)
    if check_opset:
        settings.check_opset(req.opset)
    settings.check_positive_size(req.img_size)
    settings.check_threads(req.threads)
    check_parity_settings(req.parity_batches, req.seed)
    if req.trt is not None:
        req.trt.validate()
        if req.trt.precision != req.precision:
            raise UserError("engine and graph precision must match (strongly typed engines)")
        for flag, v in (("--min-batch", req.trt.min_batch), ("--opt-batch",
                        req.trt.opt_batch), ("--max-batch", req.trt.max_batch)):
            if v is not None:
                settings.check_batch(v, flag)


def check_parity_settings(batches: int, seed: int | None) -> None:
    """One-line UserErrors for parity settings out of range (checked before any work)."""
    settings.check_parity_batches(batches)
    settings.check_seed(seed)


def request_spec(req: ExportRequest, spec: ModelSpec) -> ModelSpec:
    """``spec`` with the request's family-specific variant (``--llava``) applied."""
    if not req.llava:
        return spec
    if "llava" not in get_family(spec.family).capabilities:
        raise UnsupportedModelError(f"--llava needs a LLaVA vision encoder (clip_l336); "
                                    f"{spec.alias} is a {spec.family} model")
    return with_kwargs(spec, spec.alias, llava=True)


def preflight(spec: ModelSpec, family: Family, req: ExportRequest, export: bool,
              plan_file: PlanFile | None = None) -> None:
    """What can be refused from the model's structure alone, refused in a moment and
    before any weights are built, read or downloaded: other families and blocks, hybrid
    ViTs for export, input sizes off the patch grid or too large, layers out of range."""
    skel = family.skeleton(spec)
    if skel is None:
        return
    family.check(skel, spec.alias, req.img_size, export)
    if req.img_size is not None:
        skel = family.skeleton(spec, req.img_size)
        if skel is None:
            return
    try:
        apply(skel, req.r if req.target_macs is None else 0.0, tau=req.tau,
              layers=req.layers, prop_attn=req.prop_attn, mode=req.mode,
              **family.patch_options(spec, req.img_size))
        if plan_file is not None:  # its schedule fits the model's blocks (no weights yet)
            schedule = plan_file.apply_kwargs()
            apply(skel, 0.0, tau=schedule.pop("tau"), prop_attn=schedule.pop("prop_attn"),
                  **family.patch_options(spec, req.img_size), **schedule)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def resolve_job(req: ExportRequest, export: bool = True, spec: ModelSpec | None = None,
                rs: Sequence[float] | None = None,
                target_macs: Sequence[float] | None = None,
                plan_is_variant: bool = False) -> Job:
    """Check ``req`` once and resolve it into a :class:`Job` (see the module docstring).

    ``spec`` overrides the registry's entry for ``req.model`` (tests' tiny models);
    ``rs`` / ``target_macs``: several ratios (eval, profile) instead of ``req.r`` /
    ``req.target_macs``. ``plan_is_variant`` (eval, profile): ``req.plan`` is compared with
    the uniform plans (by default the one at its own MACs budget) instead of being the job's
    schedule."""
    if rs is not None:
        rs = settings.check_rs(rs)
    if target_macs is not None:
        if not target_macs:
            raise UserError("--target-macs needs at least one value, e.g. --target-macs 0.5")
        target_macs = [settings.check_target_macs(t) for t in target_macs]
    check_settings(req, export=export)
    spec = request_spec(req, spec or resolve(req.model))
    family = get_family(spec.family)
    plan_file = None
    if req.plan is not None:
        plan_file, req = resolve_plan_file(req, spec, family, plan_is_variant)
        if plan_is_variant and rs is None and target_macs is None:
            target_macs = [plan_file.target_macs]  # compared at its own budget
    preflight(spec, family, req, export, plan_file)
    targets = (tuple(target_macs) if target_macs is not None
               else (req.target_macs,) if req.target_macs is not None else None)
    tuned = plan_file is not None and not plan_is_variant
    return Job(
        model=req.model, spec=spec, family=family,
        rs=(plan_file.r,) if tuned and plan_file is not None else
        tuple(rs) if rs is not None else (float(req.r),),
        target_macs=targets,
        tau=plan_file.tau if tuned and plan_file is not None else
        DEFAULT_TAU[req.mode] if req.tau is None else float(req.tau),
        layers=None if req.layers is None else tuple(sorted(set(req.layers))),
        prop_attn=plan_file.prop_attn if tuned and plan_file is not None else
        bool(req.prop_attn), mode=req.mode,
        batch=req.batch if req.batch is not None else spec.default_batch,
        dynamic_batch=bool(req.dynamic_batch), img_size=req.img_size, weights=req.weights,
        precision=req.precision, opset=req.opset, out_dir=Path(req.out_dir),
        parity_batches=req.parity_batches, seed=req.seed, runners=tuple(req.runners),
        trt=req.trt, engines_dir=Path(req.engines_dir), llava=bool(req.llava), threads=req.threads,
        export=export, plan_file=plan_file, plan_is_variant=plan_is_variant,
        calib=None if req.calib is None else Path(req.calib), calib_method=req.calib_method,
        quant_keep=tuple(req.quant_keep),
    )


def resolve_plan_file(req: ExportRequest, spec: ModelSpec, family: Family,
                      plan_is_variant: bool) -> tuple[PlanFile, ExportRequest]:
    """``req.plan`` read and checked against the model's name and input size (its weights
    are checked once built), and ``req`` with the plan's input size when none was given."""
    from mame_export.planfile import as_plan_file

    plan_file = as_plan_file(req.plan)
    plan_file.check_model_name(spec.source_name, spec.family, spec.alias)
    if req.img_size is not None:
        plan_file.check_img_size(req.img_size)
    if req.mode != "static":
        raise UserError("a plan file holds a static schedule: drop --mode adaptive")
    if not plan_is_variant:
        given = [flag for flag, v in (("--target-macs", req.target_macs),
                                      ("--layers", req.layers), ("--tau", req.tau))
                 if v is not None] + ([] if req.prop_attn else ["--no-prop-attn"])
        if given:
            raise UserError(f"--plan fixes the tokens per block, tau and proportional "
                            f"attention: drop {', '.join(given)}")
    return plan_file, replace(req, img_size=plan_file.img_size)


def settings_tag(job: Job | ExportRequest) -> str:
    """8 hex digits naming every setting that changes the graph but is not spelled out in
    its file name (tau, layers, proportional attention, mode, weights, opset): two exports
    that differ in any of them never share a file."""
    tau = DEFAULT_TAU.get(job.mode, 1.0) if job.tau is None else job.tau
    weights = job.weights if job.weights in ("auto", "random") else \
        str(Path(job.weights).resolve())
    key = {"tau": float(tau), "layers": sorted(set(job.layers)) if job.layers else "default",
           "prop_attn": bool(job.prop_attn), "mode": job.mode, "weights": weights,
           "opset": job.opset}
    if job.llava:  # only when set, so the names of earlier graphs stay the same
        key["llava"] = True
    if isinstance(job, Job) and job.tuned and job.plan_file is not None:
        key["plan"] = job.plan_file.digest()
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Built:
    """A job's model, built: the job with its solved rs and IO spec, the model (patched at
    ``job.r`` unless built with ``patch=False``), its plan and its weights' source."""

    job: Job
    model: nn.Module
    plan: MergePlan | None
    source: str


def solve_rs(job: Job, model: nn.Module, log: Log) -> list[float]:
    """The smallest r reaching each of ``job.target_macs`` (plans do not depend on weight
    values: solved on the weightless skeleton where the family has one)."""
    base = job.family.skeleton(job.spec, job.img_size) or copy.deepcopy(model)
    rs = []
    for target in job.target_macs or ():
        try:
            r = solve_r(base, target, **job.patch_settings(uniform=True))
        except (ValueError, TypeError) as e:
            raise UserError(str(e)) from None
        log(f"      MACs ratio {target:g} -> r = {r:g}")
        rs.append(r)
    return rs


def build(job: Job, log: Log = stderr_log, patch: bool = True) -> Built:
    """Build ``job``'s model and settle what needs it; patch it at ``job.r`` unless
    ``patch=False`` (eval and profile patch their own copies per variant)."""
    spec = job.spec
    log(f"building {spec.alias} ({spec.source_name}), weights: {job.weights}")
    model, source = job.family.build(spec, job.weights, job.img_size)
    job.family.check(model, spec.alias, job.img_size, job.export)
    if job.plan_file is not None:  # made for these weights? (name and size: resolve_job)
        from mame_export.planfile import weights_sha256

        job.plan_file.check_weights(weights_sha256(model), source)
    if job.target_macs is not None and not job.solved:
        job = job.with_model(rs=solve_rs(job, model, log))
    job = job.with_model(io=job.family.io_spec(spec, model, job.img_size))
    if not patch:
        return Built(job, model, None, source)
    try:
        model = apply(model, job.r, **job.patch_settings())
    except (ValueError, TypeError) as e:  # layers out of range, a family MaMe lacks, ...
        raise UserError(str(e)) from None
    plan = merge_plan(model)
    warn_if_no_effect(job, plan)
    return Built(job, model, plan, source)


def warn_if_no_effect(job: Job, plan: MergePlan) -> None:
    """A warning when the job's r merges nothing at this input size and these layers."""
    if job.r > 0 and not plan.merge_layers:
        warn(f"r={job.r:g} has no effect here: {plan.num_patches} patch token(s) in "
             f"{len(plan.blocks)} blocks leave nothing to merge at this input size and these "
             "layers, so the model runs unmerged")
