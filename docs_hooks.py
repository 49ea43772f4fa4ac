"""mkdocs hooks (mkdocs.yml `hooks:`): the pages link to files of the repository outside docs/ (kept
benchmark results, configs), which resolve when the Markdown is read in the repository but not on the
built site, where mkdocs copies docs/ alone. Each such link's target is copied into the site under
`repo/` and the link rewritten to the copy: an image shows, a file opens, and a folder opens its
`report.html` (an ablation's self-contained report) or a listing of its files written here.

An ablation folder's runs/ (megabytes of checkpoints' evaluations and samples) is not copied: its
report embeds what it shows."""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).parent
SITE_FOLDER = "repo"
LINK = re.compile(r"\]\((\.\./[^)#\s]+)\)")
SKIP = {"runs", "configs", "__pycache__"}  # the bulk of an ablation folder; its report holds the rest
_copies: dict[Path, Path] = {}  # repository path -> where under the site it goes


def on_page_markdown(markdown: str, page, config, files) -> str:
    page_dir = (Path(config["docs_dir"]) / page.file.src_path).parent

    def rewrite(match: re.Match) -> str:
        target = (page_dir / match.group(1)).resolve()
        if not target.exists() or ROOT not in target.parents:
            return match.group(0)  # tests/test_references.py fails on a link to nothing
        rel = target.relative_to(ROOT)
        _copies[target] = Path(SITE_FOLDER) / rel
        shown = _entry(target)
        depth = len(Path(page.url).parts) if page.url else 0  # use_directory_urls: a page is a folder
        up = "../" * depth
        return (
            f"]({up}{(Path(SITE_FOLDER) / rel / shown).as_posix() if shown else (Path(SITE_FOLDER) / rel).as_posix()})"
        )

    return LINK.sub(rewrite, markdown)


def _entry(target: Path) -> str:
    """What a link to a folder opens: its report.html, else the listing written for it."""
    if not target.is_dir():
        return ""
    return "report.html" if (target / "report.html").is_file() else "index.html"


def on_post_build(config) -> None:
    site = Path(config["site_dir"])
    for source, dest in _copies.items():
        out = site / dest
        if source.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, out)
            continue
        shutil.copytree(source, out, dirs_exist_ok=True, ignore=lambda _d, names: [n for n in names if n in SKIP])
        if not (out / "report.html").is_file():
            (out / "index.html").write_text(_listing(source, out))


def _listing(source: Path, out: Path) -> str:
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "index.html")
    items = "\n".join(f'<li><a href="{html.escape(n)}">{html.escape(n)}</a></li>' for n in names)
    title = html.escape(source.relative_to(ROOT).as_posix())
    return f"<!doctype html><meta charset='utf-8'><title>{title}</title><h1>{title}</h1><ul>\n{items}\n</ul>\n"
