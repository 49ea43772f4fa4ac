"""pixelrun export: a checkpoint's weights as one safetensors file with its config, or as a
diffusers PRXPixelPipeline directory; `--push-to-hub REPO_ID` then uploads the folder to the Hugging
Face Hub (`--dry-run`: lists what it would upload, and uploads nothing)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pixelrun.config import ConfigError, RunFailed


def add_parser(subparsers) -> None:
    x = subparsers.add_parser(
        "export",
        help="write a checkpoint's weights as one safetensors file with its config, "
        "or as a diffusers PRXPixelPipeline directory",
    )
    x.add_argument(
        "--checkpoint",
        required=True,
        help="run directory (its newest checkpoint that passes its checksums, a damaged newer one skipped "
        "with a line) or checkpoint directory (--format diffusers also takes an exported model)",
    )
    x.add_argument("--out", required=True, help="output directory")
    x.add_argument("--weights", choices=["ema", "raw"], default="ema")
    x.add_argument(
        "--ema-decay",
        type=float,
        metavar="D",
        help="which EMA, by its decay, of a run that keeps several (ema.decays; default: the first)",
    )
    x.add_argument(
        "--format",
        choices=["safetensors", "diffusers", "lora"],
        default="safetensors",
        help="safetensors: pixelrun's own layout (model.safetensors, config.yaml); diffusers: a "
        "PRXPixelPipeline directory (transformer, text encoder, tokenizer, scheduler); a LoRA run's "
        "adapters are merged into both. lora: a LoRA run's adapters alone, as diffusers' LoRA files "
        "hold them (pytorch_lora_weights.safetensors)",
    )
    x.add_argument(
        "overrides",
        nargs="*",
        help="--format diffusers only: sampling overrides, e.g. sample.spacing=diffusers sample.shift=3",
    )
    x.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="then upload the exported folder to this Hugging Face model repository (created if missing; "
        "needs a token: `hf auth login` or HF_TOKEN; HF_ENDPOINT is honoured)",
    )
    x.add_argument("--private", action="store_true", help="--push-to-hub: create the repository private")
    x.add_argument(
        "--dry-run", action="store_true", help="--push-to-hub: export, list the files it would upload, upload nothing"
    )
    x.set_defaults(func=run)


def run(args) -> int:
    """The export, then, with --push-to-hub, its upload (checked before any work: the repository id,
    a token, the Hub reachable)."""
    if args.push_to_hub is None and (args.private or args.dry_run):
        raise ConfigError("--push-to-hub", "--private and --dry-run go with --push-to-hub REPO_ID")
    if args.push_to_hub is not None:
        check_push(args.push_to_hub, dry_run=args.dry_run)
    code = export(args)
    if args.push_to_hub is not None:
        push(Path(args.out), args.push_to_hub, private=args.private, dry_run=args.dry_run)
    return code


def check_push(repo_id: str, dry_run: bool) -> None:
    """A valid repository id always; unless a dry run, a token and a Hub that answers (one request,
    no retries): each missing one a single line naming --push-to-hub, before the export."""
    try:
        from huggingface_hub import constants, get_token
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        raise ConfigError("--push-to-hub", "needs huggingface_hub: pip install 'pixelrun[hub]'") from None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError("--push-to-hub", f"{repo_id!r} is not a repository id (OWNER/NAME)") from None
    if dry_run:
        return
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise ConfigError("--push-to-hub", "HF_HUB_OFFLINE is set: nothing can be uploaded (--dry-run lists the files)")
    if not get_token():
        raise ConfigError("--push-to-hub", "no Hugging Face token: run `hf auth login` or set HF_TOKEN")
    from pixelrun.infra import hub

    if not hub.reachable(_endpoint()):
        raise ConfigError("--push-to-hub", f"{_endpoint()} does not answer: no network? (--dry-run lists the files)")


def _endpoint() -> str:
    """The Hub's address: HF_ENDPOINT as it is now (huggingface_hub reads it once, at its import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def upload_list(folder: Path) -> list[tuple[str, int]]:
    """(path in the repository, bytes) of every file upload_folder sends: the folder's files, in name
    order, without the .git and .cache folders it ignores."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if ".git" not in rel.split("/") and not rel.startswith(".cache/huggingface/"):
            out.append((rel, path.stat().st_size))
    return out


def push(folder: Path, repo_id: str, *, private: bool, dry_run: bool) -> None:
    """Upload ``folder`` to the model repository ``repo_id`` (create_repo with exist_ok, then
    HfApi.upload_folder as one commit), or with ``dry_run`` print what would be uploaded."""
    files = upload_list(folder)
    total = sum(n for _, n in files)
    if dry_run:
        for rel, n in files:
            print(f"  {rel} ({n:,} bytes)")
        print(f"dry run: would upload {len(files)} files ({total:,} bytes) to {repo_id}; nothing was uploaded")
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=_endpoint())
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"pixelrun export ({folder.name})",
        )
    except (HfHubHTTPError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFailed(f"--push-to-hub {repo_id}: the upload failed ({reason}); the export is in {folder}") from None
    print(f"uploaded {len(files)} files ({total:,} bytes) to {url} ({commit.commit_url})")


def export(args) -> int:
    """--format safetensors: one consolidated safetensors file (EMA weights by default) and the config,
    from a checkpoint written on any number of ranks; `pixelrun sample --checkpoint OUT` accepts it.
    --format diffusers: a directory that diffusers' `PRXPixelPipeline.from_pretrained` loads
    (pixelrun/tools/export_diffusers.py); overrides may change the sampling settings it carries."""
    from pixelrun.config import to_yaml
    from pixelrun.infra import checkpoint as ckpt
    from pixelrun.infra.inference import checkpoint_config, load_for_inference, load_model, open_checkpoint

    if args.overrides and args.format != "diffusers":
        raise ConfigError("overrides", "only --format diffusers takes overrides (sampling settings)")
    # verified once, before any work: a damaged newest checkpoint of a run is skipped with a line, a
    # damaged checkpoint asked for by name refused in one
    choice = open_checkpoint(args.checkpoint)
    cfg, path, _ = checkpoint_config(choice, args.overrides)  # no weights loaded yet
    _check_target(args.out, path)
    if args.format == "diffusers":
        from pixelrun.tools.export_diffusers import check_config, export_diffusers

        check_config(cfg)  # refuse before loading anything
        # the tower's own fp32 weights go into the pipeline, whatever dtype the run encoded in
        fp32_tower = [*args.overrides, "text.precision=fp32"]
        model, encoder, cfg, path = load_for_inference(choice, args.weights, "cpu", fp32_tower, args.ema_decay)
        _check_target(args.out, path)  # an earlier checkpoint when the newest one's weights failed
        out = export_diffusers(model, encoder, cfg, args.out, ckpt.export_marker(args.format, path, args.weights))
        import importlib.util

        if importlib.util.find_spec("ftfy") is None:
            print("note: PRXPixelPipeline needs the package ftfy to encode prompts (pip install ftfy)", file=sys.stderr)
        print(
            f"exported {args.weights} weights of {path} as a diffusers PRXPixelPipeline to {out} "
            f"(sample with use_resolution_binning=False, height=width={cfg.data.resolution}, "
            f"num_inference_steps={cfg.sample.steps}, guidance_scale={cfg.sample.guidance}, "
            f"generator=torch.Generator().manual_seed(seed))"
        )
        return 0
    if not ckpt.is_complete(path):
        raise ConfigError("--checkpoint", f"{path} is already an exported model")
    if args.format == "lora":
        return _export_lora(args, choice, cfg, path)
    model, cfg, path = load_model(choice, args.weights, decay=args.ema_decay)
    _check_target(args.out, path)
    out = ckpt.export_weights(path, args.out, model, to_yaml(cfg), model.cfg.text_dim, args.weights)
    which = f"EMA {args.ema_decay:g}" if args.ema_decay is not None else args.weights
    print(f"exported {which} weights of {path} (step {ckpt.load_meta(path).step}) to {out}")
    return 0


def _export_lora(args, choice, cfg, path) -> int:
    """--format lora: the adapters of a LoRA run's checkpoint, unmerged (pixelrun/tools/export_diffusers.py)."""
    from pixelrun.infra import checkpoint as ckpt
    from pixelrun.infra.inference import load_model
    from pixelrun.model.lora import LORA_FILE, lora_on
    from pixelrun.tools.export_diffusers import export_lora

    if not lora_on(cfg):
        raise ConfigError(
            "--format", f"lora writes a LoRA run's adapters; {path} trained every weight (train.lora.rank null)"
        )
    model, cfg, path = load_model(choice, args.weights, decay=args.ema_decay, merge=False)
    _check_target(args.out, path)
    out = export_lora(model, cfg, args.out, ckpt.export_marker(args.format, path, args.weights))
    print(
        f"exported the {args.weights} adapters of {path} (rank {cfg.train.lora.rank}) to {out / LORA_FILE}; "
        f"their base weights: {cfg.run.init_from}"
    )
    return 0


def _check_target(out: str, source) -> None:
    from pixelrun.infra import checkpoint as ckpt

    try:
        ckpt.check_export_target(out, source)
    except ckpt.UnsafeOutput as e:
        raise ConfigError("--out", str(e)) from None
