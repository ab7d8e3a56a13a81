"""Layout figures of a dmdr source tree, as a markdown table: issue 25's before/after measurements.

    python benchmarks/layout_figures.py                          # this checkout
    git worktree add /tmp/before25 8bd863c                       # the commit before issue 25's work
    python benchmarks/layout_figures.py /tmp/before25 .          # both, side by side

For each tree, over the library (``dmdr/`` and ``kernels/``, installed as ``dmdr.kernels``): modules and lines
(mean, max, how many over 400), the ten longest function definitions, the ``duplicates`` tool's pair count for the
whole tree (every tracked file, tests included, when the tool is on PATH), the share of internal imports
(``dmdr.*``, relative) written inside a function, and the import circles (strongly connected components of the
module graph, and of the graph folded onto ``dmdr.<top>`` packages). Read from the source with ``ast``; nothing
is imported or run, so any commit can be measured.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

LONG_MODULE = 400
LIBRARY = {"dmdr": "dmdr", "kernels": "dmdr.kernels"}
"""Source folder -> its dotted package name."""


@dataclass
class Figures:
    modules: dict[str, int] = field(default_factory=dict)
    """Dotted module name -> lines."""
    definitions: list[tuple[int, str]] = field(default_factory=list)
    """(lines, ``module:qualified.name``) of every function."""
    imports_total: int = 0
    imports_in_functions: int = 0
    graph: dict[str, set[str]] = field(default_factory=dict)
    duplicates: str = "n/a"


def library_files(repo: Path) -> dict[str, Path]:
    found = {}
    for folder, package in LIBRARY.items():
        for path in sorted((repo / folder).rglob("*.py")):
            parts = list(path.relative_to(repo / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _target(node: ast.Import | ast.ImportFrom, name: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    """The internal modules an import statement reaches (empty for third-party imports)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = name if is_package else name.rpartition(".")[0]
            kept = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*kept, base] if base else kept)
        # `from p import name`: the submodule p.name when there is one, else p (as tests/layout reads it)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = set()
    for n in names:
        while n and n not in known:
            n = n.rpartition(".")[0]
        if n.startswith("dmdr"):
            out.add(n)
    return sorted(out)


def _walk(tree: ast.AST, in_function: bool = False):
    """``(node, inside a function)`` for every node."""
    for child in ast.iter_child_nodes(tree):
        yield child, in_function
        yield from _walk(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))


def _definitions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield node.end_lineno - node.lineno + 1, name
            yield from _definitions(node, name + ".")


def measure(repo: Path, seconds: int) -> Figures:
    fig = Figures()
    known = library_files(repo)
    for name, path in known.items():
        text = path.read_text()
        fig.modules[name] = len(text.splitlines())
        tree = ast.parse(text)
        fig.definitions += [(n, f"{name}:{d}") for n, d in _definitions(tree)]
        fig.graph[name] = set()
        for node, in_function in _walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            targets = [t for t in _target(node, name, path.name == "__init__.py", known) if t != name]
            if not targets and not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            fig.imports_total += 1
            fig.imports_in_functions += in_function
            fig.graph[name].update(targets)
    fig.definitions.sort(key=lambda d: (-d[0], d[1]))
    fig.duplicates = _duplicates(repo, seconds)
    return fig


def _duplicates(repo: Path, seconds: int) -> str:
    if shutil.which("duplicates") is None:
        return "n/a (no `duplicates` on PATH)"
    out = subprocess.run(["duplicates", "--repo", str(repo), "--most", "1", "--seconds", str(seconds)],
                         capture_output=True, text=True).stdout
    first = out.splitlines()[0] if out else ""
    match = re.match(r"(\d+) pairs", first)
    return match.group(1) if match else ("0" if first.startswith("no duplicates") else first)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (iterative Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:  # v roots a component: everything above it on the stack
                cut = stack.index(v)
                component, stack[cut:] = stack[cut:], []
                on_stack.difference_update(component)
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph folded onto ``dmdr.<top>`` (``dmdr.losses.dmd`` -> ``dmdr.losses``)."""
    def top(m: str) -> str:
        return ".".join(m.split(".")[:2])

    folded: dict[str, set[str]] = {}
    for a, targets in graph.items():
        folded.setdefault(top(a), set()).update(top(b) for b in targets if top(b) != top(a))
    return folded


def _circle_text(found: list[list[str]]) -> str:
    if not found:
        return "none"
    return "; ".join(" <-> ".join(n.removeprefix("dmdr.") for n in c) for c in found)


def table(labels: list[str], figs: list[Figures]) -> str:
    rows: list[tuple[str, list[str]]] = []

    def row(what: str, values: list) -> None:
        rows.append((what, [str(v) for v in values]))

    row("library modules (dmdr/, kernels/)", [len(f.modules) for f in figs])
    row("library lines", [sum(f.modules.values()) for f in figs])
    row("lines per module: mean", [f"{sum(f.modules.values()) / len(f.modules):.0f}" for f in figs])
    row("lines per module: max", [f"{max(f.modules.values())} ({max(f.modules, key=f.modules.get)})" for f in figs])
    row(f"modules over {LONG_MODULE} lines", [sum(n > LONG_MODULE for n in f.modules.values()) for f in figs])
    row("`duplicates` pairs (whole tree)", [f.duplicates for f in figs])
    row("internal imports inside functions", [
        f"{f.imports_in_functions} of {f.imports_total} ({100 * f.imports_in_functions / f.imports_total:.0f}%)"
        for f in figs])
    module_circles = [circles(f.graph) for f in figs]
    row("module import circles", [f"{len(c)}: {_circle_text(c)}" for c in module_circles])
    package_circles = [circles(packages(f.graph)) for f in figs]
    row("package circles (dmdr.<top>)", [f"{len(c)}: {_circle_text(c)}" for c in package_circles])
    for i in range(10):
        row(f"longest definition {i + 1}", [f"{f.definitions[i][0]} {f.definitions[i][1].removeprefix('dmdr.')}"
                                            for f in figs])
    lines = ["| figure | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {what} | " + " | ".join(values) + " |" for what, values in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", type=Path, default=[Path(".")], help="source trees (default: .)")
    parser.add_argument("--seconds", type=int, default=120, help="time limit of each `duplicates` run")
    args = parser.parse_args(argv)
    for tree in args.trees:
        if not (tree / "dmdr").is_dir():
            print(f"error: {tree}: no dmdr/ folder (not a dmdr source tree)", file=sys.stderr)
            return 2
    figs = [measure(t.resolve(), args.seconds) for t in args.trees]
    labels = [_label(t) for t in args.trees]
    print(table(labels, figs))
    return 0


def _label(tree: Path) -> str:
    rev = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"{tree} ({rev.stdout.strip()})" if rev.returncode == 0 else str(tree)


if __name__ == "__main__":
    sys.exit(main())
