"""model.pos_embed=sincos: a fixed 2-D sin-cos table of each image token's row and column, added to
the patch embedding before the first block (as JiT adds its pos_embed)."""

from __future__ import annotations

import math

import pytest
import torch

from pixelrun.model.denoiser import build_model, sincos_pos_embed


def test_table_by_hand():
    # 2 rows x 3 columns, 8 features: a quarter of 2 frequencies, 1 and 1/100
    table = sincos_pos_embed(2, 3, 8, "cpu")
    assert table.shape == (6, 8)
    r, c = 1, 2  # token 5 in row-major order
    want = [
        math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100),
        math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100),
    ]  # fmt: skip
    torch.testing.assert_close(table[5], torch.tensor(want))
    # token 0 (row 0, column 0): sin 0 = 0 and cos 0 = 1 in both halves
    torch.testing.assert_close(table[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    # every token gets its own row of the table
    assert len({tuple(v.tolist()) for v in table}) == 6


@pytest.mark.parametrize("size", [(16, 16), (16, 32)])
def test_sincos_is_the_plain_model_with_the_table_added_to_the_patch_embedding(size):
    torch.manual_seed(0)
    kw = dict(patch_size=8, hidden_size=32, depth=2, num_heads=2, bottleneck_size=None)
    plain = build_model("tiny", 16, **kw)
    with_table = build_model("tiny", 16, pos_embed="sincos", **kw)
    for lin in (plain.final_layer.linear, plain.final_layer.adaLN_modulation[1]):
        torch.nn.init.normal_(lin.weight, std=0.1)  # not the zero output of a fresh model
    for blk in plain.blocks:
        torch.nn.init.normal_(blk.modulation.lin.weight, std=0.1)
    assert not set(dict(with_table.named_parameters())) ^ set(dict(plain.named_parameters()))  # no new weights
    with_table.load_state_dict(plain.state_dict())
    h, w = size
    x, t, txt = torch.randn(2, 3, h, w), torch.tensor([0.3, 0.9]), torch.randn(2, 5, 16)
    # the table for a (h/8) x (w/8) grid written out from the formula, added where the plain model embeds patches
    gh, gw, q = h // 8, w // 8, 8
    freqs = [10000 ** (-i / q) for i in range(q)]
    rows = [[f(r * o) for f in (math.sin, math.cos) for o in freqs] for r in range(gh) for _ in range(gw)]
    cols = [[f(c * o) for f in (math.sin, math.cos) for o in freqs] for _ in range(gh) for c in range(gw)]
    table = torch.tensor([r + c for r, c in zip(rows, cols)])
    handle = plain.img_in.register_forward_hook(lambda m, i, out: out + table)
    want = plain(x, t, txt).prediction
    handle.remove()
    got = with_table(x, t, txt).prediction
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain(x, t, txt).prediction, atol=1e-3)
