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


def test_no_public_name_is_a_submodule_that_importing_would_put_in_its_place():
    """``adapterkit.<name>`` stays the public function or class whatever was imported before: Python sets a package's
    attribute to a submodule of the same name when that submodule is first imported (``adapterkit.fingerprint`` was
    the module, not the function, once ``adapterkit.attach`` had been imported)."""
    import subprocess
    import sys

    import adapterkit

    submodules = {path.stem for path in (ROOT / "adapterkit").iterdir() if path.suffix == ".py" or path.is_dir()}
    assert set(adapterkit.__all__).isdisjoint(submodules)
    check = ("import adapterkit.attach, adapterkit.onnx.export, adapterkit.merge, adapterkit.train.base, adapterkit; "
             "assert all(not isinstance(getattr(adapterkit, name), type(adapterkit)) for name in adapterkit.__all__)")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
