"""The built documentation site shows what its pages link to (issue 30: the Benchmarks page showed
alt text instead of its images, and links into benchmarks/results/ went nowhere on the site)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urljoin

import pytest

ROOT = Path(__file__).parents[1]
REF = re.compile(r'(?:src|href)="([^"#?]+)')


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("material")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _local_refs(page: Path, site: Path) -> list[tuple[str, Path]]:
    base = "file://" + page.as_posix()
    out = []
    for ref in REF.findall(page.read_text()):
        if ref.startswith(
            ("http:", "https:", "mailto:", "data:", "javascript:", "/")
        ):  # "/": 404.html, site-root paths
            continue
        target = Path(unquote(urljoin(base, ref).removeprefix("file://")))
        if target.is_dir():
            target = target / "index.html"
        out.append((ref, target))
    return out


def test_every_image_and_repository_link_of_the_site_resolves(site):
    broken = []
    for page in site.rglob("*.html"):
        if "repo" in page.relative_to(site).parts:
            continue  # the copied reports link within themselves
        for ref, target in _local_refs(page, site):
            if ("repo/" in ref or ref.endswith((".png", ".jpg", ".svg"))) and not target.is_file():
                broken.append(f"{page.relative_to(site)}: {ref}")
    assert broken == []


def test_the_benchmarks_page_shows_its_images_and_opens_its_results(site):
    page = site / "benchmarks" / "index.html"
    refs = dict(_local_refs(page, site))
    images = [t for r, t in refs.items() if r.endswith(".png")]
    assert len(images) >= 3 and all(t.is_file() and t.stat().st_size > 1000 for t in images)
    ablation = next(t for r, t in refs.items() if "ablations/tread-deep-cpu" in r)
    assert ablation.name == "report.html" and "tread" in ablation.read_text()
    listing = next(t for r, t in refs.items() if r.rstrip("/").endswith("demo-cpu/index.html"))
    assert "final_grid.png" in listing.read_text()
