"""Benchmark (not a test): fidelity and probe accuracy of MaMe vs ToMe on a real ViT.

Real weights: the DINOv2-S/14 backbone (``python ../shared/tools/real-vit-weights.py DIR``
writes ``DIR/dinov2_s14_224.safetensors``; no classification head). Real photos:
files you name with ``--images`` (e.g. foolbox's 20 ImageNet validation images) and,
with ``--package-photos``, the colour photos that ship inside scikit-image and
scikit-learn. Each photo gives ``--views`` augmented views (random resized crop,
scale 0.2-1, and a random flip; seeded).

Per variant (unmerged, MaMe and ToMe at the same tokens per block) it reports:
- the mean cosine of the final features (pre-logits) to the unmerged model's;
- a linear probe's accuracy: a softmax classifier trained on the unmerged model's
  features of the first half of each photo's views (label: which photo), applied to
  the other half through each variant; and its agreement with the unmerged
  predictions; the same for a 1-nearest-neighbour classifier;
- the MACs ratio of the plan.

``--study`` adds the merge variants that chose the method (docs/method.md): the
first static design (fixed source positions, relu(S - tau) weights with
refinement), data-selected sources with cosine similarity and several weight
rules, and targets that include the kept candidates. They run through the same
patch with its merge step swapped.

    python benchmarks/scripts/accuracy_real.py --weights W/dinov2_s14_224.safetensors \\
        --images FOOLBOX/data/imagenet_*.jpg --package-photos --study

Writes ``benchmarks/results/accuracy_dinov2_cpu.json`` (command, versions, images,
raw per-variant numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file: benchmarks/scripts/)
sys.path.insert(0, str(ROOT))

from mame_export import evaluate as ev  # noqa: E402
from mame_export.artifacts import atomic_write_text  # noqa: E402
from mame_export.checkpoints import load_checkpoint  # noqa: E402
from mame_export.families import tokens  # noqa: E402
from mame_export.families.timm_vit import patch as timm_vit  # noqa: E402
from mame_export.ops import mame as ops  # noqa: E402
from mame_export.ops import partition as partition_ops  # noqa: E402
from mame_export.patch import solve_r  # noqa: E402
from mame_export.profile import cpu_name  # noqa: E402
from mame_export.sidecar import versions  # noqa: E402

MODEL = "vit_small_patch14_dinov2"
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                  "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg", "camera.png",
                  "brick.png", "grass.png", "gravel.png", "ihc.png")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def package_photos() -> list[Path]:
    out = []
    with contextlib.suppress(ImportError):
        import skimage

        out += [Path(skimage.__file__).parent / "data" / n for n in SKIMAGE_PHOTOS]
    with contextlib.suppress(ImportError):
        import sklearn

        out += [Path(sklearn.__file__).parent / "datasets" / "images" / n for n in SKLEARN_PHOTOS]
    return [p for p in out if p.is_file()]


def make_views(paths: list[Path], views: int, size: int, seed: int) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
    import torchvision.transforms as T
    from PIL import Image

    torch.manual_seed(seed)
    tf = T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    xs, ys = [], []
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            rgb = im.convert("RGB")
            for _ in range(views):
                xs.append(tf(rgb))
                ys.append(i)
    return torch.stack(xs), torch.tensor(ys)


# ---- study variants: alternative merge steps, swapped into the timm patch ---------------

def _first_design(x, metric, sizes, n_keep, tau=0.5):
    """The first static design: fixed evenly spread sources, relu(S - 0.5) weights,
    refinement to weights >= the column mean, best-target fallback (mame.md)."""
    part = partition_ops.partition(x.shape[1], n_keep, x.device)
    if part.n_sources == 0:
        return x, sizes.float(), ()
    k = ops._unit(metric)
    sim = k.index_select(1, part.targets) @ k.index_select(1, part.sources).transpose(-1, -2)
    shifted = sim - 0.5
    linked = shifted > 1e-12
    w = ops._normalize_columns(torch.where(linked, shifted, 0.0))
    count = linked.sum(dim=-2, keepdim=True, dtype=torch.float32)
    zeta = w.sum(dim=-2, keepdim=True) / count.clamp_min(1.0)
    w = ops._normalize_columns(torch.where(w >= zeta * (1 - 1e-6), w, 0.0))
    fallback = ops._normalize_columns((sim == sim.amax(dim=-2, keepdim=True)).float())
    merged, s = partition_ops.mame_merge(x, sizes, torch.where(count > 0, w, fallback), part)
    return merged, s, ()


def _selected(similarity: str, weights: Callable | None, kept_targets: bool = False):
    """Data-selected sources with another similarity or weight rule (one sub-step per
    block, which every plan here needs)."""
    def step(x, metric, sizes, n_keep, tau=1.0):
        n_merge = x.shape[1] - n_keep
        sizes = sizes.float()
        if n_merge == 0:
            return x, sizes, ()
        k = ops._unit(metric)
        cos = k[:, 1::2] @ k[:, 0::2].transpose(-1, -2)
        s_a, s_b = sizes[:, 0::2], sizes[:, 1::2]
        sim = ops.size_aware_similarity(cos, s_b, s_a) if similarity == "ward" else cos
        rank = ops.redundancy_ranks(sim.amax(dim=-2))
        na = sim.shape[-1]
        select = ops.selection_matrix(rank, n_merge, na - n_merge)
        x_a, x_b = x[:, 0::2], x[:, 1::2]
        t_x, t_s = x_b, s_b
        if kept_targets:  # merged candidates may also go to kept candidates
            sim_aa = select @ (k[:, 0::2] @ k[:, 0::2].transpose(-1, -2))
            if similarity == "ward":
                sim_aa = ops.size_aware_similarity(sim_aa, select @ s_a, s_a)
            sim = torch.cat([sim_aa, sim], 1)
            t_x, t_s = torch.cat([select @ x_a, x_b], 1), torch.cat([select @ s_a, s_b], 1)
        w = (weights or ops.merge_weights)(sim, tau) * (rank < n_merge).float()[:, None, :]
        new = t_s + w @ s_a
        merged = (t_s / new) * t_x + (w * s_a.transpose(-1, -2) / new) @ x_a
        if kept_targets:
            return merged, new, ()
        return torch.cat([select @ x_a, merged], 1), torch.cat([select @ s_a, new], 1), ()
    return step


def _softmax(temperature: float) -> Callable:
    return lambda sim, tau: torch.softmax(sim / temperature, dim=-2)


STUDY: dict[str, tuple[Callable, float | None]] = {
    # name: (merge step, tau)
    "first design (fixed sources, relu(S-0.5) + refine)": (_first_design, None),
    "selected, cosine, best target": (_selected("cos", None), 1.0),
    "selected, cosine, tau=0.9 band": (_selected("cos", None), 0.9),
    "selected, cosine, tau=0.7 band": (_selected("cos", None), 0.7),
    "selected, cosine, tau=0.4 band": (_selected("cos", None), 0.4),
    "selected, cosine, softmax T=0.01": (_selected("cos", _softmax(0.01)), 1.0),
    "selected, cosine, kept candidates as targets": (_selected("cos", None, True), 1.0),
    "selected, size-aware (Ward) with tau=0.7 band": (_selected("ward", None), 0.7),
    "selected, size-aware (Ward), kept candidates as targets": (_selected("ward", None, True),
                                                                1.0),
}


@contextlib.contextmanager
def swapped_step(step: Callable | None) -> Iterator[None]:
    # The patched blocks merge through families.tokens.merge_tokens, which calls the
    # module's mame_step: a study variant replaces it there for the duration.
    original = tokens.mame_step
    if step is not None:
        tokens.mame_step = step
    try:
        yield
    finally:
        tokens.mame_step = original


# ---- probes --------------------------------------------------------------------------

def train_probe(feats: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.nn.Linear:
    """A softmax classifier on standardised features (L-BFGS, weight decay 1e-3)."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(feats.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(probe(feats), labels) + 1e-3 * probe.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, required=True,
                    help="dinov2_s14_224.safetensors from real-vit-weights.py")
    ap.add_argument("--images", nargs="*", default=[], help="photo files or globs")
    ap.add_argument("--package-photos", action="store_true",
                    help="add the photos shipped in scikit-image and scikit-learn")
    ap.add_argument("--views", type=int, default=6, help="augmented views per photo (default 6)")
    ap.add_argument("--r", type=float, nargs="*", default=[0.5],
                    help="ratios to compare (default 0.5; the r where MACs halve is added)")
    ap.add_argument("--study", action="store_true", help="also run the merge-variant study")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=34)
    ap.add_argument("--out", type=Path,
                    default=ROOT / "benchmarks" / "results" / "accuracy_dinov2_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths = sorted({Path(p) for pat in args.images for p in glob.glob(pat)})
    if args.package_photos:
        paths += package_photos()
    if len(paths) < 2:
        ap.error("need at least two photos (--images, --package-photos)")
    started = time.time()
    import timm

    model = timm.create_model(MODEL, num_classes=0, img_size=224).eval()
    load_checkpoint(model, args.weights)
    x, y = make_views(paths, args.views, 224, seed=0)
    print(f"{len(paths)} photos x {args.views} views = {len(x)} inputs", file=sys.stderr)
    halve = solve_r(ev.copy_of(model), 0.5)
    rs = sorted(set(args.r) | {halve})
    batches = list(x.split(args.batch))
    train = (torch.arange(len(y)) % args.views) < args.views // 2
    ref = ev.run_variant(model, batches)
    mean, std = ref.features[train].mean(0), ref.features[train].std(0) + 1e-6
    probe = train_probe((ref.features[train] - mean) / std, y[train], len(paths))
    bank = F.normalize(ref.features[train], dim=1)

    def predict(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            lin = probe((f - mean) / std).argmax(1)
        nn1 = y[train][(F.normalize(f, dim=1) @ bank.T).argmax(1)]
        return lin, nn1

    ref_lin, ref_nn = predict(ref.features[~train])
    rows = []

    def record(name: str, method: str, r: float, m: torch.nn.Module, plan: dict,
               step: Callable | None = None) -> None:
        with swapped_step(step):
            out = ev.run_variant(m, batches)
        lin, nn1 = predict(out.features[~train])
        test_y = y[~train]
        row = {
            "name": name, "method": method, "r": round(r, 4),
            "macs_ratio": round(plan.get("flops_ratio", 1.0), 4),
            "final_patches": plan.get("final_patches"),
            "cosine_features": round(F.cosine_similarity(out.features, ref.features).mean()
                                     .item(), 5),
            "probe_accuracy": round((lin == test_y).float().mean().item(), 4),
            "probe_agreement": round((lin == ref_lin).float().mean().item(), 4),
            "knn_accuracy": round((nn1 == test_y).float().mean().item(), 4),
            "knn_agreement": round((nn1 == ref_nn).float().mean().item(), 4),
            "seconds": round(out.seconds, 1),
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    record("unmerged", "unmerged", 0.0, model, {})
    for r in rs:
        for v in ev.build_variants(model, [r], tau=None, layers=None, prop_attn=True)[1:]:
            record(v.name, v.method, r, v.model, v.plan)
        if args.study:
            for name, (step, tau) in STUDY.items():
                m = timm_vit.apply(ev.copy_of(model), r, tau=1.0 if tau is None else tau,
                                   layers=None, prop_attn=True, mode="static")
                record(f"{name} r={r:g}", "study", r, m, m._mame_plan.to_dict(), step)
    result = {
        "command": shlex.join(["python", "benchmarks/scripts/accuracy_real.py",
                               *sys.argv[1:]]),
        "model": MODEL, "weights": args.weights.name, "cpu": cpu_name(),
        "threads": args.threads, "load_avg": os.getloadavg(), "versions": versions(),
        "photos": [p.name for p in paths], "views_per_photo": args.views,
        "test_views": int((~train).sum()), "r_macs_halve": halve,
        "wall_s": round(time.time() - started, 1), "variants": rows,
    }
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
