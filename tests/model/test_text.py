"""Text encoders load offline through the real from_pretrained path, and the caption cache
is exact and batch-independent (resumed runs re-encode captions in other batches)."""

import pytest
import torch
import transformers

from pixelrun.model.text import DEFAULT_TEXT_ENCODER, TextEncoder, encoder_fingerprint, resolve_encoder

CAPS = ["a red cat on a mat", "", "two dogs " * 20, "a blue car"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(resolve_encoder(DEFAULT_TEXT_ENCODER))


@pytest.fixture(scope="module")
def minilm():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return TextEncoder(max_tokens=32)


def _tiny_bert(tok):
    cfg = transformers.BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    m = transformers.BertModel(cfg)
    return m, m, transformers.BertModel


def _tiny_t5(tok):
    cfg = transformers.T5Config(
        vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0
    )
    m = transformers.T5ForConditionalGeneration(cfg)
    return m, m.get_encoder(), transformers.T5EncoderModel


def _tiny_t5gemma(tok):
    if not hasattr(transformers, "T5GemmaConfig"):
        pytest.skip("transformers has no T5Gemma")
    mod = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )
    cfg = transformers.T5GemmaConfig(
        encoder=transformers.T5GemmaModuleConfig(**mod),
        decoder=transformers.T5GemmaModuleConfig(**mod),
        vocab_size=len(tok),
    )
    assert cfg.model_type == "t5gemma" and cfg.is_encoder_decoder
    m = transformers.T5GemmaForConditionalGeneration(cfg)
    return m, m.get_encoder(), transformers.T5GemmaEncoderModel


@pytest.mark.parametrize("build", [_tiny_bert, _tiny_t5, _tiny_t5gemma], ids=["bert", "t5", "t5gemma"])
def test_tiny_encoder_matches_saved_model(build, tok, tmp_path):
    torch.manual_seed(0)
    full, encoder, expected_cls = build(tok)
    full.eval().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    te = TextEncoder(str(tmp_path), max_tokens=12)
    assert type(te.model) is expected_cls and te.dim == 32
    assert not te.model.training and not any(p.requires_grad for p in te.model.parameters())
    # Only the encoder is instantiated: same parameter count as the reference encoder.
    assert sum(p.numel() for p in te.model.parameters()) == sum(p.numel() for p in encoder.parameters())

    emb, mask = te.encode(CAPS)
    ref_tok = tok(CAPS, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        ref = encoder(input_ids=ref_tok["input_ids"], attention_mask=ref_tok["attention_mask"]).last_hidden_state
    assert emb.shape == (4, 12, 32) and emb.dtype == torch.float32
    assert mask.dtype == torch.bool and torch.equal(mask, ref_tok["attention_mask"].bool())
    torch.testing.assert_close(emb, ref, rtol=0, atol=1e-6)  # 16-row chunk vs 4-row batch


def test_cache_hits_do_no_forward(tok, tmp_path):
    torch.manual_seed(0)
    _tiny_bert(tok)[0].save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    te = TextEncoder(str(tmp_path), max_tokens=8, cache_size=25)
    calls = []
    te.model.register_forward_hook(lambda *a: calls.append(1))

    emb1, mask1 = te.encode(CAPS + CAPS[:2])  # in-call duplicates are encoded once
    assert (len(calls), te.misses, te.hits) == (1, 4, 2)
    emb2, mask2 = te.encode(CAPS)
    assert (len(calls), te.misses, te.hits) == (1, 4, 6)
    assert torch.equal(emb1[:4], emb2) and torch.equal(mask1[:4], mask2)
    assert torch.equal(emb1[4:], emb1[:2]) and mask2[1].sum() == 2  # "" is [CLS] [SEP]

    emb2.zero_()  # returned tensors must not alias the cache
    assert torch.equal(te.encode(CAPS)[0], emb1[:4])

    te.encode([f"caption {i}" for i in range(20)])  # 20 misses -> two fixed-size chunks
    assert len(calls) == 3 and len(te._cache) == 24
    te.encode(["one more", "and another"])
    assert len(te._cache) == 25 and CAPS[0] not in te._cache  # oldest evicted first


def test_minilm_default_offline(minilm):
    assert minilm.dim == 384 and minilm.name == DEFAULT_TEXT_ENCODER
    assert type(minilm.model).__name__ == "BertModel"
    assert encoder_fingerprint(DEFAULT_TEXT_ENCODER).endswith(":d384")


def test_minilm_batch_composition_bitwise(minilm):
    caps = [f"photo number {i} of a {w}" for i, w in enumerate(["cat", "dog", "car"] * 7)] + ["", "x " * 50]
    target = caps[5]
    minilm._cache.clear()
    alone = minilm.encode([target])[0][0]
    results = []
    for batch in ([caps[0], target, caps[2]], caps[:16], caps[6:23] + [target]):  # last: 2nd chunk
        minilm._cache.clear()
        emb = minilm.encode(batch)[0]
        results.append(emb[batch.index(target)])
    minilm._cache.clear()
    rev = list(reversed(caps[:16]))  # same chunk, different row position
    results.append(minilm.encode(rev)[0][rev.index(target)])
    assert all(torch.equal(alone, r) for r in results)


def test_missing_path_is_named(tmp_path):
    bad = str(tmp_path / "no_such_encoder")
    with pytest.raises(FileNotFoundError, match="no_such_encoder"):
        TextEncoder(bad)
    with pytest.raises(FileNotFoundError, match="no_such_encoder"):
        encoder_fingerprint(bad)


def test_bf16_tower_encodes_what_the_fp32_tower_does_to_bf16_rounding(minilm):
    """The bf16 tower is the same network: its embeddings differ from fp32's by rounding, not in kind."""
    from pixelrun.config import load_config
    from pixelrun.model.text import text_encoder

    half = text_encoder(load_config(overrides=["text.precision=bf16", "text.max_tokens=32"]), "cpu")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    captions = ["a small red circle in the top left on a white background", "a large blue square at the top"]
    (full, mask), (rounded, mask_half) = minilm.encode(captions), half.encode(captions)
    assert rounded.dtype == torch.float32 and torch.equal(mask, mask_half)
    cos = torch.nn.functional.cosine_similarity(full[mask], rounded[mask], dim=-1)
    assert cos.min() > 0.99
    assert not torch.equal(full, rounded)  # it really ran in bf16
