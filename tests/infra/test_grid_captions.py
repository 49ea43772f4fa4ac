"""Captions over a grid's tiles (pixelrun/infra/grids.py, `wrap_to_width`): each line fits its tile in
pixels, nothing is dropped silently, and a cut caption ends with an ellipsis."""

from __future__ import annotations

from pixelrun.infra.grids import label_font, wrap_to_width


def test_every_line_fits_the_tile_and_every_word_is_kept():
    font = label_font(11)
    text = "a large red circle in the top left and a small blue square at the bottom right on a white background"
    lines = wrap_to_width(text, font, 128).split("\n")
    assert all(font.getlength(line) <= 128 for line in lines)
    assert " ".join(lines) == text  # nothing cut off: the whole caption, only wrapped


def test_a_word_wider_than_the_tile_is_split_and_a_long_caption_ends_with_an_ellipsis():
    font = label_font(11)
    lines = wrap_to_width("x" * 200, font, 48).split("\n")
    assert all(font.getlength(line) <= 48 for line in lines) and "".join(lines).startswith("x" * 20)
    cut = wrap_to_width(" ".join(["word"] * 200), font, 64, max_lines=3).split("\n")
    assert len(cut) == 3 and cut[-1].endswith("…") and font.getlength(cut[-1]) <= 64
