"""The import contracts hold, and they fail when a cycle or an upward import comes back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "fedlora", copy / "fedlora", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    return copy


def _prepend(path: Path, line: str) -> None:
    text = path.read_text()
    # After the module docstring and `from __future__`: where an import would go.
    anchor = "from __future__ import annotations\n"
    assert anchor in text
    path.write_text(text.replace(anchor, anchor + line + "\n", 1))


def test_the_contracts_hold_on_the_package(tree):
    result = _lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_config_importing_a_method_registry_breaks_the_layers(tree):
    # The cycle the layering removed: config checked strategy names against the registry.
    _prepend(tree / "fedlora" / "config" / "__init__.py", "from fedlora.strategies import STRATEGIES  # noqa")
    result = _lint(tree)
    assert result.returncode != 0
    assert "Layers: each imports only the layers below it BROKEN" in result.stdout
    assert "fedlora.config -> fedlora.strategies" in result.stdout


def test_an_import_inside_a_function_counts_too(tree):
    path = tree / "fedlora" / "data" / "registry.py"
    path.write_text(path.read_text() + "\n\ndef _late():\n    from fedlora.data import federated  # noqa\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "No import cycles inside a package BROKEN" in result.stdout


def test_library_code_importing_an_entry_point_is_forbidden(tree):
    _prepend(tree / "fedlora" / "server" / "loop.py", "import fedlora.client_app  # noqa")
    result = _lint(tree)
    assert result.returncode != 0
    assert "Library code never imports the Flower entry points or the tools BROKEN" in result.stdout
