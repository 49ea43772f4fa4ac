"""pixelrun presets: the model size presets and their parameter counts."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    pr = subparsers.add_parser("presets", help="the model size presets and their parameter counts")
    pr.add_argument(
        "--text-dim",
        type=int,
        help="count with this text encoder width only (default: both MiniLM's 384 and T5Gemma-2B's 2304)",
    )
    pr.set_defaults(func=run)


def run(args) -> int:
    """Parameter counts of the size presets (built on the meta device: no memory, no time), with the
    offline MiniLM's text width (what `pixelrun train` prints for the default run) and with a
    T5Gemma-2B's (the recipe's), or with `--text-dim` alone."""
    import torch

    from pixelrun.config import PRESETS
    from pixelrun.model.denoiser import build_model, count_parameters

    widths = [args.text_dim] if args.text_dim else [384, 2304]
    names = {384: "MiniLM", 2304: "T5Gemma-2B"}
    heads = [f"params, text {names.get(d, d)}" + (f" ({d})" if d in names else "") for d in widths]
    print(
        f"{'preset':<12}{'patch':>6}{'width':>7}{'depth':>6}{'heads':>6}{'bottleneck':>11}"
        + "".join(f"{h:>33}" for h in heads)
    )
    for name, f in PRESETS.items():
        counts = []
        for d in widths:
            with torch.device("meta"):
                counts.append(count_parameters(build_model(name, d)))
        print(
            f"{name:<12}{f['patch_size']:>6}{f['hidden_size']:>7}{f['depth']:>6}{f['num_heads']:>6}"
            f"{str(f['bottleneck_size']):>11}" + "".join(f"{n:>33,}" for n in counts)
        )
    print("(the text encoder's width only changes the text projection)")
    return 0
