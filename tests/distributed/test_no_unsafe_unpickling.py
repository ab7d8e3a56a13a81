"""No code path in dmdr/, kernels/ or tools/ unpickles without restriction (see dmdr.distributed.safe_load)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TREES = ("dmdr", "kernels", "tools")
PICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
RESTRICTED = REPO / "dmdr" / "distributed" / "safe_load.py"
"""The one module allowed to import pickle: it subclasses ``pickle.Unpickler`` with an allowlisting ``find_class``."""


def _sources() -> list[Path]:
    files = [p for tree in TREES for p in sorted((REPO / tree).rglob("*.py"))]
    assert len(files) > 20  # the walk found the code
    return files


def _violations(path: Path) -> list[str]:
    text = path.read_text()
    tree = ast.parse(text, filename=str(path))
    found = []
    if "weights_only=False" in text.replace(" ", ""):
        found.append(f"{path}: weights_only=False")
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n.split(".")[0] in PICKLERS for n in names) and path != RESTRICTED:
                found.append(f"{where}: imports {', '.join(names)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            kwargs = {k.arg: k.value for k in node.keywords}
            if owner in PICKLERS and node.func.attr in ("load", "loads", "Unpickler"):
                found.append(f"{where}: {owner}.{node.func.attr}(...)")
            if owner == "torch" and node.func.attr == "load":
                flag = kwargs.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
            if owner in ("np", "numpy") and node.func.attr == "load" and "allow_pickle" in kwargs:
                found.append(f"{where}: numpy.load(allow_pickle=...)")
    return found


def test_no_unrestricted_unpickling_in_the_tree():
    found = [v for path in _sources() for v in _violations(path)]
    assert not found, "\n".join(found)


def test_the_restricted_module_only_subclasses_the_unpickler():
    text = RESTRICTED.read_text()
    assert "class _MetadataUnpickler(pickle.Unpickler)" in text and "def find_class" in text
    assert "pickle.load(" not in text and "pickle.loads(" not in text


def test_the_check_finds_what_it_forbids(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("import pickle\nimport torch\nx = torch.load('f')\ny = torch.load('f', weights_only=False)\n"
                   "z = pickle.loads(b'')\nw = torch.load('f', weights_only=True)\n")
    found = _violations(bad)
    assert len(found) == 5, found  # the import, both bad torch.loads (one also as text), pickle.loads
