"""`pixelrun ablate SPEC.yaml`: named variants of one base config, each trained with the same seeds at
an equal budget, evaluated at the same budget points with one frozen protocol, and compared in one
report built from the run folders alone.

    SPEC (pixelrun/experiments/spec.py)
         -> plan (pixelrun/experiments/plan.py: every config resolved and checked, steps from the
            budget) -> OUT/ablation.json
         -> one `pixelrun train` per (variant, seed), each in OUT/runs/<variant>/seed<s>/ (here)
         -> OUT/report.md, report.html, summary.csv / .json, curves (pixelrun/experiments/report.py)

Pairing: the runs of seed s share `seed` (data order, initial weights, training noise) and
`sample.seed` (the noise of every evaluation image), and all runs share the evaluation prompts, so
variant - baseline differences at the same seed and prompt are paired.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from pixelrun.experiments.plan import Plan, PlannedRun, train_command
from pixelrun.infra.locks import lock_holder
from pixelrun.infra.records import EvalPoint, RunSummary, read_metrics

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent():
    """A `preexec_fn` that has the child sent SIGTERM when this process dies, however it dies (kill -9
    included): Linux's PR_SET_PDEATHSIG. The training child then saves a checkpoint and exits, as on
    Ctrl-C. Elsewhere (no prctl) None: the child outlives a killed parent, and the next
    `pixelrun ablate` waits for it (see `execute`)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _next_startable(queue: list[PlannedRun], plan: Plan, told: set[tuple[str, int]]) -> PlannedRun | None:
    """The first queued run whose folder no live process holds (taken off the queue). A run still
    being trained by another process (the child of a `pixelrun ablate` that was killed, or a
    `pixelrun train` started by hand) is left queued, said once, and started once that process ends:
    it then resumes from its last checkpoint, instead of being refused by the run's lock."""
    from tqdm import tqdm

    for r in queue:
        holder = lock_holder(plan.out / r.dir)
        if holder is None:
            queue.remove(r)
            return r
        if (r.variant, r.seed) not in told:
            told.add((r.variant, r.seed))
            tqdm.write(
                f"{r.variant} seed {r.seed}: {plan.out / r.dir} is still being trained by {holder} "
                f"(an earlier pixelrun ablate's run?); waiting for it to finish, then resuming it",
                file=sys.stderr,
            )
    return None


def _start(plan: Plan, r: PlannedRun, env: dict, threads: int | None) -> subprocess.Popen:
    """Start the training process of `r`, its output appended to OUT/logs/<variant>-seed<s>.log. It
    has its own session (a Ctrl-C in the terminal reaches it through `execute`, once) and dies with
    this process."""
    from tqdm import tqdm

    cmd = train_command(plan, r, sys.executable)
    if threads is not None:
        cmd += [f"hardware.threads={threads}"]
    with open(plan.out / "logs" / f"{r.variant}-seed{r.seed}.log", "ab") as log:
        tqdm.write(
            f"{r.variant} seed {r.seed}: training {r.steps} steps -> {plan.out / r.dir} (log {log.name})",
            file=sys.stderr,
        )
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )


def run_state(plan: Plan, r: PlannedRun) -> dict:
    """Where a run stands, from its folder: done (its summary and final point at the planned step),
    the step it reached (from metrics.jsonl), or not started."""
    folder = plan.out / r.dir
    summary = folder / "run-summary.json"
    final = folder / "points" / EvalPoint.file_name(r.steps)
    if summary.exists() and final.exists() and RunSummary.read(summary).steps == r.steps:
        return {"state": "done", "step": r.steps}
    step = max((int(row["step"]) for row in read_metrics(folder / "metrics.jsonl")), default=0)
    return {"state": "started" if step else "not started", "step": step}


def execute(plan: Plan, *, parallel: int | None = None) -> dict:
    """Train every run that is not done, `parallel` at a time, each in its own process (a crash stays
    in its run; the others go on). Ctrl-C or SIGTERM reaches every run, which saves and stops; the
    same command resumes them. Each run dies with this process (kill -9 included, on Linux); a run
    whose folder another live process still trains is waited for, then resumed. Returns
    {"trained": [...], "skipped": [...], "failed": [...], "interrupted": bool}."""
    from tqdm import tqdm

    from pixelrun.infra.progress import progress

    parallel = parallel or plan.spec.launch.parallel
    pending = [r for r in plan.runs if run_state(plan, r)["state"] != "done"]
    skipped = [r for r in plan.runs if r not in pending]
    for r in skipped:
        tqdm.write(f"{r.variant} seed {r.seed}: done, skipped", file=sys.stderr)
    logs = plan.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // (parallel * plan.spec.launch.nproc_per_node))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if parallel > 1:
        env.update(OMP_NUM_THREADS=str(threads))
    running: dict[subprocess.Popen, PlannedRun] = {}
    result: dict[str, Any] = {"trained": [], "skipped": [(r.variant, r.seed) for r in skipped], "failed": []}
    total = sum(r.steps for r in plan.runs)
    queue = list(pending)
    told: set[tuple[str, int]] = set()
    interrupted = False

    def stop(signum, frame):
        nonlocal interrupted
        interrupted = True
        queue.clear()
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # each run saves a checkpoint and exits

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with progress(total=total, desc=f"ablate {plan.spec.name}", unit="step") as bar:
            while queue or running:
                while queue and len(running) < parallel:
                    nxt = _next_startable(queue, plan, told)
                    if nxt is None:
                        break
                    running[_start(plan, nxt, env, threads if parallel > 1 else None)] = nxt
                time.sleep(0.5)
                # update, not n= and refresh: a bar in a log file then writes a line per LOG_INTERVAL_S, not per poll
                bar.update(sum(min(run_state(plan, r)["step"], r.steps) for r in plan.runs) - bar.n)
                for proc in [p for p in running if p.poll() is not None]:
                    r = running.pop(proc)
                    if proc.returncode == 0 and run_state(plan, r)["state"] == "done":
                        result["trained"].append((r.variant, r.seed))
                        tqdm.write(f"{r.variant} seed {r.seed}: done", file=sys.stderr)
                    elif not interrupted:
                        result["failed"].append((r.variant, r.seed))
                        tqdm.write(
                            f"{r.variant} seed {r.seed}: FAILED (exit {proc.returncode}); see "
                            f"{logs / f'{r.variant}-seed{r.seed}.log'}",
                            file=sys.stderr,
                        )
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    result["interrupted"] = interrupted
    return result


def status_lines(plan: Plan) -> list[str]:
    lines = [f"{'variant':<20}{'seed':>5}{'steps':>8}{'images':>10}  state"]
    for r in plan.runs:
        st = run_state(plan, r)
        where = "done" if st["state"] == "done" else (f"at step {st['step']}" if st["step"] else "not started")
        lines.append(f"{r.variant:<20}{r.seed:>5}{r.steps:>8}{r.images:>10}  {where}")
    return lines
