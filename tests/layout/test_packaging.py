"""Every package under dmdr/ is listed in pyproject.toml, so a non-editable install ships it too."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_dmdr_package_is_installed():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "dmdr").rglob("__init__.py")}
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert config["package-dir"]["dmdr.kernels"] == "kernels" and "dmdr.kernels" in listed
