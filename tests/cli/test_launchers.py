"""tools/*.py and recipes/*.py are thin launchers of dmdr.cli / dmdr.recipes, run by path from anywhere."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dmdr.recipes import RECIPES

REPO = Path(__file__).resolve().parents[2]
TOOLS = sorted(p.stem for p in (REPO / "tools").glob("*.py"))


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_launchers_hold_no_logic_and_edit_no_sys_path():
    launchers = [*(REPO / "tools").glob("*.py"), *(REPO / "recipes").glob("*.py")]
    assert {p.stem for p in (REPO / "recipes").glob("*.py")} == set(RECIPES)
    for path in launchers:
        source = path.read_text()
        assert not re.search(r"sys\.path\s*([.\[]|\+?=)", source) and "spec_from_file_location" not in source, path
        defs = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        assert not defs, f"{path} defines {[d.name for d in defs]}: the code belongs in dmdr/"
        assert len(source.splitlines()) <= 20, path


@pytest.mark.slow
@pytest.mark.parametrize("tool", TOOLS)
def test_each_tool_runs_by_path_from_another_folder(tool, tmp_path):
    done = _run([str(REPO / "tools" / f"{tool}.py"), "--help"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: {tool}.py"), done.stdout[:200]


@pytest.mark.slow
def test_the_profile_launcher_hands_its_name_to_the_standard_library(tmp_path):
    """A tool run by path has tools/ first on sys.path, where tools/profile.py bears the stdlib's name."""
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import cProfile, profile, torch.distributed.checkpoint\n"
            "assert profile.__file__ != sys.argv[1] + '/profile.py' and hasattr(profile, 'Profile'), profile.__file__\n"
            "cProfile.run('1 + 1', sys.argv[2])\n")
    done = _run(["-c", code, str(REPO / "tools"), str(tmp_path / "stats")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "stats").is_file()


@pytest.mark.slow
def test_a_recipe_launcher_takes_overrides_and_reports_one_error_line(tmp_path):
    done = _run([str(REPO / "recipes" / "tiny_dmdr.py"), "--model.famly", "sd3"], cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "model.famly" in line]
    assert errors and "model.family" in errors[0], done.stderr[-2000:]
