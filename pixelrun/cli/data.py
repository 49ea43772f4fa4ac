"""pixelrun data convert | inspect: write WebDataset shards for data.source=shards (every image
resized once to its aspect bucket), or report what shards hold. The flags describe the conversion
itself (source, output, shard layout); none is a key of the training config."""

from __future__ import annotations

import argparse
import json

from pixelrun.config import ConfigError, TextConfig


def add_parser(subparsers) -> None:
    d = subparsers.add_parser("data", help="write WebDataset shards for data.source=shards, or inspect shards")
    d.set_defaults(func=run)
    dsub = d.add_subparsers(dest="data_command", required=True)
    _add_convert(dsub)
    _add_inspect(dsub)


def _add_convert(dsub) -> None:
    """`pixelrun data convert`: the source and the shard layout; then `_add_convert_options`."""
    dc = dsub.add_parser(
        "convert",
        help="resize images once to their aspect buckets and write .tar shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write WebDataset shards for data.source=shards, every image resized once to its aspect bucket.",
        epilog="""examples:
  pixelrun data convert --src photos/ --out shards512 --resolution 512
  pixelrun data convert --src FLUX-Reason-6M/ --out shards512 --resolution 512 \\
      --captions caption_detail:0.7,caption_original:0.3 --workers 8
  pixelrun data convert --src 'data/train-*.parquet::more/x.parquet' --out d --resolution 48 --patch 8 --limit 1000

Rows or files whose image is missing, unreadable, truncated or enormous, and rows without any caption, are
skipped; the final line counts them by reason and names the first (file and row), index.json keeps the
first 100 of each. The last line is the training command for the shards, quoted for bash.""",
    )
    dc.add_argument(
        "--src",
        required=True,
        help="an image folder (captions as for data.source=folder); a JSONL manifest (image path under "
        "file/image/file_name, relative to the manifest; every other string field is a caption "
        "field); Parquet: a file, a folder (every .parquet under it) or a glob; a datasets "
        "save_to_disk folder or .arrow file; or a Hugging Face dataset id (needs the datasets "
        "package, pip install 'pixelrun[hub]'; it downloads into datasets' cache first). "
        "Several Parquet / Arrow sources join with '::'",
    )
    dc.add_argument("--out", required=True, help="output folder (shards 00000.tar, ... and index.json)")
    dc.add_argument(
        "--resolution",
        type=int,
        required=True,
        help="bucket resolution, e.g. 512 or 1024; train with the same data.resolution",
    )
    dc.add_argument(
        "--patch",
        type=int,
        default=32,
        help="patch size of the model that will train on the shards; buckets are multiples of it "
        "(default 32: the base and small presets; the default tiny model has patch 8, so "
        "--resolution 48 needs --patch 8)",
    )
    dc.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    dc.add_argument(
        "--format",
        choices=["jpg", "png"],
        default="jpg",
        help="jpg (quality 95, 4:4:4; default: small, fast to decode) or png (lossless)",
    )
    _add_convert_options(dc)


