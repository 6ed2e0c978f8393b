"""The house's arrows: the import contracts hold, every contract the map names is in pyproject.toml,
and an upward import breaks them (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sae_core", "tasks", "flows", "deployments")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def contract_names() -> list[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [c["name"] for c in config["tool"]["importlinter"]["contracts"]]


def mapped_contract_names() -> list[str]:
    """The contracts docs/ARCHITECTURE.md lists (its `- `name`` lines under 'The arrows')."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## The arrows, checked", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^- `([^`]+)`", section, flags=re.M)


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports over the packages under `root`, with `root`'s pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True
    )


def copy_of_the_house(target: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, target / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(REPO / "pyproject.toml", target)
    return target


def test_the_map_names_every_contract_and_pyproject_holds_them_all():
    assert mapped_contract_names() == contract_names()
    assert len(contract_names()) == 4


def test_the_contracts_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_rooms_contract(tmp_path):
    root = copy_of_the_house(tmp_path)
    store = root / "sae_core" / "storage" / "store.py"
    store.write_text(store.read_text() + "\nfrom sae_core.sae import WEIGHTS_FILE  # noqa\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert "sae_core.storage is not allowed to import sae_core.sae" in result.stdout
    assert "sae_core.storage.store -> sae_core.sae" in result.stdout
