"""Nothing lost, nothing silently wrong: a non-finite step is skipped and a diverged run stops
before it saves anything non-finite; checkpoints are verified and a damaged one falls back to the
previous; one writer per run directory and per conversion output; outputs are swapped in whole; a
full disk is one line; a bad input is one line (exit 2) before any work."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line_error, tiny_overrides
from PIL import Image

from pixelrun.cli import main
from pixelrun.config import load_config
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.checkpoint_save import save_checkpoint
from pixelrun.infra.checkpoint_verify import MANIFEST, checkpoint_problem, verified_latest
from pixelrun.infra.records import CheckpointMeta
from pixelrun.run.train import train

LOCK_FILE = ".pixelrun.lock"  # pixelrun.infra.locks.LOCK_FILE

PROMPT = "a large red circle in the top left on a white background"


def _last_line(capsys, *words) -> str:
    """The final line of stderr after a run that started (progress bars before it), with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    for w in words:
        assert w in last, (w, last)
    return last


def _strict_rows(run: Path) -> list[dict]:
    """metrics.jsonl read as strict JSON: a bare NaN or Infinity (Python's extension) fails."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ckpt.read_tensors(path).values() if t.is_floating_point())


# ----------------------------------------------------------------------------- non-finite steps


def test_a_diverging_run_stops_in_one_line_and_saves_nothing_non_finite(tmp_path, tiny_encoder_dir, capsys):
    run = tmp_path / "run"
    over = {
        "optimizer.lr": 1e6,
        "schedule.warmup_steps": 0,
        "train.steps": 8,
        "cadence.checkpoint_every": 4,
        "eval.prompts": 0,
    }
    assert main(["train", *tiny_overrides(run, tiny_encoder_dir, **over)]) == 1
    err = _last_line(
        capsys, "training stopped at step", "not finite for 3 steps in a row", "train.max_nonfinite_steps=3"
    )
    rows = _strict_rows(run)
    stopped = int(err.split("training stopped at step ")[1].split(":")[0])
    assert [r["step"] for r in rows] == list(range(1, stopped))  # the stopping step is not logged
    assert rows[-1]["skipped_steps"] == 2 and rows[-1]["grad_norm"] is None  # null, not NaN
    assert ckpt.list_checkpoints(run) == []  # the diverged but finite state of step 4 was not saved either


def test_a_skipped_step_changes_no_parameter_optimizer_state_or_ema(tmp_path, tiny_encoder_dir, monkeypatch):
    from pixelrun.config import stage_plan
    from pixelrun.data.shapes import ShapesBatchSource
    from pixelrun.infra.distributed import DistContext
    from pixelrun.model.text import text_encoder
    from pixelrun.training import step as step_mod
    from pixelrun.training.build import build_state

    cfg = load_config(None, tiny_overrides(tmp_path, tiny_encoder_dir, **{"ema.every": 1}))
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    enc = text_encoder(cfg, "cpu")
    st = build_state(cfg, [c for *_, c in stage_plan(cfg)], ctx, enc.dim)
    source = ShapesBatchSource(0, "train", 4, [(32, 32)])
    null = enc.encode([""])
    step_mod.train_step(st, source, enc, *null, cfg, 0, 4, 1)  # one real step: moments exist

    def snapshot():
        return {k: v.clone() for k, v in ckpt_tensors(st).items()}

    before = snapshot()
    real = step_mod.compute_losses

    def poisoned(*a, **k):
        out = real(*a, **k)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(step_mod, "compute_losses", poisoned)
    terms, grad_norm, applied = step_mod.train_step(st, source, enc, *null, cfg, 1, 4, 1)
    assert not applied and not torch.isfinite(terms["loss"])
    after = snapshot()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    monkeypatch.setattr(step_mod, "compute_losses", real)
    assert step_mod.train_step(st, source, enc, *null, cfg, 2, 4, 1)[2]  # the next finite step applies


def ckpt_tensors(st) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpointed state (model, optimizer moments and step counts, EMA), flat."""
    from pixelrun.training.state import Checkpointer

    out = {}

    def walk(node, name):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{name}.{k}")
        elif isinstance(node, torch.Tensor):
            out[name] = node.detach()

    walk(Checkpointer(st.parts()).tensors(), "")
    return out


