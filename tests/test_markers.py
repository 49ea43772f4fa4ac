"""The slow / distributed marker lists of tests/conftest.py name files and tests that exist, so a
renamed test cannot silently drop out of them (and into the fast subset)."""

from __future__ import annotations

import ast
from pathlib import Path

import conftest

TESTS = Path(__file__).resolve().parent
# The lists name files by their name alone (the folders mirror the package): names are unique.
FILES = {p.name: p for p in TESTS.rglob("test_*.py")}


def _test_names(file: str) -> set[str]:
    tree = ast.parse(FILES[file].read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_test_file_names_are_unique():
    """pytest imports each test file by its name (no __init__.py in the folders), so two files of
    one name in different folders would collide."""
    names = [p.name for p in TESTS.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_every_listed_file_and_test_exists():
    missing = [f for f in conftest.SLOW_FILES | conftest.DISTRIBUTED_FILES if f not in FILES]
    for entry in conftest.SLOW_TESTS | conftest.DISTRIBUTED_TESTS:
        file, name = entry.split("::")
        if file not in FILES or name not in _test_names(file):
            missing.append(entry)
    assert not missing, f"tests/conftest.py marks what does not exist: {sorted(missing)}"


class _Item:
    def __init__(self, path: str, name: str):
        self.path, self.originalname, self.marks = Path(path), name, []

    def add_marker(self, mark):
        self.marks.append(mark.name)


def test_markers_follow_the_lists_and_are_registered(pytestconfig):
    items = [
        _Item("tests/run/test_rehearsal.py", "test_anything"),
        _Item("tests/evaluation/test_validation.py", "test_fsdp2_sharded_model_on_two_ranks_gives_the_same_numbers"),
        _Item("tests/run/test_stages.py", "test_init_from_and_export"),
        _Item("tests/config/test_config.py", "test_anything"),
    ]
    conftest.pytest_collection_modifyitems(pytestconfig, items)
    assert [i.marks for i in items] == [["slow", "distributed"], ["slow", "distributed"], ["slow"], []]
    assert {m.split(":")[0] for m in pytestconfig.getini("markers")} >= {"slow", "distributed"}
