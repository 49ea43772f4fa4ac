"""Shared fixtures. Nothing here downloads: the tiny text encoder is a randomly initialised BERT
saved with `save_pretrained` beside the offline MiniLM tokenizer, loaded back by path."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# A suite started in the background by a non-interactive shell (`pytest ... &`, a CI script's `&`)
# inherits SIGINT ignored, as POSIX shells set it for background commands, and so would every process
# a test starts: the tests that press Ctrl-C on a `pixelrun` command would see it never arrive. The
# suite's processes take Ctrl-C as a terminal's foreground job does; a handler (unlike SIG_IGN) is not
# inherited, so each child starts with the default and installs Python's own.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# The markers of the slow and multi-process tests, by file and by test name, so no test file carries
# them: `python -m pytest -q -m "not slow and not distributed"` is the fast subset to run while
# working; CI runs everything. Slow: 5 s or more on a 2-core CPU (pytest --durations=40), a
# module fixture's setup included. tests/test_markers.py checks every name here still exists.
DISTRIBUTED_FILES = {
    "test_distributed.py",
    "test_dist_muon.py",
    "test_ema_sharded.py",
    "test_lora_sharded.py",
    "test_rehearsal.py",
    "test_tricks_sharded.py",
}
DISTRIBUTED_TESTS = {
    "test_validation.py::test_fsdp2_sharded_model_on_two_ranks_gives_the_same_numbers",
    "test_import_diffusers.py::test_imported_on_two_ranks_under_fsdp2_is_the_released_model",
}
SLOW_FILES = {
    "test_distributed.py",
    "test_dist_muon.py",
    "test_ema_sharded.py",
    "test_lora_sharded.py",
    "test_lora_run.py",
    "test_rehearsal.py",
    "test_chaos.py",
    "test_demo_page.py",
    "test_tricks_sharded.py",
}
SLOW_TESTS = {
    "test_import_diffusers.py::test_imported_on_two_ranks_under_fsdp2_is_the_released_model",
    "test_lora.py::test_twenty_steps_change_the_adapters_alone",
    "test_stages.py::test_stage_switch_drops_repa_changes_resolution_and_resumes",
    "test_stages.py::test_init_from_and_export",
    "test_shards.py::test_training_on_stored_embeddings_gives_the_same_losses",
    "test_shards.py::test_interrupted_shard_run_resumes_exactly",
    "test_eval.py::test_eval_cli_shapes_and_fd_effnet_with_cached_real_stats",
    "test_eval.py::test_eval_on_emoji_defaults_to_fd_effnet_writes_out_and_reads_no_real_image_on_a_cache_hit",
    "test_eval.py::test_training_writes_eval_rows",
    "test_metrics.py::test_fid_inception_load_round_trip",
    "test_metrics.py::test_efficientnet_frechet_same_vs_different",
    "test_loader.py::test_ctrl_c_with_workers_saves_exits_cleanly_and_resumes",
    "test_loader.py::test_a_run_with_workers_stopped_and_resumed_has_the_inline_losses",
    "test_train.py::test_sigterm_saves_and_the_same_command_resumes",
    "test_divergence.py::test_a_diverged_resume_is_never_saved_falls_back_and_a_lower_lr_finishes",
    "test_divergence.py::test_from_checkpoint_resumes_step_n_and_sets_the_newer_aside",
    "test_divergence.py::test_a_loss_spike_in_the_loop_skips_the_due_checkpoints_and_says_so_once",
    "test_safety.py::test_stage_two_resolution_is_what_inference_uses",
    "test_safety.py::test_resume_with_another_model_or_data_is_refused_before_any_work",
    "test_routing.py::test_self_guidance_mask_is_fixed_and_noise_unchanged",
    "test_validation.py::test_fsdp2_sharded_model_on_two_ranks_gives_the_same_numbers",
    "test_irepa.py::test_projector_flops_are_in_the_count_budgets_use",
    "test_contrastive.py::test_contrastive_and_irepa_train_log_their_terms_and_resume",
    "test_launch.py::test_a_submitit_local_study_gives_the_numbers_of_here_and_a_killed_job_resumes",
    "test_ablate.py::test_ablation_runs_resumes_and_skips_finished_runs",
    "test_import_diffusers.py::test_imported_model_samples_as_the_pipeline_and_exports_back_bit_for_bit",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        file, name = item.path.name, f"{item.path.name}::{item.originalname}"
        if file in SLOW_FILES or name in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        if file in DISTRIBUTED_FILES or name in DISTRIBUTED_TESTS:
            item.add_marker(pytest.mark.distributed)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> str:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pixelrun.model.text import resolve_encoder

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_encoder("minilm")).save_pretrained(path)
    return str(path)


def tiny_overrides(run_dir, encoder_dir, **extra) -> list[str]:
    """A config small enough that a training step takes a few milliseconds."""
    base = {
        "run.dir": str(run_dir),
        "text.encoder": encoder_dir,
        "text.max_tokens": 16,
        "model.hidden_size": 32,
        "model.depth": 2,
        "model.num_heads": 2,
        "model.patch_size": 8,
        "data.resolution": 32,
        "train.batch_size": 4,
        "train.steps": 6,
        "cadence.log_every": 1,
        "cadence.sample_every": 0,
        "cadence.checkpoint_every": 0,
        "schedule.warmup_steps": 2,
        "sample.steps": 3,
        "sample.grid_prompts": 2,
        "eval.prompts": 4,
        "eval.val_images": 0,  # the validation loss rows: tests/run/test_train.py checks them on their own
        "repa.weight": 0.0,  # the default's teacher would cost more than the tiny model; REPA's tests set it
        # text.precision auto takes bf16 on CPUs with native bf16: spelled out, every CI machine computes the same numbers
        "hardware.precision": "fp32",
        "text.precision": "fp32",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


#: the toy studies' overrides of the run, beside a tiny model and text encoder, and their evaluation
TOY = [
    "data.resolution=16",
    "train.batch_size=4",
    "cadence.log_every=1",
    "cadence.sample_every=0",
    "cadence.checkpoint_every=2",
    "schedule.warmup_steps=1",
    "sample.grid_prompts=2",
    "repa.weight=0",  # the default has REPA on; its teacher would cost more than the tiny model
    "hardware.precision=fp32",  # as in tiny_overrides: the same numbers on every CI machine
    "text.precision=fp32",
]
TOY_EVAL = {"points": [0.5, 1.0], "prompts": 4, "sample_steps": 1, "guidance": [4.0, 1.0], "val_images": 2}


def toy_study_spec(folder: Path, encoder_dir: str, name: str = "study", **changes) -> Path:
    """FOLDER/NAME.yaml: the SPEC of a 2-variant x 2-seed study of 4 steps each of a tiny model, its
    output in FOLDER/NAME. The study tests of tests/experiments/ and tests/run/ use this one SPEC, so
    the uninterrupted study they compare against (`toy_study`) is trained once per session."""
    base = [
        f"text.encoder={encoder_dir}",
        "text.max_tokens=16",
        "model.hidden_size=32",
        "model.depth=2",
        "model.num_heads=2",
        "model.patch_size=8",
        *TOY,
        "hardware.threads=1",  # the same numbers whatever OMP_NUM_THREADS the study is started with
    ]
    spec = {
        "name": "toy",
        "out": str(folder / name),
        "base": {"overrides": base},
        "variants": {"baseline": [], "deeper": ["model.depth=3"]},
        "seeds": 2,
        "budget": {"kind": "images", "value": 16},
        "evaluation": TOY_EVAL,
        **changes,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def study_env(**extra: str) -> dict:
    """The environment of a `pixelrun ablate` a test starts: this checkout's pixelrun first."""
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), **extra}