def test_first_nonfinite_names_the_tensor():
    tree = {
        "model": {"a": torch.ones(3)},
        "optimizer": {"state": {"b": torch.tensor([1.0, float("inf")])}},
        "ema": {"c": torch.zeros(2), "n": torch.tensor([3])},
    }
    assert ckpt.first_nonfinite(tree) == "optimizer.state.b"
    tree["optimizer"]["state"]["b"][1] = 0
    assert ckpt.first_nonfinite(tree) is None


def test_sampling_refuses_non_finite_weights(tiny_run, tmp_path, capsys):
    """A checkpoint saved before these checks existed may hold NaN weights: sample names it instead
    of writing black images."""
    src = ckpt.latest_checkpoint(tiny_run)
    flat = ckpt.read_tensors(src)
    name = next(k for k in flat if k.startswith("ema.") and flat[k].is_floating_point())
    flat[name][...] = float("nan")
    meta = ckpt.load_meta(src)
    save_checkpoint(tmp_path / "nan", meta.step, flat, meta, (src / "config.yaml").read_text())
    out = tmp_path / "o"
    assert main(["sample", "--checkpoint", str(tmp_path / "nan"), "--prompt", PROMPT, "--out", str(out)]) == 2
    one_line_error(capsys, "--checkpoint", "ema weights", "non-finite values", name[len("ema.") :])
    assert not out.exists()


def test_metrics_rows_write_non_finite_numbers_as_null():
    from pixelrun.infra.tracking import json_row

    assert (
        json.dumps(json_row({"loss": float("nan"), "g": float("inf"), "lr": 1e-3, "n": 2}))
        == '{"loss": null, "g": null, "lr": 0.001, "n": 2}'
    )


# ----------------------------------------------------------------------------- verified checkpoints


def _meta(step: int) -> CheckpointMeta:
    """The meta of a checkpoint that only these tests of the files read."""
    return CheckpointMeta(
        step=step, scheduler={}, torch_rng=torch.get_rng_state(), data=[], world_size=1, config={}, text_dim=0
    )


def _two_checkpoints(root: Path) -> Path:
    for step in (2, 4):
        save_checkpoint(root, step, {"w": torch.arange(1000.0) * step}, _meta(step), "seed: 0\n")
    return ckpt.checkpoint_root(root) / "step_00000004"


