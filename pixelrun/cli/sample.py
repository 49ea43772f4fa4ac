"""pixelrun sample: images for prompts from a checkpoint.

The sampling settings are the checkpoint's own sample.* keys, changed by overrides on the command
line (`sample.steps=50 sample.guidance=3`), checked as `pixelrun train` checks its overrides. The
flags are what is not a config key: the checkpoint, the prompts, the output folder, the image size
(data.resolution is one square side; --size may be any multiple of the patch), the weights to load
and the device. The guidance is one scale here, as the key sample.guidance: a sweep of scales is an
evaluation's (`pixelrun eval ... 'eval.guidance=[1,2,4]'`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pixelrun.cli import common
from pixelrun.config import ConfigError

SECTIONS = ("sample",)  # the config keys this command changes; the checkpoint fixes the rest
# The flags that used to set sample.* keys: refused, naming the override to write instead.
MOVED = {
    "--steps": "sample.steps",
    "--guidance": "sample.guidance",
    "--guidance-mode": "sample.guidance_mode",
    "--seed": "sample.seed",
}

EPILOG = f"""sampling settings are overrides of the checkpoint's config (KEY=VALUE, before or after the flags;
default: the checkpoint's own value):
  sample.steps=N                      sampler steps
  sample.sampler=euler|heun           heun: two model evaluations per step (the last step Euler's)
  sample.guidance_interval=[LO,HI]    guide only at noise levels LO < t <= HI (t = 1: noise)
  sample.guidance=W                   guidance scale, >= 1: 1 = no guidance, larger follows the prompt more
  sample.guidance_mode=cfg|self|none|pathdrop
                                      cfg: against the empty prompt; self: a dense against a TREAD-routed
                                      pass (models trained with routing); none: the conditional prediction;
                                      pathdrop: against the empty prompt's pass with SPRINT's deep path
                                      dropped (models trained with routing.kind=sprint)
  sample.seed=N                       noise seed (the same seed gives the same image, as in an exported
                                      diffusers pipeline)
  sample.shift=S  sample.spacing=diffusers|linear
                                      the sampling time grid
(every sample.* key: docs/configuration.md)

{common.moved_help(MOVED)}

examples:
  pixelrun sample --checkpoint runs/demo --prompt "a red circle" --out out/
  pixelrun sample --checkpoint runs/demo --prompts-file prompts.txt --out out/ sample.steps=50 sample.guidance=3
  pixelrun sample --checkpoint runs/demo --prompt "a blue square" --out out/ --size 96x64 sample.seed=7
  pixelrun sample --checkpoint runs/demo --prompt "a red circle" --out out/ --ema-decay 0.9999 \
      sample.sampler=heun 'sample.guidance_interval=[0,0.9]'"""


def add_parser(subparsers) -> None:
    s = subparsers.add_parser(
        "sample",
        help="generate images for prompts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Writes OUT/000.png, 001.png, ... (one per prompt, in order), OUT/grid.png with the\n"
        "prompts as labels when there are several, and OUT/prompts.json (checkpoint,\n"
        "seed, steps, guidance, size, prompt of each file).",
        epilog=EPILOG,
    )
    common.add_checkpoint_args(s)
    s.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    s.add_argument("--prompts-file", help="a text file with one prompt per line (added after any --prompt)")
    s.add_argument(
        "--out",
        required=True,
        help="output folder: new, empty, or an earlier `pixelrun sample` output (its files are replaced)",
    )
    s.add_argument(
        "--size",
        help="WxH in pixels, width first, e.g. 96x64 (default: the resolution the checkpoint was last trained at)",
    )
    common.add_overrides(s, SECTIONS, "sample.steps=50 sample.guidance=3")
    common.add_moved_flags(s, MOVED)
    s.set_defaults(func=run)


def _read_prompts(args) -> list[str]:
    from pixelrun.infra.prompts import read_prompts_file

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file, "--prompts-file")
    if not prompts:
        raise ConfigError("--prompt", "give at least one prompt (--prompt TEXT, repeatable, or --prompts-file FILE)")
    return prompts


def _sample_dir(out: Path) -> list[Path]:
    """`--out` holds this command's images only: a new or empty folder, or an earlier `pixelrun sample`
    output, whose files (listed in its prompts.json) are returned: the whole folder is replaced once
    the new images exist. Anything else in it, or the current folder, is refused, before any work."""
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} is a file")
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise ConfigError("--out", f"{out} is the current folder or one above it; write into a new folder")
    if not out.is_dir() or not any(out.iterdir()):
        return []
    try:
        earlier = json.loads((out / "prompts.json").read_text())
        made = {*earlier["prompts"], "grid.png", "prompts.json"}
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            "--out", f"{out} is not empty and holds no earlier `pixelrun sample` output; choose a new or empty folder"
        ) from None
    others = [p.name for p in out.iterdir() if p.name not in made]
    if others:
        raise ConfigError(
            "--out",
            f"{out} holds files this command did not write ({', '.join(sorted(others)[:3])}); "
            f"choose a new or empty folder",
        )
    return [out / name for name in made]


def _check_size_memory(size: tuple[int, int], prompts: int, device: str) -> None:
    """A --size whose batch (up to 32 prompts, twice for guidance) cannot fit in this machine's memory
    is refused before the checkpoint is read: "one batch needs X GiB, Y available"."""
    from pixelrun.data.sources import GiB, available_memory, batch_bytes

    where = available_memory(device)
    need = batch_bytes(2 * min(prompts, 32), *size)
    if where is not None and need > where[0]:
        raise ConfigError(
            "--size",
            f"{size[1]}x{size[0]} (WxH): one batch of {min(prompts, 32)} image(s) needs {need / GiB:.1f} GiB, "
            f"{where[0] / GiB:.1f} GiB {where[1]} available; choose a smaller size",
        )


GRID_MAX = 64  # images on a sample grid.png; beyond this it grows too tall to open (each image has its own file)


def run(args) -> int:
    """One `pixelrun sample` per `--out` at a time (the lock file beside it: the folder is swapped in
    whole); a second is refused in one line before any work."""
    from pixelrun.infra.locks import folder_lock

    with folder_lock(Path(args.out), "--out", "pixelrun sample", beside=True):
        return _run(args)


def _run(args) -> int:
    from pixelrun.diffusion.generate import evaluations_per_image, generate
    from pixelrun.infra.checkpoint import atomic_dir
    from pixelrun.infra.grids import save_grid, save_png
    from pixelrun.infra.inference import load_for_inference
    from pixelrun.infra.progress import progress

    common.refuse_moved_flags(args, "sample")
    prompts = _read_prompts(args)
    size = common.parse_size(args.size) if args.size is not None else None
    if size is not None:
        _check_size_memory(size, len(prompts), args.device)
    out = Path(args.out)
    _sample_dir(out)
    _, overrides = common.checkpoint_config(args, "sample", SECTIONS)  # every override checked before any work
    model, encoder, cfg, path = load_for_inference(
        args.checkpoint, args.weights, args.device, overrides, args.ema_decay
    )
    encoder.warn = lambda message: None  # said once below, for this command's prompts
    h, w = size or (cfg.data.resolution, cfg.data.resolution)
    p = model.cfg.patch_size
    if h % p or w % p:
        raise ConfigError("--size", f"{w}x{h} (WxH) is not a multiple of the patch size {p}")
    seed = cfg.sample.seed
    with progress(total=cfg.sample.steps, desc="sample", unit="step") as bar:
        images = generate(
            model, encoder, prompts, cfg, next(model.parameters()).device, seed=seed, height=h, width=w, progress=bar
        )
    if encoder.truncated:
        print(
            f"note: {encoder.truncated} prompt(s) are longer than text.max_tokens={cfg.text.max_tokens} tokens and "
            f"were cut: the model saw only their start (first: {(encoder.first_truncated or '')[:80]!r})",
            file=sys.stderr,
        )
    # Written beside `out` and swapped in whole: an interruption leaves the earlier output as it was.
    with atomic_dir(out) as tmp:
        names = [f"{i:03d}.png" for i in range(len(images))]
        for name, img in zip(names, images):
            save_png(img, tmp / name)
        (tmp / "prompts.json").write_text(
            json.dumps(
                {
                    "checkpoint": str(path),
                    "seed": seed,
                    "steps": cfg.sample.steps,
                    "guidance": cfg.sample.guidance,
                    "guidance_mode": cfg.sample.guidance_mode,
                    "sampler": cfg.sample.sampler,
                    "guidance_interval": list(cfg.sample.guidance_interval) or None,
                    "nfe": evaluations_per_image(cfg),
                    "ema_decay": args.ema_decay,
                    "size": f"{w}x{h}",
                    "prompts": dict(zip(names, prompts)),
                },
                indent=2,
            )
        )
        if len(images) > 1:
            save_grid(images[:GRID_MAX], prompts[:GRID_MAX], tmp / "grid.png")
            names.append("grid.png")
    for name in names:
        print(out / name)
    if len(images) > GRID_MAX:
        print(
            f"note: grid.png shows the first {GRID_MAX} of {len(images)} images; every image has its own file",
            file=sys.stderr,
        )
    return 0
