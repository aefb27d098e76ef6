"""Merge-plan files: a schedule searched on the user's images (``mame-export tune``),
written as versioned JSON and read back by every command (``--plan FILE``) and by
``mame_export.apply(model, plan=...)``.

A plan file records what it was made for (the model, a hash of its weights, the input
size, the MACs budget), what was searched (every candidate and its score) and what was
chosen: the mergeable tokens each block keeps (null where it does not merge), the
similarity, proportional attention and tau. A file made for another model, other
weights, another input size, another format version or another merge op is refused in
one line: its schedule was scored on something else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mame_export import settings
from mame_export.artifacts import atomic_write_text
from mame_export.errors import UserError, check_file, path_problem
from mame_export.jsonsafe import json_safe
from mame_export.ops.mame import MERGE_OP

FORMAT = "mame-export merge plan"
VERSION = 1


class PlanFileError(UserError):
    """A plan file that cannot be read, or was made for something else."""


@dataclass(frozen=True)
class PlanFile:
    """One plan file's content (see the module docstring)."""

    model: str  # the name tune was given (an alias or a family's own name)
    source_name: str  # what that name builds (the registry's source name)
    family: str
    weights: str  # where the weights came from, as the build said
    weights_sha256: str  # :func:`weights_sha256` of the model tune scored
    img_size: int
    num_patches: int
    depth: int
    target_macs: float
    macs_ratio: float  # the chosen schedule's (merge products counted)
    metric: str
    score: float  # the chosen schedule's score on the calibration images
    keep_counts: tuple[int | None, ...]
    similarity: str = "size"
    prop_attn: bool = True
    tau: float = 1.0
    search: Mapping[str, Any] = field(default_factory=dict)  # candidates, scores, settings
    tool_version: str = ""
    created: str = ""
    merge_op: str = MERGE_OP
    version: int = VERSION

    @property
    def r(self) -> float:
        """The fraction of patch tokens the schedule merges away by its last block."""
        final = next((k for k in reversed(self.keep_counts) if k is not None),
                     self.num_patches)
        return 1.0 - final / self.num_patches if self.num_patches else 0.0

    def apply_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``mame_export.apply`` that run this plan."""
        return dict(schedule=list(self.keep_counts), similarity=self.similarity,
                    prop_attn=self.prop_attn, tau=self.tau)

    def digest(self) -> str:
        """8 hex digits naming the schedule (graph file names keep tuned graphs apart)."""
        key = {"keep": list(self.keep_counts), "similarity": self.similarity,
               "prop_attn": self.prop_attn, "tau": self.tau}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep_counts"] = list(self.keep_counts)
        d["search"] = dict(self.search)
        return {"format": FORMAT, **d}

    def write(self, path: Path) -> None:
        """Write atomically: a reader (or a Ctrl-C) never sees half a plan."""
        text = json.dumps(json_safe(self.to_dict()), indent=2, allow_nan=False) + "\n"
        atomic_write_text(Path(path), text)

    # ---- what it was made for ---------------------------------------------------------

    def check_model_name(self, source_name: str, family: str, shown: str) -> None:
        """Refuse a plan made for another model (by what the name builds)."""
        if (source_name, family) != (self.source_name, self.family):
            raise PlanFileError(
                f"the plan file was made for {self.model} ({self.source_name}), not {shown} "
                f"({source_name}): tune {shown} to make its own plan")

    def check_img_size(self, img_size: int) -> None:
        if int(img_size) != self.img_size:
            raise PlanFileError(
                f"the plan file was made for input size {self.img_size}, not {img_size}: use "
                f"--img-size {self.img_size} or tune at {img_size}")

    def check_weights(self, digest: str, source: str) -> None:
        if digest != self.weights_sha256:
            raise PlanFileError(
                f"the plan file was made for other weights ({self.weights}, sha256 "
                f"{self.weights_sha256[:12]}...) than these ({source}, {digest[:12]}...): "
                "its schedule was scored on them; tune with these weights")

    def check_structure(self, num_patches: int, depth: int) -> None:
        if (num_patches, depth) != (self.num_patches, self.depth):
            raise PlanFileError(
                f"the plan file was made for {self.num_patches} patches in {self.depth} "
                f"blocks; this model has {num_patches} in {depth}")


def weights_sha256(model: nn.Module) -> str:
    """A hash of ``model``'s weights: every state-dict entry's name, dtype, shape and bytes,
    in name order. Patching changes module classes, never weights, so a patched model
    hashes as its unpatched self."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _field(d: Mapping[str, Any], key: str, types: Any, what: str) -> Any:
    if key not in d:
        raise PlanFileError(f"{what} has no {key!r} entry: not a complete plan file")
    v = d[key]
    bad_bool = isinstance(v, bool) and bool not in (types if isinstance(types, tuple)
                                                    else (types,))
    if not isinstance(v, types) or bad_bool:
        raise PlanFileError(f"{what}: {key!r} is {type(v).__name__} {v!r:.40}")
    return v


