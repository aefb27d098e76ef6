"""Generate one prompt and seed with baseline, ToMe-SD and MaMe+MaRe; side-by-side PNG + timings.

Needs a local Stable Diffusion 2.1 diffusers folder (``model_index.json``,
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) and
``transformers`` for the text encoder. The same pipeline object runs every
method; each method's patch is applied for its run only and removed after,
so runs cannot leak into each other.

    python benchmarks/scripts/sd_generate_compare.py --model-dir ~/models/stable-diffusion-2-1 \\
        --prompt "a photo of an astronaut riding a horse" --r 0.5 --device cuda --dtype fp16

Writes ``<out>.png`` (labelled side by side) and ``<out>.json`` (timings, settings).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    import mame_export  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

METHODS = ("baseline", "tomesd", "mame")
_PIPELINE_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ToolError(Exception):
    """A problem the user can fix; printed as one line."""


def check_model_dir(path: str | Path) -> Path:
    """The folder as a Path, or ToolError naming what is missing."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ToolError(f"model folder not found: {p} (pass a local SD 2.1 diffusers folder)")
    missing = [part for part in _PIPELINE_PARTS if not (p / part).exists()]
    if missing:
        raise ToolError(f"{p} is not a diffusers pipeline folder: missing {', '.join(missing)}")
    return p


def _assert_unpatched(unet: Any) -> None:
    from mame_export.patch import is_patched

    tome = any(type(m).__name__ == "ToMeBlock" for m in unet.modules())
    if tome or is_patched(unet):
        raise ToolError("the UNet is already patched; each method must start from the plain UNet")


@contextlib.contextmanager
def patched(
    unet: Any,
    method: str,
    r: float,
    max_downsample: int = 1,
    tau: float | None = None,
    tome_kwargs: dict[str, Any] | None = None,
) -> Iterator[Any]:
    """Apply ``method``'s patch to ``unet`` for the duration of the block, then remove it.

    ``max_downsample`` selects the same UNet levels for both merging methods
    (ToMe-SD's knob: 1 = highest-resolution blocks only, 8 = all);
    ``tome_kwargs`` go to ``tomesd.apply_patch`` (e.g. ``use_rand``).
    """
    if method not in METHODS:
        raise ToolError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    _assert_unpatched(unet)
    if method == "baseline":
        yield unet
        return
    if method == "tomesd":
        import tomesd

        tomesd.apply_patch(unet, ratio=r, max_downsample=max_downsample, **(tome_kwargs or {}))
        try:
            yield unet
        finally:
            tomesd.remove_patch(unet)
        return
    import mame_export
    from mame_export.families.sd_unet.patch import blocks_up_to_downsample, remove

    layers = blocks_up_to_downsample(unet, max_downsample)
    mame_export.apply(unet, r, tau=tau, layers=layers)
    try:
        yield unet
    finally:
        remove(unet)


def _to_uint8_rgb(image: Any) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3|4) or (H, W) image; got shape {a.shape}")
    a = a[:, :, :3]
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return a


def side_by_side(
    images: Sequence[Any], labels: Sequence[str], pad: int = 8, label_height: int = 24
) -> Any:
    """A PIL image: ``images`` in a row on white, each with its label above it.

    Images may be PIL images or arrays (uint8, or float in [0, 1]); heights may
    differ (shorter ones are top-aligned).
    """
    from PIL import Image, ImageDraw

    if len(images) != len(labels) or not images:
        raise ValueError("need one label per image and at least one image")
    arrays = [_to_uint8_rgb(im) for im in images]
    width = sum(a.shape[1] for a in arrays) + pad * (len(arrays) + 1)
    height = max(a.shape[0] for a in arrays) + label_height + 2 * pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = pad
    for a, label in zip(arrays, labels, strict=True):
        draw.text((x, pad // 2), label, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(a), (x, pad + label_height))
        x += a.shape[1] + pad
    return canvas


def _load_pipeline(model_dir: Path, device: str, dtype: str) -> Any:
    try:
        import torch
        from diffusers import StableDiffusionPipeline
    except ImportError as e:
        raise ToolError(
            f"cannot import the SD pipeline ({e}); pip install diffusers transformers"
        ) from None
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(model_dir), torch_dtype=torch_dtype, local_files_only=True, safety_checker=None
        )
    except Exception as e:  # noqa: BLE001 - a broken folder is the user's to fix
        raise ToolError(
            f"cannot load the pipeline from {model_dir}: {type(e).__name__}: {e}"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _generate(pipe: Any, args: argparse.Namespace) -> tuple[Any, float]:
    import torch

    def once() -> tuple[Any, float]:
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        image = pipe(
            args.prompt,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=gen,
        ).images[0]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return image, time.perf_counter() - t0

    for _ in range(args.warmup):
        once()
    return once()


def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = check_model_dir(args.model_dir)
    pipe = _load_pipeline(model_dir, args.device, args.dtype)
    images, results = [], {}
    for method in args.methods:
        with patched(pipe.unet, method, args.r, args.max_downsample):
            image, seconds = _generate(pipe, args)
        images.append(image)
        results[method] = {"seconds": round(seconds, 3), "s_per_step": seconds / args.steps}
        print(f"{method:>9}: {seconds:.2f} s ({seconds / args.steps * 1e3:.0f} ms/step)")
    base = results.get("baseline", {}).get("seconds")
    labels = []
    for method in args.methods:
        sec = results[method]["seconds"]
        speed = f", {1 - sec / base:+.0%} time" if base and method != "baseline" else ""
        name = method if method == "baseline" else f"{method} r={args.r:g}"
        labels.append(f"{name}: {sec:.1f} s{speed}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    side_by_side(images, labels).save(out.with_suffix(".png"))
    record = {
        "command": " ".join(sys.argv),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
        "image": str(out.with_suffix(".png")),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")
    return record


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True, help="local SD 2.1 diffusers folder")
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--size", type=int, default=768, help="image side in pixels (latent = /8)")
    p.add_argument("--r", type=float, default=0.5, help="merge ratio for ToMe-SD and MaMe")
    p.add_argument("--max-downsample", type=int, default=1, choices=(1, 2, 4, 8),
                   help="merge in UNet levels at most this far below the latent (both methods)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "fp32", "bf16"))
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per method first")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"
                                         / "sd_generate_compare"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
