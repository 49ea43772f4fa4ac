"""`launch.executor: slurm | submitit-local` (docs/cluster.md): an ablation's runs as jobs submitted
through submitit (github facebookincubator/submitit), one job per (variant, seed), the runs of one
submission one Slurm job array. Each job runs its run's `pixelrun train` (a torchrun across its nodes);
the run folder stays the truth of where a run stands, OUT/jobs.json names the job of each run, and the
job that finishes last writes the report.

What of submitit this relies on, as read in its source (submitit 1.5.4):
- submitit/slurm/slurm.py `_make_sbatch_string`: the sbatch file, `--signal=USR2@<signal_delay_s>`
  (the preemption / time-limit signal), `--array=0-<n-1>%<parallelism>` when several are submitted in
  one `executor.batch()` (`SlurmExecutor._internal_process_submissions`), `--open-mode=append`.
- submitit/core/job_environment.py `SignalHandler.checkpoint_and_try_requeue`: on USR2, rank 0's task
  calls the submitted callable's `checkpoint()`, pickles the DelayedSubmission it returns in place of
  the submitted one and requeues the job (`scontrol requeue`; the local executor exits 144, which
  `submitit/local/local.py` `Controller.run` restarts). SIGTERM is only logged there.
- submitit/helpers.py `TorchDistributedEnvironment`: the rendezvous of a run across nodes, the first
  host of SLURM_JOB_NODELIST and a port drawn from the job id.
- submitit/local/local.py `start_controller`: a local job is a controller process that outlives the
  submitting one; with `setup` lines it is started by a shell whose pid is the job id.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pixelrun.config import ConfigError, RunFailed
from pixelrun.experiments.ablate import _die_with_parent, run_state
from pixelrun.experiments.plan import Plan, PlannedRun, train_args, train_command
from pixelrun.experiments.spec import Spec, ranks_per_node
from pixelrun.infra.files import write_atomic
from pixelrun.infra.locks import folder_lock, lock_holder

JOBS = "jobs.json"  # OUT/jobs.json: run -> its job
SUBMITIT = "submitit"  # OUT/submitit/: submitit's pickles and each job's log (<job id>_<task>_log.out)
# USR2 this long before the time limit: the run finishes its step, saves and stops, and the job is
# requeued before Slurm kills it.
SIGNAL_DELAY_S = 120
MAX_TIMEOUTS = 100  # requeues after reaching the time limit: a run longer than time_minutes goes on in the next job
# A Slurm job in one of these states will still run (or is running) its run; UNKNOWN is what
# submitit's watcher says before sacct knows a new job, so it is waited for as well.
ACTIVE = frozenset(
    "PENDING RUNNING REQUEUED REQUEUE_HOLD REQUEUE_FED CONFIGURING COMPLETING RESIZING SUSPENDED "
    "SIGNALING STAGE_OUT UNKNOWN".split()
)
# Local jobs ignore the terminal's Ctrl-C, which reaches every process of the submitting command's
# process group: a shell line that ignores SIGINT before submitit's controller starts, inherited by the
# controller and its task (Python leaves an inherited SIG_IGN of SIGINT alone).
IGNORE_SIGINT = "trap '' INT"


def check_executor(spec: Spec) -> None:
    """A job executor's needs, before any work: submitit, and for Slurm its commands. One line each."""
    executor = spec.launch.executor
    if executor == "here":
        return
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ConfigError(
            "spec.launch.executor",
            f"{executor} submits its jobs through submitit, which is not installed: pip install 'pixelrun[slurm]'",
        ) from None
    if executor == "slurm":
        for command in ("sbatch", "srun"):
            if shutil.which(command) is None:
                raise ConfigError(
                    "spec.launch.executor",
                    f"slurm: no `{command}` on this machine's PATH; run pixelrun ablate on the cluster's "
                    f"login node, or try the study here with executor: submitit-local",
                )


