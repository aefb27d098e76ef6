"""The merge plan: decided once at ``apply`` time, stored on the model, read-only after.

A plan says how many tokens enter and leave each block and what that costs
(MACs of the patched vs. the unpatched model). The forward pass reads it and
never changes it, so a traced graph is fully determined by the plan.

:func:`build_plan` is the one plan builder; each family answers its questions through
:class:`PlanHooks` (tokens per block at an input size, protected tokens, MACs of a list
of blocks, default merge layers). Nothing here runs a model: plans are arithmetic on the
modules' shapes, so planning any input size is instant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from mame_export import settings
from mame_export.errors import UserError

Size = int | tuple[int, int]
"""An input size: a square side or (height, width); for a UNet, of its latent."""

# The largest block a plan accepts. One head's (N, N) float32 attention map is then at most
# 1 GiB (16384**2 * 4 bytes), and the merge's (N/2, N/2) products a quarter of that; past
# it, eager runs, exports and parity checks need tens of GB for a single image.
MAX_TOKENS = 16384
TOKEN_RULE = (f"at most {MAX_TOKENS} tokens per block (one head's (N, N) float32 attention "
              "map is then at most 1 GiB)")


@dataclass(frozen=True)
class BlockPlan:
    """One block: tokens in and out (protected tokens included)."""

    index: int
    tokens_in: int
    tokens_out: int
    merges: bool

    @property
    def keep_ratio(self) -> float:
        return self.tokens_out / self.tokens_in


@dataclass(frozen=True)
class BlockSettings:
    """What one patched block does, fixed at ``apply`` time and stored on the block (the
    same shape for every family and for the ToMe baseline)."""

    merges: bool
    tau: float = 1.0
    prop_attn: bool = True
    mode: str = "static"
    protected: int = 0  # leading tokens that never merge (class, distillation, registers)
    keep_ratio: float = 1.0  # mergeable tokens kept (adaptive mode keeps at least this many)
    remove: int = 0  # ToMe: tokens this block merges away
    r: float = 0.0  # UNet: fraction merged before the self-attention
    merge_crossattn: bool = False  # UNet: also run the cross-attention on merged tokens
    merge_mlp: bool = False  # UNet: also run the feed-forward on merged tokens
    similarity: str = "size"  # how a step compares tokens (settings.SIMILARITIES)


@dataclass(frozen=True)
class MergePlan:
    """Tokens per block and MACs, for one model at one input size."""

    family: str
    r: float
    tau: float
    mode: str
    prop_attn: bool
    num_patches: int
    num_protected: int
    blocks: tuple[BlockPlan, ...]
    macs: int
    macs_unpatched: int
    notes: tuple[str, ...] = field(default=())
    schedule_layers: tuple[int, ...] = ()
    """The merge layers asked for: each counts in the compounded ratio, even one whose
    rounded count does not drop (so it does not merge: see :attr:`merge_layers`)."""
    keep_counts: tuple[int | None, ...] = ()
    """Per block: the mergeable tokens it keeps, None where it does not merge. What the
    patched forward runs (see :meth:`keep_counts_for`)."""
    similarity: str = "size"
    """How each step compares tokens (settings.SIMILARITIES)."""
    explicit: bool = False
    """The keep counts were given (a plan file: ``mame-export tune``), not derived from
    r over the merge layers; r is then what they amount to."""

    @property
    def merge_layers(self) -> list[int]:
        return [b.index for b in self.blocks if b.merges]

    def keep_counts_for(self, num_patches: int) -> tuple[int | None, ...]:
        """The keep schedule a forward with ``num_patches`` mergeable tokens runs: the
        stored one for the plan's own count; for another count (a model that takes other
        input sizes) the same r and layers over that count. Plain arithmetic, which
        ``torch.compile`` folds into constants (the stored tuple never traces r)."""
        if num_patches == self.num_patches:
            return self.keep_counts
        if self.explicit:  # the same fractions of another count
            return scaled_schedule(self.keep_counts, self.num_patches, num_patches)
        return keep_schedule(num_patches, self.r, self.schedule_layers, len(self.blocks))

    @property
    def tokens_per_block(self) -> list[int]:
        """Tokens entering each block (protected tokens included)."""
        return [b.tokens_in for b in self.blocks]

    @property
    def final_patches(self) -> int:
        """Mergeable tokens left after the last block."""
        return self.blocks[-1].tokens_out - self.num_protected if self.blocks else self.num_patches

    @property
    def flops_ratio(self) -> float:
        return self.macs / self.macs_unpatched if self.macs_unpatched else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = [asdict(b) | {"keep_ratio": b.keep_ratio} for b in self.blocks]
        d["notes"] = list(self.notes)
        d.update(
            merge_layers=self.merge_layers,
            tokens_per_block=self.tokens_per_block,
            final_patches=self.final_patches,
            flops_ratio=self.flops_ratio,
            gmacs=self.macs / 1e9,
            gmacs_unpatched=self.macs_unpatched / 1e9,
        )
        return d

    def table(self) -> str:
        given = ", schedule from a plan file" if self.explicit else ""
        sim = f", similarity={self.similarity}" if self.similarity != "size" else ""
        lines = [
            f"{'ToMe' if self.family == 'tome' else 'MaMe'} plan ({self.family}, mode={self.mode}, "
            f"r={self.r:g}, tau={self.tau:g}, "
            f"prop_attn={self.prop_attn}{sim}{given}): {self.num_patches} patches"
            f" + {self.num_protected} protected",
            " block  tokens in  tokens out  keep",
        ]
        for b in self.blocks:
            mark = "" if b.merges else "   (no merge)"
            lines.append(
                f" {b.index:>5}  {b.tokens_in:>9}  {b.tokens_out:>10}  {b.keep_ratio:.3f}{mark}"
            )
        lines.append(
            f" MACs: {self.macs / 1e9:.2f} G vs {self.macs_unpatched / 1e9:.2f} G unpatched "
            f"(ratio {self.flops_ratio:.3f}, ideal speed-up {1 / self.flops_ratio:.2f}x)"
        )
        lines.extend(f" note: {n}" for n in self.notes)
        return "\n".join(lines)

    __str__ = table


def token_schedule(num_patches: int, r: float, merge_layers: list[int], depth: int) -> list[int]:
    """Mergeable tokens *leaving* each of ``depth`` blocks.

    Each merge block keeps the same fraction ``(1 - r) ** (1 / L)``; counts are
    rounded from the compounded ratio (not step by step), so the last merge
    block leaves exactly ``round(num_patches * (1 - r))`` patches.
    """
    check_ratio(r)
    return token_counts(num_patches, r, merge_layers, depth)


def token_counts(num_patches: int, r: float, merge_layers: list[int], depth: int) -> list[int]:
    """:func:`token_schedule` without the argument check: plain arithmetic that
    ``torch.compile`` folds into constants (its ``math.isfinite`` breaks the graph)."""
    merge_set = set(merge_layers)
    L = len(merge_set)
    out, n, done = [], num_patches, 0
    for i in range(depth):
        if i in merge_set:
            done += 1
            n = max(1, min(n, round(num_patches * (1.0 - r) ** (done / L))))
        out.append(n)
    return out


def keep_schedule(num_patches: int, r: float, merge_layers: Sequence[int],
                  depth: int) -> tuple[int | None, ...]:
    """Per block: the mergeable tokens it keeps, or None where it does not merge (a merge
    layer whose rounded count does not drop merges nothing). Plain arithmetic, like
    :func:`token_counts`."""
    out = token_counts(num_patches, r, list(merge_layers), depth)
    prev = [num_patches, *out[:-1]]
    return tuple(n if n < p else None for n, p in zip(out, prev, strict=True))


def scaled_schedule(keep: Sequence[int | None], num_patches: int,
                    other: int) -> tuple[int | None, ...]:
    """An explicit keep schedule made for ``num_patches`` tokens, carried to ``other``
    tokens: each block keeps the same fraction (at least 1, never more than it gets).
    Plain arithmetic, like :func:`token_counts`."""
    out: list[int | None] = []
    n = other
    for k in keep:
        if k is None:
            out.append(None)
            continue
        m = max(1, min(n, round(other * k / num_patches)))
        out.append(m if m < n else None)
        n = m
    return tuple(out)


def check_schedule(keep: Sequence[int | None], tokens: Sequence[int],
                   restores: bool = False) -> tuple[int | None, ...]:
    """An explicit keep schedule (one entry per block: the mergeable tokens it keeps, or
    None where it does not merge) checked against the tokens each block gets; ValueError
    names the first bad block. A count equal to what the block gets is a block that does
    not merge (None)."""
    if len(keep) != len(tokens):
        raise ValueError(f"the schedule has {len(keep)} entries; the model has "
                         f"{len(tokens)} blocks")
    out: list[int | None] = []
    n = tokens[0] if tokens else 0
    for i, (k, n_block) in enumerate(zip(keep, tokens, strict=True)):
        if restores:
            n = n_block
        if k is None:
            out.append(None)
            continue
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"block {i} of the schedule keeps {k!r} tokens; it gets {n}, so "
                             f"it keeps 1 to {n} (or null: no merge)")
        out.append(k if k < n else None)
        n = k
    return tuple(out)


def block_plans(tokens: Sequence[int], protected: int, keep: Sequence[int | None],
                restores: bool = False) -> list[BlockPlan]:
    """The BlockPlans of a keep schedule; counts include the ``protected`` tokens.

    ``tokens``: mergeable tokens entering each block when nothing merges. Merged tokens
    flow on to the next block, unless ``restores`` (MaRe puts every position back after
    each block: a block's count is its own)."""
    plans, n = [], tokens[0] if tokens else 0
    for i, (n_in, n_keep) in enumerate(zip(tokens, keep, strict=True)):
        if restores:
            n = n_in
        n_out = n if n_keep is None else n_keep
        plans.append(BlockPlan(i, n + protected, n_out + protected, n_keep is not None))
        n = n_out
    return plans


def merge_layers_or_default(layers: Sequence[int] | None, depth: int,
                            default: Callable[[int], list[int]] | None = None) -> list[int]:
    """``layers`` sorted without repeats, or ``default(depth)`` (by default
    :func:`default_merge_layers`); ValueError for an index outside ``[0, depth)``."""
    if layers is None:
        chosen = (default or default_merge_layers)(depth)
    else:
        chosen = sorted(set(layers))
    bad = [i for i in chosen if not 0 <= i < depth]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {depth} blocks")
    return chosen


class PlanHooks(Protocol):
    """What :func:`build_plan` asks a family about one model (families/base.Patcher)."""

    family: str  # the name the plan carries
    restores: bool  # MaRe restores every position after each block: counts do not compound

    def block_tokens(self, model: Any, size: Size | None) -> list[int]:
        """Mergeable tokens entering each block a forward runs, when nothing merges."""
        ...

    def num_patches(self, model: Any, size: Size | None) -> int:
        """Patch tokens at ``size`` (None: the model's own)."""
        ...

    def protected(self, model: Any) -> int:
        """Leading tokens that never merge (class, distillation, registers)."""
        ...

    def default_layers(self, depth: int) -> list[int]:
        """The merge layers when none are given."""
        ...

    def keep_counts(self, tokens: Sequence[int], r: float,
                    layers: Sequence[int]) -> tuple[int | None, ...]:
        """Per block: mergeable tokens kept at ``r``, None where it does not merge."""
        ...

    def macs(self, model: Any, size: Size | None, blocks: Sequence[BlockPlan],
             merge_cost: bool, **options: Any) -> int:
        """MACs of one batch-1 forward running ``blocks`` (the merge's own products with
        ``merge_cost``)."""
        ...

    def notes(self, model: Any, size: Size | None, blocks: Sequence[BlockPlan],
              **options: Any) -> list[str]:
        """What the table should say about this family's plan."""
        ...


def check_block_tokens(tokens: int) -> None:
    """ValueError for a block of more tokens than a plan accepts (:data:`MAX_TOKENS`)."""
    if tokens > MAX_TOKENS:
        raise ValueError(f"{tokens} tokens in one block at this input size: MaMe plans "
                         f"{TOKEN_RULE}; use a smaller input size")


def build_plan(hooks: PlanHooks, model: Any, r: float, tau: float, layers: Sequence[int] | None,
               prop_attn: bool, mode: str, size: Size | None = None,
               schedule: Sequence[int | None] | None = None, similarity: str = "size",
               **options: Any) -> MergePlan:
    """The merge plan of ``model`` (patched or not) at input ``size`` (None: its own),
    from the family's ``hooks``: tokens per block, keep schedule, MACs, notes.

    ``schedule``: explicit keep counts per block (a plan file's), instead of r over
    ``layers`` (both are then ignored: r becomes what the schedule amounts to)."""
    check_ratio(r)
    check_tau(tau)
    _library_check(settings.check_similarity, similarity, "similarity")
    tokens = hooks.block_tokens(model, size)
    protected = hooks.protected(model)
    check_block_tokens(max(tokens, default=0) + protected)
    if schedule is not None:
        keep = check_schedule(schedule, tokens, hooks.restores)
        chosen = [i for i, k in enumerate(keep) if k is not None]
    else:
        chosen = merge_layers_or_default(layers, len(tokens), hooks.default_layers)
        keep = hooks.keep_counts(tokens, r, chosen)
    blocks = block_plans(tokens, protected, keep, hooks.restores)
    if schedule is not None and tokens:
        r = 1.0 - (blocks[-1].tokens_out - protected) / tokens[0]
    unpatched = block_plans(tokens, protected, (None,) * len(tokens), hooks.restores)
    notes = []
    if mode == "adaptive":
        notes.append("adaptive mode: token counts shown are the static floor; retained "
                     "distinctive sources add to them at run time")
    notes += hooks.notes(model, size, blocks, **options)
    return MergePlan(
        family=hooks.family, r=float(r), tau=float(tau), mode=mode, prop_attn=prop_attn,
        num_patches=hooks.num_patches(model, size), num_protected=protected,
        blocks=tuple(blocks),
        macs=int(hooks.macs(model, size, blocks, True, **options)),
        macs_unpatched=int(hooks.macs(model, size, unpatched, False, **options)),
        notes=tuple(notes), schedule_layers=tuple(chosen), keep_counts=tuple(keep),
        similarity=similarity, explicit=schedule is not None,
    )


DEFAULT_MERGE_BLOCKS = 8


def default_merge_layers(depth: int) -> list[int]:
    """The first ``min(8, depth)`` blocks: the paper's setting for pretrained ViT-S/B/L/H."""
    return list(range(min(DEFAULT_MERGE_BLOCKS, depth)))


def _library_check(check: Callable[..., Any], value: object, name: str) -> None:
    """A setting's one rule (mame_export.settings), raised as the library's ValueError."""
    try:
        check(value, name)
    except UserError as e:
        raise ValueError(str(e)) from None


def check_ratio(r: float) -> None:
    _library_check(settings.check_r, r, "r")


def check_target_macs(target: float) -> None:
    _library_check(settings.check_target_macs, target, "target MACs ratio")


def check_tau(tau: float) -> None:
    _library_check(settings.check_tau, tau, "tau")
