"""Make the installed tensorrt-stubs readable by mypy: copy them into OUT_DIR, fixed.

tensorrt-stubs is generated from the bindings; as installed, mypy skips it (no py.typed in
``tensorrt/``) and cannot parse ``tensorrt_bindings/tensorrt.pyi`` (a parameter named ``in``,
parameters without defaults after defaulted ones, an import of runtime-only ``tensorrt_libs``).
The copies get those fixed and a ``# mypy: ignore-errors`` header: the stubs' own type errors
are not ours, the calls our code makes into them are what mypy checks.

    python tools/trt_mypy_stubs.py .trt-stubs
    MYPYPATH=.trt-stubs mypy --strict --follow-imports=silent mame_export/trt
"""

from __future__ import annotations

import re
import sys
import sysconfig
from pathlib import Path

PACKAGES = ("tensorrt", "tensorrt_bindings")
_DEF = re.compile(r"^(\s*def \w+\()(.*)(\)\s*->.*)$")


def split_top_level(params: str) -> list[str]:
    """Split a parameter list at commas that are not inside brackets."""
    parts, depth, current = [], 0, ""
    for ch in params:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def fix_def(line: str) -> str:
    m = _DEF.match(line)
    if not m:
        return line
    fixed, defaulted = [], False
    for param in split_top_level(m.group(2)):
        name = param.split(":")[0].strip()
        if name == "in":  # a keyword: not a valid parameter name
            param = param.replace("in", "in_", 1)
        if "=" in param:
            defaulted = True
        elif defaulted and name and not name.startswith("*"):
            param += " = ..."
        fixed.append(param)
    return m.group(1) + ",".join(fixed) + m.group(3)


def main(out_dir: str) -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    out = Path(out_dir)
    stubs = [p for pkg in PACKAGES for p in (site / pkg).rglob("*.pyi")]
    if not stubs:
        sys.exit("tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs")
    for src in stubs:
        lines = [fix_def(line) for line in src.read_text().splitlines()
                 if not line.startswith("import tensorrt_libs")]
        dst = out / src.relative_to(site)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text("# mypy: ignore-errors\n" + "\n".join(lines) + "\n")
    print(f"{len(stubs)} stub files -> {out}")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0] or None)
    ap.add_argument("out_dir", nargs="?", default=".trt-stubs",
                    help="folder for the stubs (default .trt-stubs)")
    main(ap.parse_args().out_dir)