def _overwrite_middle(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes((b + 1) % 256 for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


DAMAGE = {
    "random bytes in a .distcp": (lambda p: _overwrite_middle(next(p.glob("*.distcp"))), "does not match its checksum"),
    "truncated .distcp": (lambda p: os.truncate(next(p.glob("*.distcp")), 100), "bytes, "),
    "deleted .distcp": (lambda p: next(p.glob("*.distcp")).unlink(), "is missing"),
    "empty .metadata": (lambda p: (p / ".metadata").write_bytes(b""), ".metadata is 0 bytes"),
    "truncated meta.pt": (lambda p: os.truncate(p / "meta.pt", 10), "meta.pt is 10 bytes"),
    "unreadable manifest": (lambda p: (p / MANIFEST).write_text("{"), "manifest.json is unreadable"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_the_previous_one_is_used(tmp_path, damage):
    newest = _two_checkpoints(tmp_path)
    assert checkpoint_problem(newest) is None
    harm, words = DAMAGE[damage]
    harm(newest)
    said = []
    path, meta = verified_latest(tmp_path, say=said.append)
    assert path.name == "step_00000002" and meta.step == 2
    assert len(said) == 1 and "step_00000004 is damaged" in said[0] and words in said[0], said
    assert "moved aside to damaged-step_00000004" in said[0]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002"]  # never resumed or rotated again
    assert (newest.parent / "damaged-step_00000004").is_dir()  # kept for a look, not deleted


def test_every_checkpoint_damaged_is_one_line_not_a_fresh_start(tmp_path, tiny_encoder_dir, capsys):
    run = tmp_path / "run"
    over = tiny_overrides(run, tiny_encoder_dir, **{"train.steps": 2, "eval.prompts": 0})
    assert main(["train", *over]) == 0
    _overwrite_middle(next(ckpt.latest_checkpoint(run).glob("*.distcp")))
    metrics = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", *over]) == 1
    one_line_error(capsys, "no usable checkpoint", "run.resume=false")
    assert (run / "metrics.jsonl").read_text() == metrics


def test_resume_skips_a_corrupted_checkpoint_and_continues_exactly(tmp_path, tiny_encoder_dir, capsys):
    """Random bytes inside the newest .distcp: the run says which file, moves it aside, resumes
    from the previous checkpoint (which rotation then keeps), and ends where an uninterrupted run
    ends, bit for bit."""
    extra = {"train.steps": 8, "cadence.checkpoint_every": 4, "eval.prompts": 0}
    full, part = tmp_path / "full", tmp_path / "part"
    train(load_config(None, tiny_overrides(full, tiny_encoder_dir, **extra)))
    cfg = load_config(None, tiny_overrides(part, tiny_encoder_dir, **extra))
    train(cfg, stop_at_step=6)  # checkpoints 4 and 6
    damaged = ckpt.checkpoint_root(part) / "step_00000006"
    _overwrite_middle(next(damaged.glob("*.distcp")), 4096)
    capsys.readouterr()
    train(cfg)
    out = capsys.readouterr().out
    assert "step_00000006 is damaged: __0_0.distcp does not match its checksum" in out
    assert "resuming from" in out and "step_00000004 (step 4" in out
    assert [p.name for p in ckpt.list_checkpoints(part)] == ["step_00000004", "step_00000008"]
    assert (damaged.parent / "damaged-step_00000006").is_dir()
    a = ckpt.read_tensors(ckpt.latest_checkpoint(full))
    b = ckpt.read_tensors(ckpt.latest_checkpoint(part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_leftover_step_folder_and_stale_temporary_folders_are_replaced(tmp_path, tiny_encoder_dir, capsys):
    run = tmp_path / "run"
    root = ckpt.checkpoint_root(run)
    (root / "step_00000002").mkdir(parents=True)
    (root / "step_00000002" / ".metadata").write_bytes(b"left by a crash, no meta.pt")
    (root / ".tmp-step_00000002-4242").mkdir()
    (root / ".tmp-step_00000002-4242" / "__0_0.distcp").write_bytes(b"x" * 1000)
    assert main(["train", *tiny_overrides(run, tiny_encoder_dir, **{"train.steps": 2, "eval.prompts": 0})]) == 0
    assert [p.name for p in root.iterdir()] == ["step_00000002"]
    assert checkpoint_problem(root / "step_00000002") is None and ckpt.load_meta(root / "step_00000002").step == 2


def test_rotation_keeps_the_checkpoint_just_written_under_newer_damaged_ones(tmp_path):
    for step in (2, 4, 8):
        save_checkpoint(tmp_path, step, {"w": torch.zeros(4)}, _meta(step), "seed: 0\n", keep=3)
    save_checkpoint(tmp_path, 6, {"w": torch.ones(4)}, _meta(6), "seed: 0\n", keep=1)  # after a fall-back
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000006", "step_00000008"]


# ----------------------------------------------------------------------------- a full disk


def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_temporary_folder(
    tmp_path, tiny_encoder_dir, capsys, monkeypatch
):
    run = tmp_path / "run"
    over = tiny_overrides(run, tiny_encoder_dir, **{"train.steps": 4, "cadence.checkpoint_every": 2, "eval.prompts": 0})
    real_save = torch.save

    def full(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    assert main(["train", *over]) == 1
    _last_line(
        capsys, "checkpoint step 4 could not be written", "no space left on device", "temporary folder was removed"
    )
    root = ckpt.checkpoint_root(run)
    assert [p.name for p in root.iterdir()] == ["step_00000002"]
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["train", *over]) == 0  # the same command again resumes and finishes
    assert ckpt.latest_checkpoint(run).name == "step_00000004"


def test_a_save_checks_the_free_space_first(tmp_path, monkeypatch):
    import shutil

    save_checkpoint(tmp_path, 2, {"w": torch.zeros(10)}, _meta(2), "seed: 0\n")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(ckpt.CheckpointError, match=r"needs 67\.1 MB, 0\.0 MB free"):
        save_checkpoint(tmp_path, 4, {"w": torch.zeros(10)}, _meta(4), "seed: 0\n")
    assert [p.name for p in ckpt.checkpoint_root(tmp_path).iterdir()] == ["step_00000002"]


# ----------------------------------------------------------------------------- one writer per folder


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock, as a running `pixelrun train` or convert would, until
    it is killed or its stdin closes (never for a fixed time a slow machine could outlast)."""
    code = (
        "import sys; from pixelrun.infra.locks import folder_lock\n"
        "with folder_lock(sys.argv[1], 'k', 'test'):\n    print('held', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_train_on_one_run_dir_is_refused(tmp_path, tiny_encoder_dir, capsys):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        over = tiny_overrides(run, tiny_encoder_dir, **{"train.steps": 2, "eval.prompts": 0})
        assert main(["train", *over]) == 2
        one_line_error(capsys, "run.dir:", "is in use by another pixelrun train", f"pid {holder.pid} on host")
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up (kill -9): its lock file is taken over
    assert (run / LOCK_FILE).exists()
    assert main(["train", *over]) == 0
    assert not (run / LOCK_FILE).exists() and ckpt.latest_checkpoint(run).name == "step_00000002"
    # a new run refused after taking the lock (a metric network that is missing) leaves no folder behind
    new = tmp_path / "new-run"
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                *tiny_overrides(
                    new,
                    tiny_encoder_dir,
                    **{"train.steps": 2, "eval.metrics": "[fid]", "eval.fid_weights": str(tmp_path / "no.pth")},
                ),
            ]
        )
        == 2
    )
    one_line_error(capsys, "eval.fid_weights")
    assert not new.exists()


def test_a_second_convert_to_one_out_is_refused(tmp_path, capsys):
    src = _images(tmp_path / "src", 4)
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        assert (
            main(["data", "convert", "--src", str(src), "--out", str(out), "--resolution", "32", "--patch", "8"]) == 2
        )
        one_line_error(capsys, "--out:", "in use by another pixelrun data convert")
    finally:
        holder.kill()
        holder.wait()
    assert main(["data", "convert", "--src", str(src), "--out", str(out), "--resolution", "32", "--patch", "8"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "index.json"]


# ----------------------------------------------------------------------------- outputs swapped in whole


def _images(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"picture {i}")
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_encoder_dir):
    run = tmp_path_factory.mktemp("reliability") / "run"
    train(load_config(None, tiny_overrides(run, tiny_encoder_dir, **{"train.steps": 2, "eval.prompts": 0})))
    return run


def test_sample_interrupted_midway_keeps_the_earlier_output(tiny_run, tmp_path, monkeypatch, capsys):
    from pixelrun.infra import grids as images

    out = tmp_path / "o"
    args = ["sample", "--checkpoint", str(tiny_run), "--prompt", PROMPT, "--prompt", "a blue square", "--out", str(out)]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = images.save_png, []

    def dies_on_the_second(img, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill between two files
        return real(img, path)

    monkeypatch.setattr(images, "save_png", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        main([*args[:-4], "--prompt", "a green triangle", "--out", str(out), "sample.seed=3"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(images, "save_png", real)
    (tmp_path / ".tmp-o-999999999").mkdir()  # what a kill -9 of an earlier call leaves beside it
    assert main([*args, "sample.seed=3"]) == 0  # not refused; replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert {p.name for p in out.iterdir()} == set(before)
    assert (out / "000.png").read_bytes() != before["000.png"]
    capsys.readouterr()


def test_convert_stopped_during_its_final_moves_is_refused_then_redone(tmp_path, tiny_encoder_dir, monkeypatch, capsys):
    from pixelrun.data.convert import convert

    src = _images(tmp_path / "src", 7)
    out = tmp_path / "out"
    real, moves = Path.rename, []

    def stops_after_one(self, target):
        if self.suffix == ".tar":
            moves.append(self.name)
            if len(moves) == 2:
                raise KeyboardInterrupt  # between two moves
        return real(self, target)

    monkeypatch.setattr(Path, "rename", stops_after_one)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, 32, patch=8, shard_size=3, progress=False)
    monkeypatch.setattr(Path, "rename", real)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"] and not (out / "index.json").exists()
    run = tmp_path / "run"
    over = tiny_overrides(
        run,
        tiny_encoder_dir,
        **{"data.source": "shards", "data.path": str(out), "train.steps": 1, "eval.prompts": 0, "train.batch_size": 2},
    )
    assert main(["train", *over]) == 2
    one_line_error(capsys, "data.path", "unfinished `pixelrun data convert`", "run the same conversion again")
    said = []
    index = convert(src, out, 32, patch=8, shard_size=3, progress=False, log=said.append)
    assert said == [f"removed 1 shard(s) left in {out} by a conversion that was stopped while moving them into place"]
    assert index["count"] == 7 and sorted(p.name for p in out.iterdir()) == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
        "index.json",
    ]
    (out / "00001.tar").unlink()
    assert main(["train", *over]) == 2
    one_line_error(capsys, "data.path", "lists 3 shards and 1 of them are missing (first: 00001.tar)")


# ----------------------------------------------------------------------------- bad inputs: one line, exit 2


def test_bad_config_files_are_one_line(tmp_path, capsys):
    cases = {
        "list.yaml": ("- a\n- b\n", "holds a list"),
        "scalar.yaml": ("3\n", "holds a int"),
        "twice.yaml": ("train:\n  steps: 3\n  lr: 0.1\n  steps: 4\n", "'steps' is given twice in one section (line 4)"),
        "binary.yaml": (bytes(range(256)), "not a text file"),
    }
    for name, (content, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        assert main(["train", "--config", str(path), f"run.dir={tmp_path / 'r'}"]) == 2, name
        one_line_error(capsys, "--config", words)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "override, words",
    [
        ("optimizer.lr=nan", "optimizer.lr: must be a finite number"),
        ("optimizer.lr=inf", "optimizer.lr: must be a finite number"),
        ("optimizer.lr=.nan", "optimizer.lr: must be a finite number"),
        ("run.dir=", "run.dir: must not be empty"),
        ("run.dir=/dev/null", "run.dir: /dev/null is not a folder"),
        ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps: must be > 0"),
    ],
)
def test_bad_train_values_are_one_line(tmp_path, capsys, monkeypatch, override, words):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "train.steps=1", "eval.prompts=0", override]) == 2
    one_line_error(capsys, words)
    assert list(tmp_path.iterdir()) == []


def test_a_shard_that_is_not_a_tar_is_one_line(tmp_path, tiny_encoder_dir, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    over = tiny_overrides(
        tmp_path / "run",
        tiny_encoder_dir,
        **{"data.source": "shards", "data.path": str(shards), "train.steps": 1, "eval.prompts": 0},
    )
    assert main(["train", *over]) == 2
    _last_line(capsys, "pixelrun: config error: data.path: no usable sample", "00000.tar (read error")


def test_sample_prompts_file_cut_prompts_and_a_capped_grid(tiny_run, tmp_path, capsys):
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    out = tmp_path / "o"
    assert main(["sample", "--checkpoint", str(tiny_run), "--prompts-file", str(binary), "--out", str(out)]) == 2
    one_line_error(capsys, "--prompts-file", "not a UTF-8 text file")
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"a red circle\x00\x00\n")
    assert main(["sample", "--checkpoint", str(tiny_run), "--prompts-file", str(nul), "--out", str(out)]) == 2
    one_line_error(capsys, "--prompts-file", "NUL bytes")
    many = tmp_path / "many.txt"
    long_prompt = "a very long prompt " + " and another red circle" * 10  # past the grid: one-line labels there
    many.write_text("\n".join([f"circle {i}" for i in range(69)] + [long_prompt]) + "\n")
    assert (
        main(
            ["sample", "--checkpoint", str(tiny_run), "--prompts-file", str(many), "--out", str(out), "sample.steps=1"]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "1 prompt(s) are longer than text.max_tokens=16 tokens and were cut" in err
    assert "grid.png shows the first 64 of 70 images" in err
    with Image.open(out / "grid.png") as grid:  # 16 rows of 4 tiles (160 px, a 20 px label, 6 px apart), not 18
        assert grid.size == (4 * (160 + 6) + 6, 16 * (160 + 20 + 6) + 6)
    assert len(list(out.glob("*.png"))) == 71
