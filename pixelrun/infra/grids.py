"""Pictures for people: labelled sample grids."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin


def save_png(image: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


# Fonts with wide Unicode coverage, tried in order (DejaVu ships with most Linux systems and with
# matplotlib); Pillow's built-in font, the last resort, covers ASCII only.
_FONTS = (
    "DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/arial.ttf",
)
_NOT_A_CHARACTER = "\U0010fffd"  # a private-use code point no font draws: its mask is the missing-glyph box


@functools.lru_cache(maxsize=4)
def label_font(size: int = 11) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for path in _FONTS:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def drawable(text: str, font) -> str:
    """`text` with every character the font has no glyph for replaced by "?": a visible mark, where
    the font would draw an empty box that reads like a rendering bug."""
    missing = bytes(font.getmask(_NOT_A_CHARACTER))
    return "".join(ch if ch.isspace() or bytes(font.getmask(ch)) != missing else "?" for ch in text)


def wrap_to_width(text: str, font, width: int, max_lines: int = 8) -> str:
    """`text` in lines that each fit `width` pixels in `font` (a caption over its own tile, not into
    the next one); past `max_lines` the last line ends with an ellipsis, so a cut caption says so."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            while font.getlength(word) > width and len(word) > 1:  # a word wider than the tile: split it
                cut = next((i for i in range(len(word), 1, -1) if font.getlength(word[:i]) <= width), 1)
                lines.append(word[:cut])
                word = word[cut:]
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and font.getlength(lines[-1] + "…") > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "…"
    return "\n".join(lines)


def save_grid(images: np.ndarray, captions: list[str], path: str | Path, tile: int = 160, columns: int = 4) -> Path:
    """A grid of uint8 [B, H, W, 3] images, each enlarged (nearest, so pixels stay honest) to about
    `tile` px on its longer side and labelled with its prompt underneath."""
    b, h, w, _ = images.shape
    scale = max(1, tile // max(h, w))
    tw, th = w * scale, h * scale
    font = label_font(11)
    wrapped = [wrap_to_width(drawable(c, font), font, tw, max_lines=6) for c in captions]
    label_h = 14 * max((s.count("\n") + 1 for s in wrapped), default=1) + 6
    cols = min(columns, b)
    rows = (b + cols - 1) // cols
    pad = 6
    canvas = Image.new("RGB", (cols * (tw + pad) + pad, rows * (th + label_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(b):
        r, c = divmod(i, cols)
        x0, y0 = pad + c * (tw + pad), pad + r * (th + label_h + pad)
        canvas.paste(Image.fromarray(images[i]).resize((tw, th), Image.Resampling.NEAREST), (x0, y0))
        draw.multiline_text((x0, y0 + th + 3), wrapped[i], fill=(0, 0, 0), font=font, spacing=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = PngImagePlugin.PngInfo()  # the captions whole, as text: the labels wrap and cut them
    meta.add_itxt("captions", json.dumps(list(captions), ensure_ascii=False))
    canvas.save(path, pnginfo=meta)
    return path
