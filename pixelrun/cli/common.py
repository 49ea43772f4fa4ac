"""What several commands share: the checkpoint arguments of `pixelrun sample` and `pixelrun eval`,
the config overrides they apply on top of the checkpoint's own config, the flags that used to set
config keys (refused, naming the override to write instead), `--size` and the package version.

The rule of the command line: a config key is set only as a dotted `KEY=VALUE` override; a flag is
only for what is not a config key (a path, the prompts, the device, the weights to load)."""

from __future__ import annotations

import argparse
import dataclasses
import shlex

from pixelrun.config import Config, ConfigError


def parse_size(text: str) -> tuple[int, int]:
    """--size WxH (width first, as most image tools write it) -> (height, width)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(
            "--size", f"must be WxH in pixels (for example 96x64: 96 wide, 64 high), got {text!r}"
        ) from None
    if w < 1 or h < 1:
        raise ConfigError("--size", f"both sides must be at least 1 pixel (WxH, e.g. 96x64), got {text!r}")
    return h, w


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pixelrun")
    except PackageNotFoundError:
        return "unknown (not installed)"


# ----------------------------------------------------------------------------- a checkpoint and its config


def add_checkpoint_args(p: argparse.ArgumentParser, *, weights: bool = True) -> None:
    """--checkpoint, --weights (unless the command reads a config key for it) and --device."""
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a run directory (its newest checkpoint that passes its checksums, a damaged newer one "
        "skipped with a line), a checkpoints/step_* directory or a `pixelrun export` (safetensors) directory",
    )
    if weights:
        p.add_argument(
            "--weights",
            choices=["ema", "raw"],
            default="ema",
            help="ema: the averaged weights (default; what grids and evaluations use); raw: the trained ones",
        )
    p.add_argument(
        "--ema-decay",
        type=float,
        metavar="D",
        help="which EMA, by its decay, of a run that keeps several (ema.decays; default: the first)",
    )
    # A flag, not hardware.device: that key is where the run trained, saved with the checkpoint; inference
    # runs wherever this command runs (a GPU run's checkpoint sampled on a laptop).
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")


def add_overrides(p: argparse.ArgumentParser, sections: tuple[str, ...], example: str) -> None:
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help=f"overrides of the checkpoint's config, {' and '.join(s + '.*' for s in sections)} keys, "
        f"anywhere on the line (e.g. {example}); every other setting is the checkpoint's",
    )


def override_keys(overrides: list[str]) -> set[str]:
    return {item.split("=", 1)[0].strip() for item in overrides}


def checkpoint_config(args, command: str, sections: tuple[str, ...]) -> tuple[Config, list[str]]:
    """(the checkpoint's config with `args.overrides` applied, those overrides), checked as `pixelrun
    train` checks its own (an unknown key, a wrong type or an invalid value is one line naming the
    key) before any weights are loaded. Only keys of `sections` may change: the rest describes the
    model the checkpoint holds. `args.checkpoint` becomes the checkpoint opened and verified (a
    `ReadChoice`: a damaged newest one of a run skipped with one line, a damaged one asked for by
    name refused in one), which the command then loads: verified once."""
    from pixelrun.infra import inference

    overrides = list(args.overrides)
    top = {f.name for f in dataclasses.fields(Config)}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                item,
                f"is not a KEY=VALUE override (pixelrun {command} takes "
                f"{' and '.join(s + '.*' for s in sections)} keys, e.g. {sections[0]}.KEY=VALUE; "
                f"quote an argument that holds spaces)",
            )
        key = item.split("=", 1)[0].strip()
        if key.split(".")[0] in top and key.split(".")[0] not in sections:  # unknown names: the config says so
            raise ConfigError(
                key,
                f"pixelrun {command} changes only {' and '.join(s + '.*' for s in sections)} "
                f"keys; the checkpoint fixes the rest (the config its model was trained with)",
            )
    args.checkpoint = inference.open_checkpoint(args.checkpoint)
    try:
        cfg = inference.checkpoint_config(args.checkpoint, overrides)[0]
    except ConfigError as e:
        self_guidance = e.key == "sample.guidance_mode" and "self-guidance" in str(e)  # not pathdrop's
        if self_guidance and not inference.checkpoint_config(args.checkpoint)[0].routing.ratio:
            raise ConfigError(
                "sample.guidance_mode",
                "self-guidance contrasts a dense and a TREAD-routed pass, and "
                "this checkpoint was trained without routing (routing.ratio=0): "
                "use sample.guidance_mode=cfg",
            ) from None
        raise
    return cfg, overrides


# ----------------------------------------------------------------------------- flags that became overrides


class _MovedFlag(argparse.Action):
    """A flag that used to set a config key: recorded here, and refused before any work by
    :func:`refuse_moved_flags` with the override to write instead."""

    def __init__(self, option_strings, dest, key: str, **kwargs):
        self.key = key
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.moved_flags = [*(getattr(namespace, "moved_flags", None) or []), (option_string, self.key, values)]


def add_moved_flags(p: argparse.ArgumentParser, moved: dict[str, str]) -> None:
    """Accept each of `moved` (flag -> config key), hidden from --help, so that it fails with the
    override to write rather than with argparse's "unrecognized arguments"."""
    for flag, key in moved.items():
        p.add_argument(flag, dest="moved_flags", action=_MovedFlag, key=key, default=[])


def moved_help(moved: dict[str, str]) -> str:
    """The epilog's lines on `moved`: each config key with the flags that used to set it."""
    import textwrap

    by_key: dict[str, list[str]] = {}
    for flag, key in moved.items():
        by_key.setdefault(key, []).append(flag)
    pairs = ", ".join(f"{'/'.join(flags)} V -> {key}=V".replace(" ", "\xa0") for key, flags in by_key.items())
    text = textwrap.fill(
        f"former flags, now overrides: {pairs}", width=100, subsequent_indent="  ", break_on_hyphens=False
    )
    return text.replace("\xa0", " ")  # one flag and its key on one line


def override_form(key: str, value: str) -> str:
    """How `FLAG VALUE` of a flag that set `key` is written as an override, quoted for the shell."""
    parts = [v.strip() for v in value.split(",") if v.strip()]
    if key == "eval.metrics":
        words = [f"eval.metrics=[{','.join(parts)}]"]
    elif key == "sample.guidance" and len(parts) > 1:  # `pixelrun eval --guidance 1,2,4`: a sweep
        words = [f"sample.guidance={parts[0]}", f"eval.guidance=[{','.join(parts[1:])}]"]
    else:
        words = [f"{key}={value}"]
    return " ".join(shlex.quote(w) for w in words)


def refuse_moved_flags(args, command: str) -> None:
    moved = getattr(args, "moved_flags", None)
    if moved:
        flags = " ".join(f"{flag} {shlex.quote(value)}" for flag, _, value in moved)
        forms = " ".join(override_form(key, value) for _, key, value in moved)
        raise ConfigError(
            moved[0][0],
            f"sets a config key, and pixelrun {command} takes config keys as KEY=VALUE "
            f"overrides: write {forms} instead of {flags}",
        )
