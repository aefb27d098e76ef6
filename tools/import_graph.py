"""The package's import graph, checked: no import loop, no import that runs back up the
flow, no source file over the line limit.

    python tools/import_graph.py            # check; exit 1 with one line per problem
    python tools/import_graph.py --dot      # the graph in Graphviz dot, for a picture

Every import counts, those inside functions too. The flow, bottom to top, is
:data:`LAYERS`; a module may import its own layer and the layers below it.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mame_export"
MAX_LINES = 450

# Bottom to top: alias -> model -> patch -> graph -> audit -> engine -> parity and latency.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "jsonsafe", "settings", "artifacts"),
    ("ops", "plan", "graph", "checkpoints", "quant.scope"),  # quant.scope: the merge's nodes
    ("families",),  # the registry, each family's model, patch and checks
    # the library entry point (apply, merge_plan), plan files, the ToMe baseline
    ("patch", "planfile", "baselines"),
    ("export", "trt.detect", "trt.support", "runners"),
    # runners.factory makes any runner by name, the TensorRT ones (which build engines) included
    ("audit", "trt.engine", "trt", "runners.tensorrt", "runners.factory", "parity"),
    ("request", "sidecar", "profile", "evaluate", "serve", "quant"),
    ("job", "tune"),
    ("cli", "__main__", ""),  # "" is the package's own __init__ (lazy exports)
)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> set[str]:
    """The package modules ``path`` imports (absolute or relative, anywhere in the file)."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith(PACKAGE))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith(PACKAGE):
                continue
            # `from pkg import module` imports the module; `from module import name`, the
            # module: resolved to the longest name that is a module (in graph())
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def graph() -> tuple[dict[str, set[str]], dict[str, int]]:
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    names = {module_name(p): p for p in files}
    edges: dict[str, set[str]] = {}
    for name, path in names.items():
        targets = set()
        for imp in imports_of(path, name):
            while imp and imp not in names:  # `from a.b import name` -> module a.b
                imp = imp.rpartition(".")[0]
            if imp and imp != name and imp != PACKAGE:
                targets.add(imp)
        edges[name] = targets
    lines = {name: len(p.read_text().splitlines()) for name, p in names.items()}
    return edges, lines


def layer_of(module: str) -> int:
    sub = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    best, best_len = -1, -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            hit = sub == prefix or (prefix and sub.startswith(prefix + "."))
            if hit and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best < 0:
        raise SystemExit(f"{module} is in no layer of tools/import_graph.py: add it to LAYERS")
    return best


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def problems() -> list[str]:
    edges, lines = graph()
    out = [f"import loop: {' <-> '.join(c)}" for c in find_cycles(edges)]
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            if layer_of(dst) > layer_of(src):
                out.append(f"upward import: {src} (layer {layer_of(src)}) imports {dst} "
                           f"(layer {layer_of(dst)})")
    for extra in sorted((ROOT / "tools").glob("*.py")):
        lines[str(extra.relative_to(ROOT))] = len(extra.read_text().splitlines())
    out += [f"{name}: {n} lines (limit {MAX_LINES})" for name, n in sorted(lines.items())
            if n > MAX_LINES]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dot", action="store_true", help="print the graph in Graphviz dot")
    args = ap.parse_args(argv)
    if args.dot:
        edges, _ = graph()
        print("digraph imports {")
        for src, targets in sorted(edges.items()):
            for dst in sorted(targets):
                print(f'  "{src}" -> "{dst}";')
        print("}")
        return 0
    found = problems()
    for line in found:
        print(line)
    edges, _ = graph()
    n = sum(len(t) for t in edges.values())
    print(f"{len(edges)} modules, {n} imports: "
          f"{'ok' if not found else f'{len(found)} problem(s)'}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
