"""Shared fixtures. Nothing here downloads: the tiny text encoder is a randomly initialised BERT
saved with `save_pretrained` beside the offline MiniLM tokenizer, loaded back by path."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> str:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pixelrun.text import resolve_encoder

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_encoder("minilm")).save_pretrained(path)
    return str(path)


def tiny_overrides(run_dir, encoder_dir, **extra) -> list[str]:
    """A config small enough that a training step takes a few milliseconds."""
    base = {
        "run.dir": str(run_dir), "text.encoder": encoder_dir, "text.max_tokens": 16,
        "model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "model.patch_size": 8,
        "data.resolution": 32, "train.batch_size": 4, "train.steps": 6, "train.log_every": 1,
        "train.sample_every": 0, "train.checkpoint_every": 0, "train.warmup_steps": 2,
        "sample.steps": 3, "sample.grid_prompts": 2, "eval.prompts": 4,
        "eval.val_images": 0,  # the validation loss rows: tests/test_train.py checks them on their own
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