@pytest.fixture(scope="session")
def toy_study(tmp_path_factory, tiny_encoder_dir) -> Path:
    """The output folder of `toy_study_spec`'s study, run once, never interrupted: the reference that a
    killed, resumed or submitit-run study of the same SPEC must equal. Read only: a test that changes
    a study copies it first."""
    folder = tmp_path_factory.mktemp("toy-study")
    spec = toy_study_spec(folder, tiny_encoder_dir)
    cmd = [sys.executable, "-m", "pixelrun", "ablate", str(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=study_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "study"


def one_line_error(capsys, *words) -> str:
    """What the CLI printed on stderr: one line, no traceback, holding every word."""
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int):
    """One spawned rank of a CPU process group, left as training leaves it (`shutdown`): together
    after a clean finish. Tearing down gloo while the peer still has traffic in flight aborts the
    process in a C++ destructor, which failed a CI run."""
    import torch.distributed as dist

    from pixelrun.infra.distributed import shutdown

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two cores, `world` processes
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        yield
    except BaseException:
        shutdown(clean=False)
        raise
    shutdown(clean=True)


def until(cond, what: str, bound: float = 300.0):
    """Wait for `cond()` to be truthy, polling, and return its value; a failure naming `what` after
    `bound` seconds. The bound catches a hang, not slowness: a loaded CI machine can take many times
    longer than a quiet one, so it is minutes, never "usually long enough"."""
    end = time.monotonic() + bound
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {bound} s")
        time.sleep(0.05)
