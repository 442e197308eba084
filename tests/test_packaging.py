"""What a non-editable install ships: every package of the source tree, and the schema."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "adapterkit").rglob("__init__.py")}
    found |= {"adapterkit.converters"}  # installed from converters/ by package-dir
    assert found == listed, f"missing {sorted(found - listed)}, stale {sorted(listed - found)}"