def _add_convert_options(dc: argparse.ArgumentParser) -> None:
    """`pixelrun data convert`'s table columns, limits, stored embeddings and workers."""
    dc.add_argument(
        "--image-column",
        help="tables: the image column (default: the first column datasets declared "
        "as an Image, else the first binary or {bytes, path} column)",
    )
    dc.add_argument(
        "--captions",
        help="tables: caption columns with weights, as data.captions: "
        "prompt:0.7,caption_long:0.3 (default: the first of caption, prompt, text). "
        "Every chosen column is stored in the sample's .json (train picks among them "
        "with data.captions=json.NAME:W,...); txt is the first the row has",
    )
    dc.add_argument(
        "--split", default="train", help="the split of a Hub dataset or a saved DatasetDict (default train)"
    )
    dc.add_argument("--limit", type=int, help="convert only the first N images / rows")
    dc.add_argument(
        "--text-encoder",
        help="also store each caption's embedding for this encoder (minilm, a local path or a Hugging Face id)",
    )
    dc.add_argument(
        "--max-tokens",
        type=int,
        default=TextConfig.max_tokens,
        help=f"token limit of the stored embeddings; must equal text.max_tokens when training "
        f"(default {TextConfig.max_tokens})",
    )
    dc.add_argument(
        "--embedding-dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="dtype of the stored embeddings (default bfloat16, as the reference stores T5Gemma "
        "latents: float16 overflows on T5-family activations; a non-finite value is an error)",
    )
    dc.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes that decode, resize and encode images (default 0: in this process; the "
        "shards are byte for byte the same)",
    )


def _add_inspect(dsub) -> None:
    di = dsub.add_parser("inspect", help="counts per bucket, caption lengths, broken samples, stored embeddings")
    di.add_argument("spec", help="shards: a folder of .tar files, a brace pattern, URLs or pipe: commands")
    di.add_argument("--contact-sheet", help="also write a PNG of the first --n samples with their captions")
    di.add_argument("--n", type=int, default=64, help="samples on the contact sheet (default 64)")
    di.add_argument(
        "--resolution",
        type=int,
        help="count samples per aspect bucket of this resolution "
        "(default: per stored size, the buckets of converted shards)",
    )
    di.add_argument("--patch", type=int, default=32, help="patch size of those buckets (default 32)")
    di.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    return {"convert": run_convert, "inspect": run_inspect}[args.data_command](args)


def run_convert(args) -> int:
    """Images (a folder, a JSONL manifest, Parquet / Arrow tables, a Hugging Face dataset) ->
    WebDataset shards resized to their buckets once."""
    import shlex

    from pixelrun.data.convert import convert, format_bytes, skip_text

    if args.shard_size < 1:
        raise ConfigError("--shard-size", f"must be >= 1; got {args.shard_size}")
    if args.workers < 0:
        raise ConfigError("--workers", f"must be >= 0; got {args.workers}")
    if args.patch < 1:
        raise ConfigError("--patch", f"must be >= 1; got {args.patch}")
    if args.resolution < 1:
        raise ConfigError("--resolution", f"must be positive; got {args.resolution}")
    if args.resolution % args.patch:
        hint = (
            "; the default tiny model has patch 8: pass --patch 8 (32 is the patch of the base and small presets)"
            if args.patch == 32 and args.resolution % 8 == 0
            else ""
        )
        raise ConfigError("--resolution", f"{args.resolution} is not a multiple of --patch {args.patch}{hint}")
    try:
        index = convert(
            args.src,
            args.out,
            args.resolution,
            patch=args.patch,
            shard_size=args.shard_size,
            image_format=args.format,
            text_encoder=args.text_encoder,
            max_tokens=args.max_tokens,
            workers=args.workers,
            captions=args.captions,
            image_column=args.image_column,
            limit=args.limit,
            split=args.split,
            embedding_dtype=args.embedding_dtype,
        )
    except FileExistsError as e:
        raise ConfigError("--out", str(e)) from None
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError("--src", str(e)) from None
    emb, size = index["text_embeddings"], index["bytes_per_sample"]
    print(
        f"wrote {index['count']} samples in {len(index['shards'])} shard(s), {len(index['buckets'])} bucket(s), to "
        f"{args.out}; {skip_text(index['skipped'], index['skipped_names'], index['read'])}; "
        f"{format_bytes(size['on_disk'])} per sample on disk"
        + (
            f" (text embeddings {format_bytes(size['text_embeddings'])}, {emb['dtype']}, {emb['fingerprint']})"
            if emb
            else ""
        )
    )
    # Every argument quoted for bash: an unquoted brace pattern would expand into several arguments.
    train = ["pixelrun", "train", "data.source=shards", f"data.path={args.out}", f"data.resolution={args.resolution}"]
    if len(index["buckets"]) > 1:  # stored at their aspect buckets: train in them, or each is cropped square again
        train.append("data.buckets=true")
    if index.get("captions"):
        train.append(f"data.captions={index['captions']}")
    if emb:
        train += [f"text.encoder={args.text_encoder}", f"text.max_tokens={args.max_tokens}"]
    print("train with: " + " ".join(shlex.quote(a) for a in train))
    return 0


def run_inspect(args) -> int:
    from pixelrun.data.inspection import format_report, inspect_shards

    report = inspect_shards(args.spec, args.contact_sheet, args.n, args.resolution, args.patch)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