def sbatch_parameters(spec: Spec) -> dict[str, Any]:
    """The SlurmExecutor parameters of every job (`_make_sbatch_string`'s names): one task per node
    runs torchrun with the node's ranks; requeueable, so preemption puts it back in the queue."""
    s = spec.launch.slurm
    params: dict[str, Any] = {
        "job_name": f"pixelrun-{spec.name}",
        "nodes": s.nodes,
        "ntasks_per_node": 1,
        "time": s.time_minutes,
        "signal_delay_s": SIGNAL_DELAY_S,
        "stderr_to_stdout": True,
        "additional_parameters": {"requeue": True},
    }
    optional = {
        "partition": s.partition,
        "gpus_per_node": s.gpus_per_node or None,
        "cpus_per_task": s.cpus_per_task,
        "account": s.account,
        "qos": s.qos,
        "constraint": s.constraint,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def _executor(spec: Spec, folder: Path) -> Any:
    import submitit

    s = spec.launch.slurm
    if spec.launch.executor == "slurm":
        ex: Any = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUTS)
        ex.update_parameters(**sbatch_parameters(spec))
        return ex
    ex = submitit.LocalExecutor(folder=folder, max_num_timeout=MAX_TIMEOUTS)
    ex.update_parameters(
        timeout_min=s.time_minutes,
        gpus_per_node=s.gpus_per_node,  # CUDA_VISIBLE_DEVICES: 0 shows none, as a Slurm job without GPUs
        tasks_per_node=1,
        signal_delay_s=SIGNAL_DELAY_S,
        stderr_to_stdout=True,
        # The controller's own output to a file of the job (the shell's pid is the job id): it would
        # otherwise hold the submitting command's stdout and stderr open until the job ends.
        setup=[IGNORE_SIGINT, f"exec >>{shlex.quote(str(folder))}/$$_controller.log 2>&1"],
    )
    return ex


# ----------------------------------------------------------------------------- inside a job


