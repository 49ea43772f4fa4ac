"""pixelrun demo FOLDER: a page on this machine to type a prompt and see what a checkpoint draws.

FOLDER is a run (`pixelrun train`'s folder, one of its checkpoints, or a `pixelrun export`) or an
ablation (`pixelrun ablate`'s folder): for an ablation, every (variant, seed) run is drawn from the
same prompt with the same noise, side by side, with the study's verdict table. Each image equals
`pixelrun sample`'s for the same settings. cli/demo_draw.py opens the folder and draws,
cli/demo_page.py builds and serves the page (Gradio, the `demo` extra); this module is the command:
FOLDER, --port and --device checked, every model loaded, before the page is served (docs/demo.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pixelrun.config import ConfigError

EPILOG = """the page (http://127.0.0.1:PORT, this machine only; Ctrl-C stops it):
  a prompt, and the sampling settings of `pixelrun sample` (sample.steps, sample.guidance,
  sample.guidance_mode, sample.seed, --weights); each image equals
  `pixelrun sample --checkpoint RUN --prompt PROMPT --weights W sample.steps=... sample.seed=...`

examples:
  pixelrun demo runs/demo
  pixelrun demo runs/ablations/tread --port 7860
(needs the demo extra: pip install 'pixelrun[demo]'; docs/demo.md)"""


def add_parser(subparsers) -> None:
    s = subparsers.add_parser(
        "demo",
        help="a local page to draw from a run, or from every run of an ablation side by side",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serves a page on 127.0.0.1 to type a prompt and draw from FOLDER's checkpoint; for an\n"
        "ablation's folder, every variant and seed side by side with the same noise, with the\n"
        "study's verdict table. Writes nothing into FOLDER.",
        epilog=EPILOG,
    )
    s.add_argument(
        "folder", metavar="FOLDER", help="a run folder (or a checkpoint, or an export) or an ablation folder"
    )
    s.add_argument("--port", type=int, default=0, help="the port on 127.0.0.1 (default: a free one, printed)")
    s.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    s.set_defaults(func=run)


def _check_port(port: int) -> None:
    """--port: 0 (a free one) or a port of 127.0.0.1 nothing else listens on, said before any work."""
    import socket

    if not 0 <= port <= 65535:
        raise ConfigError("--port", f"must be a port number, 1 to 65535 (0: a free one); got {port}")
    if port:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError as e:
                raise ConfigError(
                    "--port", f"127.0.0.1:{port} cannot be served ({e.strerror}); choose another"
                ) from None


def run(args) -> int:
    from pixelrun.cli.demo_draw import Drawer, open_study

    _check_port(args.port)
    study = open_study(Path(args.folder))
    import gradio  # noqa: F401  (missing: one line naming the demo extra, from pixelrun.cli.main)

    from pixelrun.cli import demo_page

    for line in study.notes:
        print(f"pixelrun: {line}", file=sys.stderr)
    drawer = Drawer(study, args.device)
    for i in range(len(study.entries)):  # every model loaded before the page opens: a bad one says so now
        drawer.model(i, "ema")
    server = demo_page.serve(drawer, args.port)
    print(f"pixelrun demo: {server.url} ({len(study.entries)} model(s) from {study.folder}; Ctrl-C stops it)")
    sys.stdout.flush()
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
