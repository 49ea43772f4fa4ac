"""Write a randomly initialised tiny BERT (with the offline MiniLM tokenizer) to a folder, for
machines without the MiniLM package or a network (the GPU check). Usage: python make_tiny_encoder.py DIR"""

import sys

import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from pixelrun.model.text import resolve_encoder

out = sys.argv[1]
torch.manual_seed(0)
BertModel(
    BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
).save_pretrained(out)
AutoTokenizer.from_pretrained(resolve_encoder("minilm")).save_pretrained(out)
print(out)
