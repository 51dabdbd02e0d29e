"""The suite itself: no test reads data from outside the repository, and no skip is silent.

Read from the test sources with `ast`, so a new test file is held to the same rules the day it is added.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = sorted(p for p in (ROOT / "tests").glob("*.py"))

# Where a machine keeps its own files: a test that names one of these passes here and fails (or skips) on a
# clean clone elsewhere. Data a test needs lives in tests/data/ or is made by a fixture. System locations the
# code under test itself uses (a PATH of /usr/bin, SeaweedFS's sockets in /tmp, paths inside a container
# such as /workspace) are not data and stay allowed.
MACHINE_PATH = re.compile(r"^(/(work|home|root|opt|mnt|data|srv|Users)(/|$)|.*\bshared/reference\b)")


def _strings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_no_test_names_a_path_outside_the_repository():
    found = []
    for path in TEST_FILES:
        for line, text in _strings(ast.parse(path.read_text())):
            if MACHINE_PATH.match(text):
                found.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert not found, "tests must not depend on this machine's files (use tests/data/ or a fixture): " + "; ".join(found)


def _is_pytest_attr(node: ast.AST, *names: str) -> bool:
    """`pytest.<a>.<b>` (e.g. names=("mark", "skipif")) or `pytest.<a>`."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return isinstance(node, ast.Name) and node.id == "pytest" and tuple(reversed(parts)) == names


def _locked_modules() -> set[str]:
    """Import names of the locked distributions (as far as name == distribution, normalized)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lockfile", ROOT / "tools" / "lockfile.py")
    lockfile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lockfile)
    return set(lockfile.pins()) | {"torch"}


def test_no_skip_on_an_installed_dependency():
    """`pytest.importorskip` of a package `make install` installs would hide a broken install as a skip."""
    locked, found = _locked_modules(), []
    for path in TEST_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and _is_pytest_attr(node.func, "importorskip") and node.args:
                name = node.args[0].value if isinstance(node.args[0], ast.Constant) else ""
                if re.sub(r"[-_.]+", "-", str(name).split(".")[0]).lower() in locked:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} ({name})")
    assert not found, f"import it: it is in requirements.lock, so it can run here: {found}"


def test_every_skip_says_why():
    silent = []
    for path in TEST_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if _is_pytest_attr(node.func, "mark", "skipif") or _is_pytest_attr(node.func, "mark", "skip"):
                if not any(k.arg == "reason" for k in node.keywords):
                    silent.append(where)
            elif _is_pytest_attr(node.func, "skip") or _is_pytest_attr(node.func, "importorskip"):
                has_message = bool(node.args) if _is_pytest_attr(node.func, "skip") else any(
                    k.arg == "reason" for k in node.keywords)
                if not has_message and not any(k.arg == "reason" for k in node.keywords):
                    silent.append(where)
    assert not silent, f"a skip without a reason: {silent}"


def test_the_checks_above_can_fail():
    """The rules catch what they are for: a machine path and a reasonless skip in a made-up test file."""
    bad = ast.parse('import pytest\nX = "/work/shared/reference/checkpoints"\n'
                    '@pytest.mark.skipif(True)\ndef test_x():\n    pytest.skip()\n')
    assert [text for _, text in _strings(bad) if MACHINE_PATH.match(text)]
    calls = [n for n in ast.walk(bad) if isinstance(n, ast.Call)]
    assert any(_is_pytest_attr(c.func, "mark", "skipif") and not c.keywords for c in calls)
    assert any(_is_pytest_attr(c.func, "skip") and not c.args for c in calls)
