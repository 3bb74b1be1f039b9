"""The documentation site builds with ``mkdocs build --strict`` (a broken link or anchor fails), and every public
object the API reference documents has a docstring."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "Replace every eligible conv" in api  # the reference is generated from the docstrings


def _documented_members() -> list[tuple[str, str]]:
    """(module, member) for every ``::: module`` block of docs/api.md and its ``members:`` list."""
    out, module = [], None
    for line in (ROOT / "docs" / "api.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("::: "):
            module = line[4:].strip()
        elif (m := re.match(r"\s+- (\w+)$", line)) and module:
            out.append((module, m.group(1)))
    return out


def test_every_public_name_is_in_the_reference_with_a_docstring():
    documented = _documented_members()
    import orepa_convert

    public = {n for n in orepa_convert.__all__ if not n.startswith("_") and n != "BRANCHES"}
    assert public <= {name for mod, name in documented if mod == "orepa_convert"}, "add them to docs/api.md"
    for module, name in documented:
        for framework in ("lightning", "ultralytics"):
            if framework in module:
                pytest.importorskip(framework)
        obj = getattr(importlib.import_module(module), name)
        assert inspect.getdoc(obj), f"{module}.{name} has no docstring"


def test_readme_links_point_at_pages_that_exist():
    for target in re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text(encoding="utf-8")):
        assert (ROOT / target).is_file(), target
