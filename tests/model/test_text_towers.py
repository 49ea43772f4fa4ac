"""The Qwen3-VL text tower and T5Gemma's encoder, loaded by pixelrun's real loading code from a saved
randomly initialised model of the released classes, give bit for bit the embeddings and masks of
diffusers' PRXPixelPipeline.encode_prompt / PRXPipeline.encode_prompt for the same prompts, and the
diffusers export writes them so the pipeline loads them back with the same numbers."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers

from pixelrun.config import load_config
from pixelrun.model.denoiser import model_from_config
from pixelrun.model.text import TextEncoder, encoder_fingerprint, prompt_cleaner

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("ftfy", reason="the PRX pipelines clean prompts with ftfy")
# imported here, once, so that no test's time holds diffusers' import
from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline, PRXPixelPipeline, PRXTransformer2DModel  # noqa: E402

from pixelrun.tools.export_diffusers import export_diffusers  # noqa: E402

MAX_TOKENS = 24
# Prompts the pipelines' cleaning changes (outer spaces, an HTML entity, mojibake), an empty one, and
# one longer than MAX_TOKENS (cut by the tokenizer).
PROMPTS = ["  a red cat on a mat ", "fish &amp; chips", "cafÃ© au lait", "", "two dogs " * 12, "a blue car"]
WIDTH = 32


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time


def _qwen_tokenizer():
    """Qwen3-VL's tokenizer class (byte-level BPE) with a vocabulary of the 256 byte symbols alone."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    return transformers.Qwen2Tokenizer(vocab=vocab | {"<|endoftext|>": len(vocab)}, merges=[])


