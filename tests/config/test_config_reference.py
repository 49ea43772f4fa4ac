"""docs/configuration.md is generated from pixelrun/config/schema.py (pixelrun/config/reference.py): every key
has help text, and the committed page is exactly what the generator writes today."""

from __future__ import annotations

from pathlib import Path

from pixelrun.config import schema
from pixelrun.config.reference import field_comments, help_texts, keys, reference_markdown

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
REGENERATE = "python -m pixelrun.config.reference > docs/configuration.md"


def test_every_key_has_help_text():
    missing = [key for key, text in help_texts().items() if not text]
    assert not missing, f"config keys without a comment in pixelrun/config/schema.py: {', '.join(missing)}"


def test_committed_page_is_the_generated_one():
    assert PAGE.read_text(encoding="utf-8") == reference_markdown(), f"docs/configuration.md is stale: run {REGENERATE}"


def test_the_page_lists_every_key_once():
    page = reference_markdown()
    for key, *_ in keys():
        assert page.count(f"**`{key}`**") == 1, key
    assert "**`train.steps`** (int, default `2000`)" in page
    assert "**`eval.metrics`** (list[str], default `[auto]`)" in page
    assert "**`run.init_from`** (str | null, default `null`)" in page
    assert "**`stages[i].resolution`** (int | null, default `null`)" in page


def test_help_text_is_the_comment_beside_then_the_comment_above():
    source = (
        "class A:\n"
        "    x: int = 1  # beside x\n"
        "    # above y,\n"
        "    # two lines\n"
        "    y: str = 'a'  # and beside\n"
        "\n"
        "    # a comment cut off by a blank line\n"
        "\n"
        "    z: float = 0.5\n"
        "    w: list[int] = field(\n"
        "        default_factory=list)  # on the last line of w\n"
    )
    assert field_comments(source) == {
        ("A", "x"): "beside x",
        ("A", "y"): "and beside. above y, two lines",
        ("A", "z"): "",
        ("A", "w"): "on the last line of w",
    }


def test_a_new_key_with_a_comment_documents_itself():
    comments = field_comments(Path(schema.__file__).read_text(encoding="utf-8"))
    assert comments[("TrainConfig", "steps")] == help_texts()["train.steps"] != ""
    assert help_texts()["stages[i].routing_ratio"] == "routing.ratio"
