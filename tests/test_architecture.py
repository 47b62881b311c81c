"""The layout's rules, checked: the import contracts in pyproject.toml (import-linter) and the
module size limit.

Size rule: a module outside tests/ may be longer than ``MAX_LINES`` only if one of its first
``MARKER_LINES`` lines is a comment ``# size: <why this module is long>``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
MAX_LINES = 400
MARKER_LINES = 3
SIZE_MARKER = re.compile(r"^# size: \S.{9,}$")  # a reason of ten characters or more


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    config = root / "pyproject.toml"
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(config)], cwd=root, capture_output=True, text=True,
                          timeout=300)


def test_import_contracts_are_kept():
    out = lint_imports(REPO)
    assert out.returncode == 0, f"lint-imports found broken contracts:\n{out.stdout}\n{out.stderr}"
    assert "0 broken" in out.stdout


def test_each_contract_catches_its_violation(tmp_path: Path):
    """The contracts bite: a tree that breaks each rule once breaks every contract."""
    violations = {
        "patcher/__init__.py": "import tasks",
        "tasks/__init__.py": "import flows",
        "flows/__init__.py": "import patchflow",
        "patchflow/__init__.py": "import benchmarks",
        "benchmarks/__init__.py": "import tasks",
        "editdata/__init__.py": "import tasks",
        "editdata/qa.py": "import torch",
    }
    for package in ("patcher", "tasks", "flows", "patchflow", "editdata", "benchmarks"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    for module in ("factcheck", "qa", "geonames", "hashing", "factcheck_model"):
        (tmp_path / "editdata" / f"{module}.py").write_text("")
    for path, line in violations.items():
        (tmp_path / path).write_text(line + "\n")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    out = lint_imports(tmp_path)
    assert out.returncode != 0
    contracts = out.stdout.count(" KEPT") + out.stdout.count(" BROKEN")
    assert contracts >= len(violations) and " KEPT" not in out.stdout, out.stdout


def source_modules(repo: Path = REPO) -> list[Path]:
    """Our Python files outside tests/: tracked, or new and not ignored."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "*.py"],
                            cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    return sorted(repo / p for p in set(listed) if not p.startswith("tests/") and (repo / p).is_file())


def oversized(paths: list[Path], root: Path = REPO) -> list[str]:
    """``path: N lines`` for every file over ``MAX_LINES`` lines without a size reason at its top."""
    out = []
    for path in paths:
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > MAX_LINES and not any(SIZE_MARKER.match(line) for line in lines[:MARKER_LINES]):
            out.append(f"{path.relative_to(root)}: {len(lines)} lines")
    return out


def test_the_size_rule(tmp_path: Path):
    body = "x = 1\n" * MAX_LINES
    cases = {
        "at_limit.py": body,
        "over.py": body + "y = 2\n",
        "reasoned.py": "# size: one table of every model family, read as data\n" + body,
        "empty_reason.py": "# size:\n" + body,
        "marker_too_late.py": '"""doc"""\n\n\n# size: one table of every model family, read as data\n' + body,
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    flagged = {line.split(":")[0] for line in oversized(sorted(tmp_path.glob("*.py")), tmp_path)}
    assert flagged == {"over.py", "empty_reason.py", "marker_too_late.py"}


def test_no_module_outside_tests_is_over_the_limit_without_a_reason():
    modules = source_modules()
    assert any(p.name == "cli.py" and p.parent.name == "patchflow" for p in modules)
    assert not any("tests" in p.relative_to(REPO).parts[:1] for p in modules)
    too_long = oversized(modules)
    assert not too_long, (f"modules over {MAX_LINES} lines need a first-lines comment '# size: <reason>' "
                          f"or a split:\n" + "\n".join(too_long))


@pytest.mark.parametrize("package", ["patchflow", "editdata"])
def test_new_packages_are_installed_with_the_project(package: str):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
        import tomli as tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert f"{package}*" in project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert project["project"]["scripts"]["patchflow"] == "patchflow.cli:main"
