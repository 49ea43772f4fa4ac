"""Every repository path that the repository's own files name exists: paths under the top-level folders
(`pixelrun/...`, `docs/...`, `configs/...`, `benchmarks/...`, `tests/...`, `.ci/...`), bare Markdown
names (`CHANGELOG.md`), relative Markdown links and dotted `pixelrun.module.name` references in the
.py, .md, .yaml and .sh files. A moved or renamed file, or a page that was never written, fails here."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh"}
SKIP_DIRS = {
    ".git",
    ".venv",
    "venv",
    "site",
    "build",
    "dist",
    "runs",
    "out",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".cache",
    "node_modules",
    "gpu-out",
    ".devcarry",
    "shared",
}

TOP = r"(?:pixelrun|docs|configs|benchmarks|tests|\.ci)"
# a path under a top-level folder, not the tail of a longer path (runs/demo/..., /abs/pixelrun/...)
ROOTED = re.compile(rf"(?<![\w./~$-]){TOP}/[\w./*{{}}-]*")
BARE_MD = re.compile(r"(?<![\w./~$-])[\w-]+\.md\b")
MD_LINK = re.compile(r"\]\(([^()\s]+)\)")
DOTTED = re.compile(r"(?<![\w./-])pixelrun(?:\.[A-Za-z_]\w*)+")
PLACEHOLDER = re.compile(r"[{}<>]|\.\.\.")


def repo_files() -> list[Path]:
    out = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        if path.is_file() and path.suffix in SUFFIXES:
            out.append(path)
    return sorted(out)


def _exists(rel: str, base: Path) -> bool:
    if "*" in rel:
        return any(ROOT.glob(rel))
    if rel.startswith("benchmarks/results/") and (ROOT / rel).parent.is_dir():
        return True  # a result file a script's usage line writes into its kept folder
    return (ROOT / rel).exists() or (base / rel).exists()


def rooted_paths(text: str) -> list[str]:
    """`pixelrun/x.py`, `benchmarks/results/...`: every path under a top-level folder, placeholders
    (`tests/test_{name}.py`, `docs/...`) left out."""
    found = []
    for m in ROOTED.finditer(text):
        path = m.group(0).rstrip(".,:;)'\"`")
        if not PLACEHOLDER.search(path):
            found.append(path)
    return found


@functools.cache
def _all_names() -> set[str]:
    """The names of every scanned file: a bare `summary.md` may be a file a script writes into a
    kept results folder."""
    return {f.name for f in repo_files()}


def _defined_names(module_file: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(module_file.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):  # a name a module imports is an attribute of it too
            names.update(a.asname or a.name for a in node.names)
    return names


def dotted_exists(ref: str) -> bool:
    """`pixelrun.config.span_for_depth`: the longest prefix that is a module of the package, then
    (at most one) name defined in it; `pixelrun.config.ConfigError.key`-like deeper names pass on
    the class."""
    parts = ref.split(".")
    for n in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:n])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            rest = parts[n:]
            return not rest or rest[0].startswith("__") or rest[0] in _defined_names(module)
    return False


def broken_references(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    base = path.parent
    broken = [p for p in rooted_paths(text) if not _exists(p, base)]
    for name in BARE_MD.findall(text):
        if not any((d / name).exists() for d in (base, ROOT, ROOT / "docs")) and name not in _all_names():
            broken.append(name)
    if path.suffix == ".md":
        for target in MD_LINK.findall(text):
            target = target.split("#")[0]
            if target and not re.match(r"[a-z]+:", target) and not (base / target).exists():
                broken.append(f"link {target}")
    # one-letter modules are the placeholders of examples (`pixelrun.a` in tests/test_layers.py)
    broken += [ref for ref in DOTTED.findall(text) if len(ref.split(".")[1]) > 1 and not dotted_exists(ref)]
    return broken


# mkdocs.yml's nav is checked by `mkdocs build --strict`; this file holds deliberate broken examples
NOT_SCANNED = {"mkdocs.yml", "tests/test_references.py"}


def test_every_named_repository_path_exists():
    problems = [
        f"{f.relative_to(ROOT)}: {ref}"
        for f in repo_files()
        if str(f.relative_to(ROOT)) not in NOT_SCANNED
        for ref in broken_references(f)
    ]
    assert not problems, "references to files or names that do not exist:\n" + "\n".join(problems)


def test_the_scanner_finds_each_kind_of_reference(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "See RECIPE.md, pixelrun/nowhere.py and docs/missing.md; [a link](gone.md#x), "
        "[site](https://example.org/a.md) and pixelrun.model.routing.span_for_depth. Fine: "
        "pixelrun/config/__init__.py, docs/recipe.md, CHANGELOG.md, runs/demo/config.yaml, "
        "pixelrun.config.span_for_depth, tests/test_{name}.py, benchmarks/results/bench-*.json.\n"
    )
    assert broken_references(page) == [
        "pixelrun/nowhere.py",
        "docs/missing.md",
        "RECIPE.md",
        "gone.md",
        "link gone.md",
        "pixelrun.model.routing.span_for_depth",
    ]