def _gemma_tokenizer():
    """T5Gemma's tokenizer class (Gemma's BPE with byte fallback) with a tiny vocabulary."""
    vocab = {s: i for i, s in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    vocab |= {f"<0x{b:02X}>": len(vocab) + b for b in range(256)}
    for c in "▁abcdefghijklmnopqrstuvwxyz&;.,":
        vocab.setdefault(c, len(vocab))
    return transformers.GemmaTokenizer(vocab=vocab, merges=[])


def _tiny_qwen3_vl(tok):
    """The released layout (Qwen3VLForConditionalGeneration: text tower, vision tower, lm_head) and
    the module the pipeline's text_encoder is (its text tower, as Photoroom/PRX's TextTower keeps)."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    text = dict(
        vocab_size=len(tok),
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        rope_parameters=rope,
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=WIDTH)
    full = transformers.Qwen3VLForConditionalGeneration(
        transformers.Qwen3VLConfig(text_config=text, vision_config=vision | {"deepstack_visual_indexes": [0]})
    )
    return full, full.model.language_model, transformers.Qwen3VLTextModel


def _tiny_t5gemma(tok):
    """T5Gemma encoder-decoder and its encoder, the T5GemmaEncoder PRXPipeline's text_encoder is."""
    mod = dict(
        vocab_size=len(tok),
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    cfg = transformers.T5GemmaConfig(
        encoder=transformers.T5GemmaModuleConfig(**mod),
        decoder=transformers.T5GemmaModuleConfig(**mod),
        vocab_size=len(tok),
    )
    full = transformers.T5GemmaForConditionalGeneration(cfg)
    return full, full.get_encoder(), transformers.T5GemmaEncoderModel


TOWERS = {"qwen3-vl": (_tiny_qwen3_vl, _qwen_tokenizer), "t5gemma": (_tiny_t5gemma, _gemma_tokenizer)}


@pytest.fixture(scope="module", params=list(TOWERS))
def tower(request, tmp_path_factory):
    """(name, saved folder, tokenizer, the reference encoder module, the class pixelrun must load)."""
    build, make_tok = TOWERS[request.param]
    tok = make_tok()
    torch.manual_seed(0)
    full, encoder, cls = build(tok)
    path = tmp_path_factory.mktemp(request.param)
    full.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return request.param, str(path), tok, encoder.eval(), cls


def _tiny_transformer():
    return PRXTransformer2DModel(
        in_channels=3, patch_size=2, context_in_dim=WIDTH, hidden_size=32, num_heads=2, depth=1, axes_dim=[8, 8]
    )


def _pipeline_embeddings(name, encoder, tok):
    """The pipeline's encode_prompt for PROMPTS (classic CFG on: the empty negative prompt too)."""
    parts = dict(transformer=_tiny_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(), tokenizer=tok)
    if name == "qwen3-vl":
        pipe = PRXPixelPipeline(text_encoder=encoder, prompt_max_tokens=MAX_TOKENS, **parts)
        return pipe.encode_prompt(PROMPTS, device=torch.device("cpu"))
    pipe = PRXPipeline(text_encoder=encoder, **parts)
    # PRXPipeline's light cleaning, and our token budget instead of the tokenizer's model_max_length
    return pipe.encode_prompt(
        PROMPTS, device=torch.device("cpu"), skip_text_cleaning=True, tokenizer_max_length=MAX_TOKENS
    )


def test_tower_gives_the_pipelines_embeddings_bit_for_bit(tower):
    name, path, tok, encoder, cls = tower
    te = TextEncoder(path, max_tokens=MAX_TOKENS)
    assert type(te.model) is cls and te.dim == WIDTH
    # Only the text tower is instantiated: the parameters of the reference module, value for value.
    ours, ref = te.model.state_dict(), encoder.state_dict()
    assert len(ours) == len(ref) and all(torch.equal(a, b) for a, b in zip(ours.values(), ref.values()))
    assert encoder_fingerprint(path).endswith(f":d{WIDTH}")

    emb, mask = te.encode(PROMPTS)
    pipe_emb, pipe_mask, neg_emb, neg_mask = _pipeline_embeddings(name, encoder, tok)
    assert emb.shape == (len(PROMPTS), MAX_TOKENS, WIDTH) and pipe_mask.dtype == torch.bool
    assert torch.equal(mask, pipe_mask) and torch.equal(emb, pipe_emb)
    empty_emb, empty_mask = te.encode([""])
    assert torch.equal(empty_emb.expand_as(neg_emb), neg_emb) and torch.equal(empty_mask.expand_as(neg_mask), neg_mask)
    assert mask[4].all() and mask[0].sum() < MAX_TOKENS  # the long prompt is cut, the first one padded


def test_bf16_tower_gives_the_bf16_pipelines_embeddings(tower):
    """In bf16 (as PRX trains the towers), ours are the pipeline's bf16 values, upcast exactly."""
    name, path, tok, _, _ = tower
    te = TextEncoder(path, max_tokens=MAX_TOKENS, dtype=torch.bfloat16)
    assert next(te.model.parameters()).dtype == torch.bfloat16
    # The reference loaded as Photoroom/PRX's TextTower (prx/models/text_tower.py) loads it: the whole
    # model's class in bf16, then its tower. Not `.to(bfloat16)` of the fp32 one: that would also round
    # the rotary frequencies, which from_pretrained keeps in fp32 (as a pipeline's from_pretrained does).
    if name == "qwen3-vl":
        ref = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
            path, dtype=torch.bfloat16
        ).model.language_model
    else:
        ref = transformers.T5GemmaModel.from_pretrained(path, dtype=torch.bfloat16).encoder
    pipe_emb, pipe_mask, _, _ = _pipeline_embeddings(name, ref.eval(), tok)
    emb, mask = te.encode(PROMPTS)
    assert pipe_emb.dtype == torch.bfloat16 and emb.dtype == torch.float32
    assert torch.equal(mask, pipe_mask) and torch.equal(emb, pipe_emb.float())


def test_prompts_are_cleaned_as_the_pipelines_clean_them(tower):
    """Without the cleaning the entity, the mojibake and the outer spaces would tokenize otherwise."""
    _, path, tok, _, _ = tower
    te = TextEncoder(path, max_tokens=MAX_TOKENS)
    raw, clean = PROMPTS[:3], ["a red cat on a mat", "fish & chips", "café au lait"]
    assert all(tok(r)["input_ids"] != tok(c)["input_ids"] for r, c in zip(raw, clean))
    emb_raw, mask_raw = te.encode(raw)
    emb_clean, mask_clean = te.encode(clean)
    assert torch.equal(emb_raw, emb_clean) and torch.equal(mask_raw, mask_clean)


def test_export_writes_the_tower_the_pipeline_loads(tower, tmp_path):
    name, path, _, _, cls = tower
    te = TextEncoder(path, max_tokens=MAX_TOKENS)
    overrides = {"text.encoder": path, "text.max_tokens": MAX_TOKENS, "run.dir": str(tmp_path / "run")}
    overrides |= {"model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "model.patch_size": 8}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    out = export_diffusers(model_from_config(cfg, te.dim).eval(), te, cfg, tmp_path / "pipe")
    pipe = PRXPixelPipeline.from_pretrained(str(out))
    assert type(pipe.text_encoder) is cls and pipe.config.prompt_max_tokens == MAX_TOKENS
    emb, mask, _, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"))
    ours_emb, ours_mask = te.encode(PROMPTS)
    assert torch.equal(mask, ours_mask) and torch.equal(emb, ours_emb)

    # The pipeline's tower and tokenizer in one folder (as a released pipeline's text_encoder/ and
    # tokenizer/ hold them) load as text.encoder and give the same numbers again.
    both = tmp_path / "tower"
    shutil.copytree(out / "text_encoder", both)
    shutil.copytree(out / "tokenizer", both, dirs_exist_ok=True)
    again = TextEncoder(str(both), max_tokens=MAX_TOKENS)
    assert type(again.model) is cls
    assert all(torch.equal(a, b) for a, b in zip(again.encode(PROMPTS), (ours_emb, ours_mask)))


def test_a_hub_id_not_cached_offline_is_one_line():
    with pytest.raises(FileNotFoundError) as e:
        TextEncoder("nobody-here/no-such-tower")
    assert "\n" not in str(e.value) and "'nobody-here/no-such-tower'" in str(e.value)
    assert "HF_HUB_OFFLINE" in str(e.value)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a Hugging Face id"):
        TextEncoder("no such tower!")


def test_cleaning_without_ftfy_names_the_package(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ftfy", None)
    with pytest.raises(ModuleNotFoundError) as e:
        prompt_cleaner("qwen3_vl_text")
    assert e.value.name == "ftfy"
    assert prompt_cleaner("bert") is None  # encoders other than the PRX towers keep their prompts as given
