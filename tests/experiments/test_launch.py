"""`launch.executor: slurm | submitit-local` (pixelrun/experiments/launch.py): the SPEC's launch keys, the
one-line refusals (no submitit, no sbatch), the sbatch file submitit writes for a study (through stand-in
sbatch / sacct / scancel commands on PATH), and a 2-variant x 2-seed study run as submitit-local jobs
that gives executor here's numbers, with one job killed at its first checkpoint and resumed by a rerun."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import toy_study_spec, until

from pixelrun.cli import main

ROOT = Path(__file__).parents[2]


def write_spec(tmp_path: Path, encoder: str, name: str = "spec", **changes) -> Path:
    """tests/conftest.py's toy study (a few steps of a tiny model and text encoder), in TMP_PATH/NAME."""
    return toy_study_spec(tmp_path, encoder, name, **changes)


# ----------------------------------------------------------------------------- the SPEC's launch keys


@pytest.mark.parametrize(
    "launch, key",
    [
        ({"executor": "kubernetes"}, "spec.launch.executor"),
        ({"executor": "submitit-local", "slurm": {"nodes": 2}}, "spec.launch.slurm.nodes"),
        ({"executor": "slurm", "parallel": 2}, "spec.launch.parallel"),
        ({"slurm": {"partition": "gpu"}}, "spec.launch.slurm"),  # executor here reads no slurm key
        ({"executor": "slurm", "nproc_per_node": 4, "slurm": {"gpus_per_node": 8}}, "spec.launch.nproc_per_node"),
        ({"executor": "slurm", "slurm": {"time_minutes": 0}}, "spec.launch.slurm.time_minutes"),
        ({"executor": "slurm", "slurm": {"partiton": "gpu"}}, "spec.launch.slurm.partiton"),
        ({"executor": "slurm", "budget": {"kind": "minutes", "value": 5}}, "spec.budget.kind"),
    ],
)
def test_a_bad_launch_key_is_one_line(tmp_path, capsys, launch, key):
    launch = dict(launch)  # the parameter itself is shared by every run of the test
    budget = launch.pop("budget", {"kind": "images", "value": 16})
    spec = write_spec(tmp_path, "minilm", launch=launch, budget=budget)
    assert main(["ablate", "plan", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pixelrun: config error: {key}"), err
    assert not (tmp_path / "spec").exists()


def test_cancel_and_detach_are_refused_for_executor_here(tmp_path, capsys):
    spec = write_spec(tmp_path, "minilm")
    for argv, key in ((["cancel", str(spec)], "spec.launch.executor"), (["--detach", str(spec)], "--detach")):
        assert main(["ablate", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"pixelrun: config error: {key}"), err
    assert not (tmp_path / "spec").exists()


def test_no_sbatch_or_no_submitit_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    spec = write_spec(tmp_path, "minilm", launch={"executor": "slurm"})
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert main(["ablate", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "spec.launch.executor: slurm: no `sbatch` on this machine's PATH" in err[0], err
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed: importing it raises ImportError
    assert main(["ablate", "status", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'pixelrun[slurm]'" in err[0], err
    assert not (tmp_path / "spec").exists()


def test_the_example_slurm_spec_loads_and_gives_its_sbatch_parameters():
    from pixelrun.experiments.launch import sbatch_parameters
    from pixelrun.experiments.spec import load_spec, world_size

    spec = load_spec(ROOT / "configs" / "ablations" / "accelerators-slurm.yaml")
    assert world_size(spec.launch) == 1
    assert sbatch_parameters(spec) == {
        "job_name": "pixelrun-accelerators-slurm",
        "nodes": 1,
        "ntasks_per_node": 1,
        "time": 120,
        "signal_delay_s": 120,
        "stderr_to_stdout": True,
        "additional_parameters": {"requeue": True},
        "partition": "gpu",
        "gpus_per_node": 1,
        "cpus_per_task": 8,
    }


# ----------------------------------------------------------------------------- Slurm, through stand-ins

# Stand-ins for Slurm's commands: sbatch keeps the file it is given and answers a new job id; sacct
# prints the states the test writes; scancel notes its arguments.
FAKE_SBATCH = """#!/bin/sh
n=$(ls "$FAKE_SLURM"/sbatch-*.sh 2>/dev/null | wc -l)
cp "$1" "$FAKE_SLURM/sbatch-$n.sh"
echo "Submitted batch job $((4242 + n))"
"""
FAKE_SACCT = '#!/bin/sh\necho "JobID|State|NodeList"\ncat "$FAKE_SLURM/sacct.txt" 2>/dev/null\n'
FAKE_SCANCEL = '#!/bin/sh\necho "$@" >> "$FAKE_SLURM/scancel.txt"\n'


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    folder = tmp_path / "slurm"
    folder.mkdir()
    for name, text in (
        ("sbatch", FAKE_SBATCH),
        ("srun", "#!/bin/sh\n"),
        ("sacct", FAKE_SACCT),
        ("scancel", FAKE_SCANCEL),
    ):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(folder))
    from submitit import SlurmJob

    SlurmJob.watcher.clear()  # submitit's watcher is shared by the process: no states from another test
    yield folder
    SlurmJob.watcher.clear()


SLURM = {
    "executor": "slurm",
    "slurm": {
        "partition": "gpu",
        "nodes": 2,
        "gpus_per_node": 2,
        "cpus_per_task": 16,
        "time_minutes": 240,
        "account": "proj",
        "qos": "high",
        "constraint": "h100",
    },
}


def test_a_slurm_study_is_one_job_array_with_the_spec_sbatch_parameters(tmp_path, capsys, fake_slurm, tiny_encoder_dir):
    spec = write_spec(tmp_path, tiny_encoder_dir, launch=SLURM)
    out = tmp_path / "spec"
    assert main(["ablate", "--detach", str(spec)]) == 0
    sbatch = (fake_slurm / "sbatch-0.sh").read_text().splitlines()
    flags = {line for line in sbatch if line.startswith("#SBATCH")}
    log = out / "submitit" / "%A_%a_0_log.out"
    assert flags == {
        "#SBATCH --array=0-3%4",  # the 4 runs, one array, all at once
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",  # one torchrun per node
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=h100",
        "#SBATCH --time=240",
        "#SBATCH --signal=USR2@120",  # the run saves and the job requeues before the time limit
        "#SBATCH --requeue",
        "#SBATCH --job-name=pixelrun-toy",
        "#SBATCH --open-mode=append",
        "#SBATCH --wckey=submitit",
        f"#SBATCH --output={log}",
    }
    assert sbatch[-1].startswith("srun --unbuffered") and sbatch[-1].endswith(
        f"-m submitit.core._submit {out / 'submitit'}"
    )
    jobs = json.loads((out / "jobs.json").read_text())["runs"]
    assert {k: v["job_id"] for k, v in jobs.items()} == {
        "baseline/seed0": "4242_0",
        "baseline/seed1": "4242_1",
        "deeper/seed0": "4242_2",
        "deeper/seed1": "4242_3",
    }
    plan = json.loads((out / "ablation.json").read_text())
    assert {r["global_batch"] for r in plan["runs"]} == {16}  # 4 per rank on 2 nodes x 2 GPUs


def test_a_job_runs_torchrun_across_its_nodes_with_submitits_rendezvous(
    tmp_path, fake_slurm, tiny_encoder_dir, monkeypatch
):
    from submitit.core.utils import DelayedSubmission

    spec = write_spec(tmp_path, tiny_encoder_dir, launch=SLURM)
    out = tmp_path / "spec"
    assert main(["ablate", "--detach", str(spec)]) == 0
    job = DelayedSubmission.load(out / "submitit" / "4242_1_submitted.pkl").function
    slurm_env = {  # what Slurm sets in the task of the second node of array task 1
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4244",
        "SLURM_ARRAY_JOB_ID": "4242",
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
    }
    for k, v in slurm_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    port = random.Random("4242_1").randint(20000, 60000)  # submitit's TorchDistributedEnvironment: from the job id
    assert job.command() == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--node_rank=1",
        "--nproc_per_node=2",
        "--master_addr=gpu07",
        f"--master_port={port}",
        "-m",
        "pixelrun",
        "train",
        "--config",
        str(out / "configs" / "baseline-seed1.yaml"),
    ]


def test_status_names_each_jobs_state_cancel_scancels_the_live_ones_and_a_rerun_resubmits_the_rest(
    tmp_path, capsys, fake_slurm, tiny_encoder_dir
):
    spec = write_spec(tmp_path, tiny_encoder_dir, launch=SLURM)
    assert main(["ablate", "--detach", str(spec)]) == 0
    (fake_slurm / "sacct.txt").write_text(
        "4242_0|RUNNING|gpu07\n4242_1|PENDING|\n4242_2|CANCELLED by 1000|gpu08\n4242_3|FAILED|gpu09\n"
    )
    capsys.readouterr()
    assert main(["ablate", "status", str(spec)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[:6] for line in lines] == [
        ["baseline", "0", "1", "not", "started", "4242_0"],
        ["baseline", "1", "1", "not", "started", "4242_1"],
        ["deeper", "0", "1", "not", "started", "4242_2"],
        ["deeper", "1", "1", "not", "started", "4242_3"],
    ]
    assert [line.split()[6] for line in lines] == ["RUNNING", "PENDING", "CANCELLED", "FAILED"]
    assert main(["ablate", "cancel", str(spec)]) == 0
    assert (fake_slurm / "scancel.txt").read_text().split() == ["4242_0", "4242_1"]
    # The two live jobs are left to run; the two ended ones, not done, are submitted again as one array.
    assert main(["ablate", "--detach", str(spec)]) == 0
    assert "#SBATCH --array=0-1%2" in (fake_slurm / "sbatch-1.sh").read_text()
    jobs = json.loads((tmp_path / "spec" / "jobs.json").read_text())["runs"]
    assert jobs["deeper/seed0"] == {"executor": "slurm", "job_id": "4243_0", "earlier": ["4242_2"]}
    assert jobs["deeper/seed1"] == {"executor": "slurm", "job_id": "4243_1", "earlier": ["4242_3"]}
    assert jobs["baseline/seed0"]["job_id"] == "4242_0"


# ----------------------------------------------------------------------------- submitit-local, real jobs

# Loaded by every Python process of the test's study (PYTHONPATH): in the process that renames the
# checkpoint folder named by PIXELRUN_TEST_GATE into place, the next audited operation writes the
# process's pid beside it and blocks until a `.release` file appears there, so the test acts on the
# run at a known step (PEP 578 audit hooks).
GATE = """
import os, sys
_gate = os.environ.get("PIXELRUN_TEST_GATE")
if _gate:
    _seen = {"renamed": False, "fired": False}

    def _hook(event, args):
        if _seen["fired"]:
            return
        if event == "os.rename" and os.path.abspath(os.fspath(args[1])) == _gate:
            _seen["renamed"] = True
        elif _seen["renamed"] and os.path.isdir(_gate):
            _seen["fired"] = True
            with open(_gate + ".pid.part", "w") as f:
                f.write(str(os.getpid()))
            os.replace(_gate + ".pid.part", _gate + ".pid")
            import time
            while not os.path.exists(_gate + ".release"):
                time.sleep(0.05)

    sys.addaudithook(_hook)
"""


def _ablate(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pixelrun", "ablate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or {**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            return path.read_text()
        assert proc.poll() is None, f"pixelrun ablate ended ({proc.returncode}) before {path} appeared"
        time.sleep(0.05)
    pytest.fail(f"{path}: not within {timeout} s")


def _victim_job(tmp_path: Path) -> dict | None:
    path = tmp_path / "jobs" / "jobs.json"
    return json.loads(path.read_text())["runs"]["deeper/seed1"] if path.exists() else None


def _numbers(summary: dict) -> dict:
    """summary.json without what a run's clock or its folder's path decides."""
    kept = {k: v for k, v in summary.items() if k != "throughput"}
    kept["runs"] = [{k: v for k, v in r.items() if k not in ("train_seconds", "command")} for r in summary["runs"]]
    return kept


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_a_submitit_local_study_gives_the_numbers_of_here_and_a_killed_job_resumes(
    tmp_path, tiny_encoder_dir, toy_study
):
    """Executor here's study of the same SPEC is tests/conftest.py's `toy_study`, run once per session."""
    jobs = write_spec(tmp_path, tiny_encoder_dir, name="jobs", launch={"executor": "submitit-local"})

    (tmp_path / "gate").mkdir()
    (tmp_path / "gate" / "sitecustomize.py").write_text(GATE)
    victim = tmp_path / "jobs" / "runs" / "deeper" / "seed1"
    gate = str(victim / "checkpoints" / "step_00000002")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'gate'}{os.pathsep}{ROOT}", "PIXELRUN_TEST_GATE": gate}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixelrun", "ablate", str(jobs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        os.kill(int(_wait_for(Path(gate + ".pid"), proc)), signal.SIGKILL)  # its training, after step 2's checkpoint
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert "1 run(s) unfinished: deeper seed 1 (job" in err and ": FAILED)" in err, err[-3000:]
    partial = json.loads((tmp_path / "jobs" / "summary.json").read_text())  # the report, the killed run marked
    assert {(r["variant"], r["seed"]): r["status"] for r in partial["runs"]}[("deeper", 1)] == "unfinished"
    record = json.loads((tmp_path / "jobs" / "jobs.json").read_text())["runs"]
    killed = record["deeper/seed1"]["job_id"]
    log = (tmp_path / "jobs" / "submitit" / f"{killed}_0_log.out").read_text()
    assert "pixelrun train exited with -9" in log  # submitit kept the job's output and its error

    status = _ablate("status", str(jobs))
    rows = {tuple(line.split()[:2]): line.split() for line in status.stdout.splitlines()[1:]}
    assert rows[("deeper", "1")][3:7] == ["at", "step", "2", killed] and rows[("deeper", "1")][7] == "FAILED"
    assert all(rows[k][3] == "done" and rows[k][5] == "COMPLETED" for k in rows if k != ("deeper", "1"))

    # The rerun resubmits the killed run alone. A Ctrl-C of it, sent to its whole process group as a
    # terminal does while the resumed job is held after its last checkpoint, stops the waiting and not
    # the job: released, the job finishes the run and a third `pixelrun ablate` only waits for it.
    last = str(victim / "checkpoints" / "step_00000004")
    with open(tmp_path / "second.err", "w") as err_file:
        second = subprocess.Popen(
            [sys.executable, "-m", "pixelrun", "ablate", str(jobs)],
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            env={**env, "PIXELRUN_TEST_GATE": last},
            start_new_session=True,
        )
        try:
            _wait_for(Path(last + ".pid"), second)
            os.killpg(second.pid, signal.SIGINT)
            second.wait(timeout=120)
        finally:
            second.kill()
            Path(last + ".release").touch()
    err = (tmp_path / "second.err").read_text()
    assert second.returncode == 130 and "stopped waiting; the jobs go on" in err, err[-3000:]
    again = _victim_job(tmp_path)
    assert again is not None and again["earlier"] == [killed]
    log = tmp_path / "jobs" / "submitit" / f"{again['job_id']}_0_log.out"
    assert err.count("done, skipped") == 3
    third = _ablate(str(jobs))  # waits for the job the Ctrl-C left running, then writes the report
    assert third.returncode == 0, third.stderr[-3000:]
    assert _victim_job(tmp_path) == again  # that job finished the run: nothing submitted again
    resumed = log.read_text()
    assert f"resuming from {victim / 'checkpoints' / 'step_00000002'} (step 2" in resumed
    assert str(tmp_path / "jobs" / "summary.json") in resumed  # the last job to finish wrote the report
    assert _losses(victim) == _losses(toy_study / "runs" / "deeper" / "seed1")
    summaries = [json.loads((d / "summary.json").read_text()) for d in (toy_study, tmp_path / "jobs")]
    assert _numbers(summaries[1]) == _numbers(summaries[0])
    assert summaries[1]["incomplete"] == summaries[0]["incomplete"]
    print(
        "summary.json final deeper val/flow/mid per seed:", summaries[1]["final"]["deeper"]["val/flow/mid"]["per_seed"]
    )


# The stand-in for `pixelrun train` in a local job: notes each start (its pid and its parent's, the
# job's task) in a file written whole, and each SIGTERM, then waits to be ended.
CHILD = (
    "import os, signal, sys, time\n"
    "folder = sys.argv[1]\n"
    "n = len([f for f in os.listdir(folder) if f.startswith('start')])\n"
    "def stop(signum, frame):\n"
    "    open(os.path.join(folder, f'stopped{n}'), 'w').close()\n"
    "    sys.exit(143)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "part = os.path.join(folder, f'.start{n}')\n"
    "open(part, 'w').write(f'{os.getpid()} {os.getppid()}')\n"
    "os.replace(part, os.path.join(folder, f'start{n}'))\n"
    "while True: time.sleep(60)\n"
)


def _ignored(pid: int) -> int:
    """The mask of signals a process ignores (SigIgn in /proc/PID/status)."""
    line = next(li for li in Path(f"/proc/{pid}/status").read_text().splitlines() if li.startswith("SigIgn:"))
    return int(line.split()[1], 16)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_local_job_ignores_ctrl_c_is_requeued_on_preemption_and_cancel_stops_its_training(tmp_path, monkeypatch):
    """The job and its training are out of reach of the terminal's Ctrl-C; submitit's preemption signal
    (USR2 to the job's task) stops the training with SIGTERM and requeues the job, which runs the same
    command again; `cancel` sends the training SIGTERM and the job ends."""
    from pixelrun.experiments import launch
    from pixelrun.experiments.plan import Plan, PlannedRun
    from pixelrun.experiments.spec import LaunchSpec, Spec

    out, marks = tmp_path / "out", tmp_path / "marks"
    marks.mkdir()
    v = "base"
    r = PlannedRun(v, 0, f"runs/{v}/seed0", 4, 4, 1e9, [2, 4], [], f"configs/{v}-seed0.yaml")
    plan = Plan(Spec(name="toy", launch=LaunchSpec(executor="submitit-local")), out, [r], {}, True, {})
    stand_in = launch.TrainJob(str(out), "base", 0, r.dir, ["-c", CHILD, str(marks)], [], 1, 1)
    monkeypatch.setattr(launch.TrainJob, "for_run", classmethod(lambda cls, plan, run: stand_in))
    [(_, _, job_id)] = launch.submit(plan, say=lambda line: None)
    states = lambda: launch.run_jobs(plan)[("base", 0)]  # noqa: E731
    try:
        started = until(lambda: (marks / "start0").exists() and (marks / "start0").read_text(), "the training")
        child, task = map(int, started.split())
        assert _ignored(int(job_id)) & (1 << (signal.SIGINT - 1))  # the job's shell, its controller, its task
        assert _ignored(task) & (1 << (signal.SIGINT - 1))
        assert _ignored(child) & (1 << (signal.SIGUSR2 - 1))  # only the task acts on preemption
        assert os.getsid(child) == child != os.getsid(0)  # its own session: no terminal signal reaches it
        assert states() == (job_id, "RUNNING")

        os.kill(task, signal.SIGUSR2)  # what Slurm sends on preemption (submitit's --signal)
        until(lambda: (marks / "stopped0").exists(), "the training stopped by the job's checkpoint()")
        again = int(until(lambda: (marks / "start1").exists() and (marks / "start1").read_text(), "restart").split()[0])
        assert Path(f"/proc/{again}/cmdline").read_bytes().split(b"\0")[1:3] == [b"-c", CHILD.encode()]
        assert states() == (job_id, "RUNNING")  # requeued: the same job

        assert launch.cancel(plan, say=lambda line: None) == [job_id]
        until(lambda: (marks / "stopped1").exists(), "the training stopped by cancel")
        until(lambda: states()[1] == "FAILED", "the cancelled job ending")
    finally:
        for mark in marks.glob("start*"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(mark.read_text().split()[0]), signal.SIGKILL)