def from_dict(d: Any, what: str = "the plan file") -> PlanFile:
    """A :class:`PlanFile` from its JSON object; every problem is one PlanFileError line
    (another format, version or merge op included)."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise PlanFileError(f"{what} is not a mame-export merge plan (no \"format\": "
                            f"\"{FORMAT}\"); make one with mame-export tune")
    version = _field(d, "version", int, what)
    if version != VERSION:
        raise PlanFileError(f"{what} has format version {version}; this mame-export reads "
                            f"version {VERSION}: tune again")
    if d.get("merge_op") != MERGE_OP:
        raise PlanFileError(f"{what} was made for another merge op ({d.get('merge_op')!r}); "
                            f"this version computes {MERGE_OP!r}: tune again")
    keep = _field(d, "keep_counts", list, what)
    for k in keep:
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise PlanFileError(f"{what}: a keep count is {k!r} (a positive integer or null)")
    try:
        similarity = settings.check_similarity(_field(d, "similarity", str, what),
                                               "the plan's similarity")
        tau = settings.check_tau(_field(d, "tau", (int, float), what), "the plan's tau")
    except UserError as e:
        raise PlanFileError(f"{what}: {e}") from None
    num = (int, float)
    return PlanFile(
        model=_field(d, "model", str, what), source_name=_field(d, "source_name", str, what),
        family=_field(d, "family", str, what), weights=_field(d, "weights", str, what),
        weights_sha256=_field(d, "weights_sha256", str, what),
        img_size=_field(d, "img_size", int, what), num_patches=_field(d, "num_patches", int, what),
        depth=_field(d, "depth", int, what),
        target_macs=float(_field(d, "target_macs", num, what)),
        macs_ratio=float(_field(d, "macs_ratio", num, what)),
        metric=_field(d, "metric", str, what), score=float(_field(d, "score", num, what)),
        keep_counts=tuple(keep), similarity=similarity,
        prop_attn=_field(d, "prop_attn", bool, what), tau=tau,
        search=_field(d, "search", dict, what) if "search" in d else {},
        tool_version=str(d.get("tool_version", "")), created=str(d.get("created", "")),
        merge_op=MERGE_OP, version=version,
    )


def read_plan_file(path: str | Path) -> PlanFile:
    """Read and check a plan file; one PlanFileError line for anything wrong with it."""
    path = Path(path)
    if path_problem(path) == "not found":
        raise PlanFileError(f"no plan file {path} (make one with mame-export tune MODEL "
                            "--data DIR --target-macs RATIO)")
    check_file(path, "plan file")
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise PlanFileError(f"unreadable plan file {path}: not JSON text "
                            f"({type(e).__name__})") from None
    except OSError as e:
        raise PlanFileError(f"unreadable plan file {path}: {e.strerror or e}") from None
    return from_dict(d, f"plan file {path}")


def as_plan_file(plan: PlanFile | str | Path) -> PlanFile:
    return plan if isinstance(plan, PlanFile) else read_plan_file(plan)


def check_plan_for_model(plan: PlanFile, model: nn.Module) -> None:
    """Refuse ``plan`` for ``model`` unless it was made for this model's family, structure
    (patches at its own input size, blocks) and weights (the Python API's check; the
    command line checks the name and the input size before it builds anything)."""
    from mame_export.families import family_for_model

    family = family_for_model(model)
    if family.name != plan.family:
        raise PlanFileError(f"the plan file was made for a {plan.family} model "
                            f"({plan.model}); this is a {family.name} model")
    patcher = family.patcher
    plan.check_structure(patcher.num_patches(model), len(patcher.block_tokens(model)))
    plan.check_weights(weights_sha256(model), "this model's weights")
