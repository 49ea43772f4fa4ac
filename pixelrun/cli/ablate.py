"""pixelrun ablate [run|plan|status|report|commands|cancel] SPEC.yaml: named variants of a config at an
equal budget with paired seeds, and their report (pixelrun/experiments/spec.py, plan.py and ablate.py;
launch.py for Slurm jobs; docs/ablations.md, docs/cluster.md)."""

from __future__ import annotations

import sys
from pathlib import Path

from pixelrun.config import ConfigError

ABLATE_ACTIONS = ("run", "plan", "status", "report", "commands", "cancel")


def add_parser(subparsers) -> None:
    ab = subparsers.add_parser(
        "ablate",
        help="train named variants of a config at an equal budget with paired seeds, and report each "
        "against the baseline with intervals",
        description="pixelrun ablate [run|plan|status|report|commands|cancel] SPEC.yaml. run (default): train "
        "every (variant, seed) not done yet, then write the report; rerun it after a crash or Ctrl-C to "
        "resume (launch.executor slurm / submitit-local: submit a job per run not done, wait for them; "
        "Ctrl-C stops the waiting, not the jobs). plan: check the SPEC and print each variant's steps. "
        "status: where each run (and its job) stands. report: rebuild the report from the run folders "
        "(SPEC or the ablation's folder). commands: one torchrun command per run, for a scheduler "
        "(written to OUT/commands.sh). cancel: cancel the study's jobs. SPEC keys: docs/ablations.md.",
    )
    ab.add_argument(
        "args",
        nargs="+",
        metavar="[ACTION] SPEC",
        help=f"an action ({', '.join(ABLATE_ACTIONS)}; default run) and the SPEC file",
    )
    ab.add_argument("--parallel", type=int, help="runs at a time on this machine (default: the SPEC's launch.parallel)")
    ab.add_argument(
        "--detach",
        action="store_true",
        help="launch.executor slurm / submitit-local: submit the jobs and return (the last job writes the report)",
    )
    ab.set_defaults(func=run)


def run(args) -> int:
    """run (the default): plan, train what is not done, then the report; plan: check the SPEC and
    print the steps each variant gets, writing nothing; status: where each run stands; report: the
    report from the run folders (a SPEC or the ablation's folder); commands: write and print one
    torchrun command per run, for a scheduler."""
    from pixelrun.experiments.ablate import execute, status_lines
    from pixelrun.experiments.plan import describe_plan, plan_ablation, wall_estimate, write_plan
    from pixelrun.experiments.spec import load_spec

    action, target = (args.args[0], args.args[1:]) if args.args[0] in ABLATE_ACTIONS else ("run", args.args)
    if len(target) != 1:
        raise ConfigError(
            "SPEC",
            f"pixelrun ablate [{'|'.join(ABLATE_ACTIONS)}] SPEC.yaml: give one SPEC file"
            + (" (or, for report, the ablation's folder)" if action == "report" else ""),
        )
    if action == "report":
        folder = Path(target[0])
        out = folder if (folder / "ablation.json").is_file() else Path(load_spec(folder).out)
        return _ablation_report(out)
    spec = load_spec(target[0])
    if spec.launch.executor != "here":
        return _jobs(action, spec, args)
    if action == "cancel":
        raise ConfigError(
            "spec.launch.executor", "cancel stops the jobs of executor slurm / submitit-local; here, Ctrl-C"
        )
    if getattr(args, "detach", False):
        raise ConfigError(
            "--detach", "is for launch.executor slurm / submitit-local; executor here trains in this command"
        )
    if args.parallel is not None:
        if args.parallel < 1:
            raise ConfigError("--parallel", f"must be >= 1; got {args.parallel}")
        spec.launch.parallel = args.parallel
    plan = plan_ablation(spec, say=lambda line: print(line, file=sys.stderr))
    for line in describe_plan(plan):
        print(line, file=sys.stderr)
    if action == "plan":
        print(wall_estimate(plan, say=lambda line: print(line, file=sys.stderr)), file=sys.stderr)
        return 0
    if action == "status":
        print("\n".join(status_lines(plan)))
        return 0
    write_plan(plan)
    if action == "commands":
        print((plan.out / "commands.sh").read_text(), end="")
        print(
            f"wrote {plan.out / 'commands.sh'}; build the report afterwards with: pixelrun ablate report {plan.out}",
            file=sys.stderr,
        )
        return 0
    result = execute(plan)
    if result["interrupted"]:
        print("interrupted: every run saved where it stood; run the same command to resume", file=sys.stderr)
        return 130
    code = _ablation_report(plan.out)
    if result["failed"]:
        print(
            f"pixelrun ablate: {len(result['failed'])} run(s) failed: "
            f"{', '.join(f'{v} seed {s}' for v, s in result['failed'])} (logs in {plan.out / 'logs'}); "
            f"the report covers the others",
            file=sys.stderr,
        )
        return 1
    return code


def _jobs(action: str, spec, args) -> int:
    """The actions of launch.executor slurm / submitit-local (pixelrun/experiments/launch.py)."""
    from pixelrun.experiments import launch
    from pixelrun.experiments.plan import describe_plan, plan_ablation, write_plan

    say = lambda line: print(line, file=sys.stderr)  # noqa: E731
    if args.parallel is not None:
        raise ConfigError("--parallel", f"is for launch.executor here; {spec.launch.executor} runs one job per run")
    if action != "plan" and action != "commands":
        launch.check_executor(spec)
    plan = plan_ablation(spec, say=say)
    for line in describe_plan(plan):
        say(line)
    if action == "plan":
        return 0
    if action == "status":
        print("\n".join(launch.job_status_lines(plan)))
        return 0
    if action == "cancel":
        say(f"cancelled {len(launch.cancel(plan, say=say))} job(s)")
        return 0
    write_plan(plan)
    if action == "commands":
        print((plan.out / "commands.sh").read_text(), end="")
        return 0
    try:
        launch.submit(plan, say=say)  # a Ctrl-C while submitting waits until the jobs are named in jobs.json
        if args.detach:
            say(f"submitted; the last job to finish writes the report. Follow with: pixelrun ablate status {spec.path}")
            return 0
        result = launch.wait_for_jobs(plan, poll_s=30.0 if spec.launch.executor == "slurm" else 0.5)
    except KeyboardInterrupt:
        say(
            f"stopped waiting; the jobs go on (the last writes the report): pixelrun ablate status {spec.path}, "
            f"pixelrun ablate cancel {spec.path}"
        )
        return 130
    for path in launch.write_report_when_complete(plan.out, anyway=True):
        print(path)
    if result["unfinished"]:
        say(
            f"pixelrun ablate: {len(result['unfinished'])} run(s) unfinished: "
            + ", ".join(f"{v} seed {s} (job {j}: {st})" for v, s, j, st in result["unfinished"])
            + f" (logs in {plan.out / launch.SUBMITIT}); run the same command to resume them; the report marks them"
        )
        return 1
    return 0


def _ablation_report(out: Path) -> int:
    """Write the report, print its paths, and its warnings on stderr (a metric the same in every run,
    an EMA too short, a loaded machine): what a reader of the tables must not miss."""
    import json

    from pixelrun.experiments.render import warning_lines
    from pixelrun.experiments.report import write_ablation_report

    for path in write_ablation_report(out):
        print(path)
    for line in warning_lines(json.loads((out / "summary.json").read_text())):
        print(f"warning: {line.removeprefix('⚠ ')}", file=sys.stderr)
    return 0
