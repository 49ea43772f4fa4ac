"""The page of `pixelrun demo` (Gradio): the prompt and the sampling settings on the left, one image
per model on the right (an ablation's variants in rows, its seeds in columns) and the verdict table
under them. cli/demo_draw.py knows the folder and draws; this module only lays out and serves.

Served on 127.0.0.1 only, with no share link and no analytics: the page works on a machine without
a network (the tests run it on one). The images are served as PNG, lossless,
so what the browser shows is the array `generate` drew (Gradio's default, WebP, is lossy)."""

from __future__ import annotations

import os
import shlex
import socket
from dataclasses import dataclass

from pixelrun.cli.demo_draw import Drawer, Settings, guidance_mode_choices, sampler_choices, weight_choices
from pixelrun.config import ConfigError

HOST = "127.0.0.1"
IMAGE_SIDE = 256  # pixels on screen per image; small models draw 32x32, shown enlarged without smoothing
CSS = ".pixelrun-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"
SYSTEM_FONTS = (["ui-sans-serif", "system-ui", "sans-serif"], ["ui-monospace", "monospace"])  # no font files to serve


def _gradio():
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported and when a page is built
    import gradio as gr

    return gr


def sample_command(drawer: Drawer, prompt: str, settings: Settings) -> str:
    """The `pixelrun sample` line that draws the same image (RUN standing for each run of an ablation)."""
    study = drawer.study
    checkpoint = str(study.folder) if study.kind == "run" else "RUN"
    words = ["pixelrun", "sample", "--checkpoint", checkpoint, "--prompt", prompt, "--out", "OUT"]
    words += ["--weights", settings.weights, *settings.overrides()]
    return " ".join(w if w == "RUN" else shlex.quote(w) for w in words)


def _controls(gr, drawer: Drawer) -> list:
    """The inputs, in the order `_on_generate` takes them; each choice list comes from cli/demo_draw.py."""
    d = drawer.defaults()
    modes = guidance_mode_choices(drawer.saved)
    samplers = sampler_choices(drawer.saved)
    return [
        gr.Textbox(label="Prompt", lines=2, elem_id="prompt", placeholder="a red circle above a blue square"),
        gr.Number(label="Steps (sample.steps)", value=d.steps, precision=0, minimum=1, elem_id="steps"),
        gr.Number(label="Guidance (sample.guidance)", value=d.guidance, minimum=0, elem_id="guidance"),
        gr.Radio(
            modes,
            value=d.guidance_mode if d.guidance_mode in modes else modes[0],
            label="Guidance mode",
            elem_id="mode",
        ),
        gr.Number(label="Seed (sample.seed)", value=d.seed, precision=0, elem_id="seed"),
        gr.Radio(samplers, value=samplers[0], label="Sampler", elem_id="sampler"),
        gr.Radio(weight_choices(drawer.study.entries), value="ema", label="Weights (--weights)", elem_id="weights"),
    ]


def _images(gr, drawer: Drawer) -> list:
    """One image per entry: an ablation's variants as rows, their seeds as columns."""
    entries = drawer.study.entries
    rows: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        rows.setdefault(e.variant, []).append(i)
    images: list = [None] * len(entries)
    for indices in rows.values():
        with gr.Row():
            for i in indices:
                images[i] = gr.Image(
                    label=entries[i].label,
                    format="png",
                    type="numpy",
                    interactive=False,
                    height=IMAGE_SIDE,
                    width=IMAGE_SIDE,
                    elem_id=f"image-{i}",
                    elem_classes="pixelrun-image",
                    buttons=["download", "fullscreen"],  # no "share": it posts to the Hugging Face Hub
                )
    return images


def build(drawer: Drawer):
    """The page (a gr.Blocks), its Generate button wired to `drawer.draw`."""
    gr = _gradio()
    study = drawer.study
    what = "run" if study.kind == "run" else f"ablation, {len(study.entries)} runs"
    # delete_cache: the PNGs Gradio serves are its own copies (in its temporary folder), dropped after an hour
    with gr.Blocks(
        title=f"pixelrun demo: {study.folder.name}", analytics_enabled=False, delete_cache=(600, 3600)
    ) as page:
        gr.Markdown(f"### pixelrun demo: `{study.folder}` ({what})")
        if study.notes:
            gr.Markdown("\n".join(f"- {line}" for line in study.notes), elem_id="notes")
        with gr.Row():
            with gr.Column(scale=1, min_width=240):
                inputs = _controls(gr, drawer)
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=4):
                images = _images(gr, drawer)
                if study.kind == "ablation":  # under the images: the table is as wide as the study's metrics
                    gr.Markdown(study.verdict, elem_id="verdict")

        def clear():  # the earlier images go at once: an image on the page is never one of other settings
            return [*([None] * len(images)), PENDING]

        def on_generate(prompt, steps, guidance, mode, seed, sampler, weights):
            return _on_generate(drawer, len(images), prompt, steps, guidance, mode, seed, sampler, weights)

        for trigger in (button.click, inputs[0].submit):
            trigger(clear, outputs=[*images, status], queue=False).then(
                on_generate, inputs=inputs, outputs=[*images, status], concurrency_limit=1
            )
    return page


PENDING = "Drawing…"


def _on_generate(drawer: Drawer, count: int, prompt, steps, guidance, mode, seed, sampler, weights) -> list:
    """The images and the status line: the `pixelrun sample` line of the same images, or why nothing
    was drawn (a value the config refuses: the line `pixelrun sample` prints)."""
    if not prompt or not prompt.strip():
        return [*([None] * count), "Not drawn: type a prompt first."]
    if steps is None or guidance is None or seed is None:
        return [*([None] * count), "Not drawn: steps, guidance and seed each need a number."]
    settings = Settings(int(steps), float(guidance), mode, int(seed), weights, sampler)
    try:
        images, notes = drawer.draw(prompt, settings)
    except ConfigError as e:
        return [*([None] * count), f"Not drawn: `{e}`"]
    line = f"Drawing {drawer.drawings}; the same images: `{sample_command(drawer, prompt, settings)}`"
    return [*images, "\n\n".join([*notes, line])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    page: object
    url: str

    def wait(self) -> None:
        self.page.block_thread()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.page.close(verbose=False)  # type: ignore[attr-defined]


def serve(drawer: Drawer, port: int = 0) -> Server:
    """The page served on 127.0.0.1:`port` (a free one for 0) in a thread of this process."""
    gr = _gradio()
    page = build(drawer)
    theme = gr.themes.Default(font=SYSTEM_FONTS[0], font_mono=SYSTEM_FONTS[1])
    _, url, _ = page.launch(
        server_name=HOST,
        server_port=port or free_port(),
        share=False,
        inbrowser=False,
        prevent_thread_lock=True,
        quiet=True,
        show_error=True,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        run_history=False,
        footer_links=[],
        theme=theme,
        css=CSS,
    )
    return Server(page, url.rstrip("/"))