class TrainJob:
    """What a job runs (submitit pickles it): the run's training command as a child process in its own
    session (the terminal's Ctrl-C does not reach it; it dies with the job: PR_SET_PDEATHSIG), then,
    when every run of the study is done, the report. Requeued (preemption, the time limit), the same
    call runs again and `pixelrun train` resumes the run folder from its newest checkpoint."""

    def __init__(
        self, out: str, variant: str, seed: int, run_dir: str, here: list[str], train: list[str], nodes: int, ranks: int
    ):
        self.out, self.variant, self.seed, self.run_dir = out, variant, seed, run_dir
        self.here = here  # one node: the command `pixelrun ablate` runs with executor here, without its python
        self.train = train  # `pixelrun train`'s arguments, for torchrun across nodes
        self.nodes, self.ranks = nodes, ranks
        self._proc: subprocess.Popen | None = None

    @classmethod
    def for_run(cls, plan: Plan, r: PlannedRun) -> TrainJob:
        launch = plan.spec.launch
        here = train_command(plan, r, sys.executable)[1:]
        return cls(
            str(plan.out),
            r.variant,
            r.seed,
            r.dir,
            here,
            train_args(plan, r),
            launch.slurm.nodes,
            ranks_per_node(launch),
        )

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_proc": None}  # a process handle is this process's only

    def command(self) -> list[str]:
        """One node: what executor here runs. More: torch.distributed.run with this node's rank and the
        rendezvous of submitit's TorchDistributedEnvironment (the job's first host, a port from its id)."""
        if self.nodes == 1:
            return [sys.executable, *self.here]
        from submitit.helpers import TorchDistributedEnvironment

        dist = TorchDistributedEnvironment()
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={self.nodes}",
            f"--node_rank={dist.rank}",  # one task per node: the task's rank is its node's
            f"--nproc_per_node={self.ranks}",
            f"--master_addr={dist.master_addr}",
            f"--master_port={dist.master_port}",
            *self.train,
        ]

    def __call__(self) -> str:
        import submitit

        env = submitit.JobEnvironment()
        _wait_until_free(Path(self.out) / self.run_dir, f"{self.variant} seed {self.seed}")
        cmd = self.command()
        print(f"{self.variant} seed {self.seed}: {shlex.join(cmd)}", flush=True)
        usr_sig = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        self._proc = subprocess.Popen(
            cmd,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,
            preexec_fn=_child_setup(usr_sig),
        )
        if env.global_rank == 0:  # for a local job's `cancel` (Slurm's is scancel)
            write_atomic(_pid_file(env.paths.folder, env.job_id), str(self._proc.pid))
            if _cancel_file(env.paths.folder, env.job_id).exists():  # `cancel` came before the pid file
                self._stop(SIGNAL_DELAY_S)
        code = self._proc.wait()
        if code != 0:
            raise RunFailed(
                f"{self.variant} seed {self.seed}: pixelrun train exited with {code}; "
                f"run pixelrun ablate again to resume it from its newest checkpoint"
            )
        if env.global_rank == 0:
            for path in write_report_when_complete(Path(self.out)):
                print(path, flush=True)
        return "done"

    def checkpoint(self) -> Any:
        """submitit's preemption / time-limit hook (USR2, on rank 0's task): the run saves and stops (SIGTERM,
        as on Ctrl-C), and the same call is requeued; it resumes from the checkpoint just written."""
        from submitit.helpers import DelayedSubmission

        self._stop(SIGNAL_DELAY_S - 30)
        state = self.__getstate__()
        del state["_proc"]
        return DelayedSubmission(TrainJob(**state))

    def _stop(self, within_s: float) -> None:
        """SIGTERM to the training's process group (torchrun and its ranks), SIGKILL if not ended in time.
        Called from submitit's signal handler, which may have interrupted `__call__` inside
        `Popen.wait` (holding its lock): the end is watched with waitid(WNOWAIT), which takes no lock
        and leaves the exit status to that wait."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        for sig, within in ((signal.SIGTERM, within_s), (signal.SIGKILL, 60.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            end = time.monotonic() + within
            while not _ended(proc.pid) and time.monotonic() < end:
                time.sleep(0.1)
            if _ended(proc.pid):
                return


def _ended(pid: int) -> bool:
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def _child_setup(usr_sig: int) -> Callable[[], None]:
    """The training child's preexec: it dies with the job's task (SIGTERM, so it saves) and ignores the
    preemption signal, which Slurm may send to every process of the job: the task's `checkpoint` stops
    it with SIGTERM instead (torchrun and its ranks inherit the ignored signal)."""
    die = _die_with_parent()

    def setup() -> None:
        signal.signal(usr_sig, signal.SIG_IGN)
        if die is not None:
            die()

    return setup


def _wait_until_free(folder: Path, name: str, within_s: float = 600.0) -> None:
    """A requeued job may start while the run's last process still saves: wait for it (pixelrun train
    would refuse the held folder)."""
    end = time.monotonic() + within_s
    holder = lock_holder(folder)
    if holder:
        print(f"{name}: {folder} is still held by {holder}; waiting for it", flush=True)
    while holder and time.monotonic() < end:
        time.sleep(1.0)
        holder = lock_holder(folder)


def _pid_file(folder: Path, job_id: str) -> Path:
    return Path(folder) / f"{job_id}_train.pid"


def _cancel_file(folder: Path, job_id: str) -> Path:
    return Path(folder) / f"{job_id}_cancelled"


@contextlib.contextmanager
def _report_lock(out: Path) -> Iterator[None]:
    """One report writer at a time (two jobs may end together); waits for the other."""
    with open(out / ".report.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_report_when_complete(out: Path, *, anyway: bool = False) -> list[Path]:
    """The report, once every run of the study is done (or `anyway`, marking the unfinished); the paths
    written, or none."""
    from pixelrun.experiments.folders import load_runs, read_plan
    from pixelrun.experiments.report import write_ablation_report

    with _report_lock(out):
        if not anyway and any(r.status != "done" for r in load_runs(out, read_plan(out).runs)):
            return []
        return write_ablation_report(out)


# ----------------------------------------------------------------------------- the jobs of a study


def _key(variant: str, seed: int) -> str:
    return f"{variant}/seed{seed}"


def read_jobs(out: Path) -> dict:
    """OUT/jobs.json: {"runs": {"<variant>/seed<s>": {"executor", "job_id", "earlier": [ids]}}}."""
    path = out / JOBS
    if not path.exists():
        return {"runs": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError("OUT", f"{path} is not readable JSON ({e}); move it aside to submit the runs anew") from None
    return data


def job_states(out: Path, jobs: dict[str, dict]) -> dict[str, str]:
    """The state of each job of `jobs` (key -> its jobs.json entry): Slurm's, from one sacct call
    (submitit's SlurmInfoWatcher); a local job RUNNING while its controller lives, then COMPLETED /
    FAILED from the result submitit pickled, or ENDED without one (killed)."""
    folder = out / SUBMITIT
    slurm_ids = [job["job_id"] for job in jobs.values() if job["executor"] == "slurm"]
    slurm = _slurm_states(slurm_ids) if slurm_ids else {}
    return {
        key: slurm[job["job_id"]] if job["executor"] == "slurm" else _local_state(folder, job["job_id"])
        for key, job in jobs.items()
    }


def _slurm_states(job_ids: list[str]) -> dict[str, str]:
    from submitit import SlurmJob

    watcher = SlurmJob.watcher  # shared by every SlurmJob; it caches the states of ended jobs
    for job_id in job_ids:
        watcher.register_job(job_id)
    watcher.update()
    return {job_id: watcher.get_state(job_id, mode="cache").split()[0] for job_id in job_ids}  # "CANCELLED by 1"


def _local_state(folder: Path, job_id: str) -> str:
    if _is_local_controller(int(job_id), folder):
        return "RUNNING"
    result = folder / f"{job_id}_0_result.pkl"
    if not result.exists():
        return "ENDED"
    from submitit.core.utils import pickle_load

    return "COMPLETED" if pickle_load(result)[0] == "success" else "FAILED"


def is_active(state: str) -> bool:
    return state in ACTIVE


def _is_local_controller(pid: int, folder: Path) -> bool:
    """The pid is alive (not a zombie) and is submitit's local controller of this folder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return False
    return "submitit.local._local" in cmdline and str(folder) in cmdline


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Ctrl-C while submitting is held until the jobs are recorded: a job is never left unnamed."""
    caught: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if caught:
        raise KeyboardInterrupt


def submit(plan: Plan, say: Callable[[str], None] = print) -> list[tuple[str, int, str]]:
    """Submit a job for every run not done and without a live job (one job array on Slurm), and name
    them in OUT/jobs.json. Returns (variant, seed, job id) of the jobs submitted."""
    out = plan.out
    folder = out / SUBMITIT
    with folder_lock(folder, "spec.out", "pixelrun ablate submitting"), _interrupt_after():
        record = read_jobs(out)
        states = job_states(out, record["runs"])
        todo = []
        for r in plan.runs:
            old = record["runs"].get(_key(r.variant, r.seed))
            state = states.get(_key(r.variant, r.seed))
            if run_state(plan, r)["state"] == "done":
                say(f"{r.variant} seed {r.seed}: done, skipped")
            elif old and state and is_active(state):
                say(f"{r.variant} seed {r.seed}: job {old['job_id']} is {state}; left to finish")
            else:
                todo.append(r)
        if not todo:
            return []
        ex = _executor(plan.spec, folder)
        with ex.batch():
            jobs = [ex.submit(TrainJob.for_run(plan, r)) for r in todo]
        for r, job in zip(todo, jobs):
            key = _key(r.variant, r.seed)
            old = record["runs"].get(key)
            earlier = [*old.get("earlier", []), old["job_id"]] if old else []
            record["runs"][key] = {"executor": plan.spec.launch.executor, "job_id": job.job_id, "earlier": earlier}
            say(f"{r.variant} seed {r.seed}: submitted as job {job.job_id} (log {job.paths.stdout})")
        write_atomic(out / JOBS, json.dumps(record, indent=2) + "\n")
    return [(r.variant, r.seed, job.job_id) for r, job in zip(todo, jobs)]


def run_jobs(plan: Plan) -> dict[tuple[str, int], tuple[str, str] | None]:
    """(job id, state) of each run's latest job, None for a run never submitted."""
    record = read_jobs(plan.out)["runs"]
    states = job_states(plan.out, record)
    return {
        (r.variant, r.seed): (
            (record[key]["job_id"], states[key]) if (key := _key(r.variant, r.seed)) in record else None
        )
        for r in plan.runs
    }


def wait_for_jobs(plan: Plan, poll_s: float) -> dict:
    """Until no run's job is active, the study's steps on a progress bar. Returns {"done": [...],
    "unfinished": [(variant, seed, job id, state), ...]}; KeyboardInterrupt stops only the waiting."""
    from pixelrun.infra.progress import progress

    total = sum(r.steps for r in plan.runs)
    with progress(total=total, desc=f"ablate {plan.spec.name}", unit="step") as bar:
        while True:
            states = run_jobs(plan)
            # update, not n= and refresh: a bar in a log file then writes a line per LOG_INTERVAL_S, not per poll
            bar.update(sum(min(run_state(plan, r)["step"], r.steps) for r in plan.runs) - bar.n)
            if not any(s is not None and is_active(s[1]) for s in states.values()):
                break
            time.sleep(poll_s)
    result: dict[str, list] = {"done": [], "unfinished": []}
    for r in plan.runs:
        if run_state(plan, r)["state"] == "done":
            result["done"].append((r.variant, r.seed))
        else:
            job = states[(r.variant, r.seed)]
            result["unfinished"].append((r.variant, r.seed, *(job or ("-", "never submitted"))))
    return result


def job_status_lines(plan: Plan) -> list[str]:
    """Each run: where its folder stands, and its latest job with that job's state and log."""
    states = run_jobs(plan)
    lines = [f"{'variant':<20}{'seed':>5}{'steps':>8}  {'run':<14}{'job':<14}{'state':<11}log"]
    for r in plan.runs:
        st = run_state(plan, r)
        where = "done" if st["state"] == "done" else (f"at step {st['step']}" if st["step"] else "not started")
        job = states[(r.variant, r.seed)]
        if job is None:
            lines.append(f"{r.variant:<20}{r.seed:>5}{r.steps:>8}  {where:<14}{'-':<14}{'-':<11}-")
            continue
        log = plan.out / SUBMITIT / f"{job[0]}_0_log.out"
        lines.append(f"{r.variant:<20}{r.seed:>5}{r.steps:>8}  {where:<14}{job[0]:<14}{job[1]:<11}{log}")
    return lines


def cancel(plan: Plan, say: Callable[[str], None] = print) -> list[str]:
    """Cancel every active job of the study: Slurm's scancel (each run gets SIGTERM and saves); a local
    job's training gets SIGTERM in its process group and saves. Returns the job ids cancelled."""
    cancelled = []
    record = read_jobs(plan.out)["runs"]
    for (variant, seed), job in run_jobs(plan).items():
        if job is None or not is_active(job[1]):
            continue
        job_id = job[0]
        if record[_key(variant, seed)]["executor"] == "slurm":
            from submitit import SlurmJob

            SlurmJob(folder=plan.out / SUBMITIT, job_id=job_id).cancel()
        else:
            _cancel_local(plan.out / SUBMITIT, job_id)
        say(f"{variant} seed {seed}: cancelled job {job_id}")
        cancelled.append(job_id)
    return cancelled


def _cancel_local(folder: Path, job_id: str) -> None:
    """The mark first, then the pid: a job that has not started its training yet sees the mark after
    writing its pid file (TrainJob.__call__), so one of the two always stops it."""
    write_atomic(_cancel_file(folder, job_id), "")
    pid_file = _pid_file(folder, job_id)
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
