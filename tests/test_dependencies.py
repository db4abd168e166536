"""Every third-party package the pipeline and the service import is declared in pyproject.toml, so a
fresh install resolves it within the bounds the code was written against."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCAL = {"pipeline", "service", "contract", "quiet", "tests"}


def imported_top_level_modules() -> set[str]:
    names: set[str] = set()
    for path in [*REPO.glob("pipeline/**/*.py"), *REPO.glob("service/**/*.py"), REPO / "contract.py", REPO / "quiet.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - LOCAL - set(sys.stdlib_module_names) - {"__future__"}


def declared_distributions() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower() for requirement in project["dependencies"]}


def test_every_imported_package_is_declared():
    distributions = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    missing = {}
    for module in sorted(imported_top_level_modules()):
        owners = {name.lower() for name in distributions.get(module, [])}
        if owners and not owners & declared:
            missing[module] = sorted(owners)
    assert not missing, f"imported but not declared in pyproject.toml [project] dependencies: {missing}"
