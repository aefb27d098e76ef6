"""tools/gpu_check.py --dry-run: the ``mame-export`` command line with tiny stand-ins.

Every command the GPU check runs is a ``mame-export`` command. In a dry run it runs
through this file instead, unchanged: the aliases it names (vit_b, vit_l, clip_l336) are
registered as tiny random-weight models of the same classes (the families' test models,
``Family.tiny``), and torch.compile compiles with ``aot_eager`` (dynamo and AOTAutograd,
no code generation: inductor's C++ build of even a tiny model takes about a minute on two
cold cores). So the dry run takes the real run's command lines, flags and JSON on the CPU
in about a minute.

    python tools/gpu_check_standins.py profile clip_l336 --llava --r 0.5 --json
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# timm ViTs at 32 px with 4 px patches: 64 patches, enough for the r where MACs halve.
TIMM_STAND_INS = {
    "vit_b": {"embed_dim": 32, "depth": 4, "num_heads": 2},
    "vit_l": {"embed_dim": 48, "depth": 6, "num_heads": 3},
}
FAMILY_TINY = ("clip_l336",)  # the family's own tiny test model (CLIP: 16 px, 4 x 4 patches)
COMPILE_BACKEND = "aot_eager"


def stand_in_names() -> dict[str, str]:
    """alias -> what stands in for it (without importing anything heavy)."""
    shown = {a: f"tiny timm ViT (img 32, patch 4, {size})" for a, size in TIMM_STAND_INS.items()}
    shown.update({a: f"its family's tiny test model (Family.tiny({a}))" for a in FAMILY_TINY})
    return shown


def register_stand_ins() -> None:
    """Put the tiny stand-ins in the registry under the real aliases."""
    from mame_export.families import get_family, registry
    from mame_export.families.base import with_kwargs

    reg = registry()  # cached: the dict every later lookup reads
    for alias, size in TIMM_STAND_INS.items():
        spec = with_kwargs(reg[alias], alias, img_size=32, patch_size=4, **size)
        reg[alias] = dataclasses.replace(spec, img_size=32)
    for alias in FAMILY_TINY:
        tiny = get_family(reg[alias].family).tiny(reg[alias])
        reg[alias] = dataclasses.replace(tiny, alias=alias)


def cheap_compile() -> None:
    """torch.compile with ``aot_eager`` where inductor was asked for (see the docstring)."""
    import torch

    real = torch.compile

    @functools.wraps(real)
    def compile_cheaply(*args: object, **kwargs: object) -> object:
        if kwargs.get("backend", "inductor") == "inductor":
            kwargs["backend"] = COMPILE_BACKEND
        return real(*args, **kwargs)

    torch.compile = compile_cheaply  # type: ignore[assignment]


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(REPO))
    from mame_export.cli import main as cli_main

    register_stand_ins()
    cheap_compile()
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
