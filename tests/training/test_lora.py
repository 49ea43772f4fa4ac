"""LoRA through peft (pixelrun/model/lora.py) in the training state: 20 steps change the adapters
and nothing else, the optimizer (Muon: the adapters are matrices) and the EMA hold the adapters
alone while the EMA copy shares the frozen base, the checkpoint's parts are the adapters' alone,
the merge is W + alpha / rank * B @ A computed by hand, and the module names are the block's."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides

from pixelrun.config import load_config, stage_plan
from pixelrun.config.rules import LORA_TARGETS
from pixelrun.data.shapes import ShapesBatchSource
from pixelrun.infra.distributed import DistContext
from pixelrun.model.denoiser import Block, model_from_config
from pixelrun.model.lora import add_adapters, is_adapter_key, merge_adapters
from pixelrun.model.text import text_encoder
from pixelrun.training.build import build_state
from pixelrun.training.step import train_step

CPU = DistContext(0, 1, 0, torch.device("cpu"))
LORA = {"train.lora.rank": 2, "train.lora.alpha": 6.0, "run.init_from": "unused-here", "ema.every": 1}


def _cfg(tmp_path, enc, **extra):
    return load_config(
        None,
        tiny_overrides(
            tmp_path, enc, **{**LORA, "optimizer.name": "muon", "optimizer.muon_precision": "fp32", **extra}
        ),
    )


def _base(model) -> None:
    """Base weights unlike the seed's (as a run.init_from would give), so the check is not trivial."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_twenty_steps_change_the_adapters_alone(tmp_path, tiny_encoder_dir):
    cfg = _cfg(tmp_path, tiny_encoder_dir)
    enc = text_encoder(cfg, "cpu")
    torch.manual_seed(0)
    st = build_state(cfg, [c for *_, c in stage_plan(cfg)], CPU, enc.dim, base=_base)
    named = dict(st.model.named_parameters())
    adapters = {n for n in named if is_adapter_key(n)}
    assert adapters and {n for n, p in named.items() if p.requires_grad} == adapters
    # the optimizer holds the adapters alone, all of them in Muon (2-D weights of Linears in the blocks)
    held = {id(p) for g in st.opt.param_groups for p in g["params"]}
    assert held == {id(named[n]) for n in adapters}
    assert {id(p) for p in st.opt.param_groups[0]["params"]} == held and not st.opt.param_groups[1]["params"]
    # the EMA copy shares the frozen base (one copy in memory) and averages the adapters alone
    ema_named = dict(st.ema.model.named_parameters())
    for n, p in named.items():
        assert (ema_named[n] is p) == (n not in adapters), n
    before = {n: p.detach().clone() for n, p in named.items()}
    ema_before = {n: p.detach().clone() for n, p in ema_named.items()}

    source = ShapesBatchSource(0, "train", 4, [(32, 32)])
    null = enc.encode([""])
    for step in range(20):
        assert train_step(st, source, enc, *null, cfg, step, 4, 1)[2]
    for n, p in named.items():
        if n in adapters:
            assert not torch.equal(p, before[n]), n  # A and B both move (B from zero)
        else:
            assert torch.equal(p, before[n]), n
    for n, p in ema_named.items():
        assert torch.equal(p, ema_before[n]) == (n not in adapters), n

    # the checkpoint's tensor parts: the adapters, their optimizer state and their EMA, nothing else
    parts = st.parts()
    model_keys = set(parts["model"].state_dict())
    assert model_keys == {f"denoiser.{n}" for n in adapters}
    assert set(parts["ema"].state_dict()) == adapters
    opt_state = parts["optimizer"].state_dict()["state"]
    assert set(opt_state) == {f"denoiser.{n}" for n in adapters}


def test_the_merge_is_the_base_plus_scaled_b_times_a(tmp_path, tiny_encoder_dir):
    cfg = _cfg(tmp_path, tiny_encoder_dir)
    torch.manual_seed(0)
    model = model_from_config(cfg, 32)
    _base(model)
    add_adapters(model, cfg.train.lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g))  # B starts at zero: give it something to merge
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = (torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.7]), torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool))
    with torch.no_grad():
        adapted = model(*x).prediction
    merged = merge_adapters(model).state_dict()
    scale = 6.0 / 2
    linears = 0
    for k, w in merged.items():
        module = k.removesuffix(".weight")
        if f"{module}.base_layer.weight" in sd:
            a, b = sd[f"{module}.lora_A.default.weight"], sd[f"{module}.lora_B.default.weight"]
            torch.testing.assert_close(w, sd[f"{module}.base_layer.weight"] + scale * (b @ a), rtol=0, atol=1e-6)
            linears += 1
        else:
            assert torch.equal(w, sd[k]), k
    assert linears == 2 * 6  # two blocks, six default targets
    assert not any("lora" in k or "base_layer" in k for k in merged)
    with torch.no_grad():
        torch.testing.assert_close(model(*x).prediction, adapted, rtol=1e-4, atol=1e-5)


def test_the_target_names_are_the_blocks_linears():
    cfg = load_config(None, ["model.hidden_size=32", "model.depth=1", "model.num_heads=2"])
    block = model_from_config(cfg, 32).blocks[0]
    assert isinstance(block, Block)
    linears = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == set(LORA_TARGETS)


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ({"train.lora.rank": 0}, "train.lora.rank", "positive integer"),
        ({"train.lora.rank": -1}, "train.lora.rank", "positive integer"),
        ({"train.lora.targets": "[attention.qkv]"}, "train.lora.targets[0]", "unknown module 'attention.qkv'"),
        ({"train.lora.alpha": 0.0}, "train.lora.alpha", "> 0"),
        (
            {"run.init_from": "null"},
            "train.lora.rank",
            "set model.init to a released diffusers model, or run.init_from",
        ),
        ({"train.lora.rank": "null"}, "train.lora.alpha", "train.lora.rank is null"),
    ],
)
def test_bad_lora_keys_are_refused_in_one_line(tmp_path, tiny_encoder_dir, capsys, extra, key, words):
    from conftest import one_line_error

    from pixelrun.cli import main

    over = tiny_overrides(tmp_path / "r", tiny_encoder_dir, **{**LORA, **extra})
    assert main(["train", *over]) == 2
    err = one_line_error(capsys, f"{key}:", words)
    if key == "train.lora.targets[0]":
        assert "attention.img_qkv_proj" in err  # the valid names are listed
    assert not (tmp_path / "r").exists()


def test_a_run_without_lora_needs_no_peft(tmp_path, tiny_encoder_dir, monkeypatch):
    """README's first command on a fresh machine installs no extra: a full run must not import peft
    (it once did, through has_adapters on a fresh start, and `pixelrun train` asked for the extra)."""
    import sys

    from pixelrun.config import load_config
    from pixelrun.model.lora import has_adapters
    from pixelrun.run.train import train

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError, as when not installed
    assert has_adapters(torch.nn.Linear(2, 2)) is False
    summary = train(load_config(None, tiny_overrides(tmp_path / "run", tiny_encoder_dir, **{"train.steps": 2})))
    assert summary["step"] == 2
