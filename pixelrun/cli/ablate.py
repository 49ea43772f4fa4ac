"""pixelrun ablate [run|plan|status|report|commands] SPEC.yaml: named variants of a config at an
equal budget with paired seeds, and their report (pixelrun/experiments/spec.py, plan.py and ablate.py;
docs/ablations.md)."""

from __future__ import annotations

import sys
from pathlib import Path

from pixelrun.config import ConfigError

ABLATE_ACTIONS = ("run", "plan", "status", "report", "commands")


def add_parser(subparsers) -> None:
    ab = subparsers.add_parser(
        "ablate",
        help="train named variants of a config at an equal budget with paired seeds, and report each "
        "against the baseline with intervals",
        description="pixelrun ablate [run|plan|status|report|commands] SPEC.yaml. run (default): train every "
        "(variant, seed) not done yet, then write the report; rerun it after a crash or Ctrl-C to "
        "resume. plan: check the SPEC and print each variant's steps. status: where each run stands. "
        "report: rebuild the report from the run folders (SPEC or the ablation's folder). commands: one "
        "torchrun command per run, for a scheduler (written to OUT/commands.sh). SPEC keys: "
        "docs/ablations.md.",
    )
    ab.add_argument(
        "args",
        nargs="+",
        metavar="[ACTION] SPEC",
        help=f"an action ({', '.join(ABLATE_ACTIONS)}; default run) and the SPEC file",
    )
    ab.add_argument("--parallel", type=int, help="runs at a time on this machine (default: the SPEC's launch.parallel)")
    ab.set_defaults(func=run)


def run(args) -> int:
    """run (the default): plan, train what is not done, then the report; plan: check the SPEC and
    print the steps each variant gets, writing nothing; status: where each run stands; report: the
    report from the run folders (a SPEC or the ablation's folder); commands: write and print one
    torchrun command per run, for a scheduler."""
    from pixelrun.experiments.ablate import execute, status_lines
    from pixelrun.experiments.plan import describe_plan, plan_ablation, write_plan
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
    if args.parallel is not None:
        if args.parallel < 1:
            raise ConfigError("--parallel", f"must be >= 1; got {args.parallel}")
        spec.launch.parallel = args.parallel
    plan = plan_ablation(spec, say=lambda line: print(line, file=sys.stderr))
    for line in describe_plan(plan):
        print(line, file=sys.stderr)
    if action == "plan":
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


def _ablation_report(out: Path) -> int:
    from pixelrun.experiments.report import write_ablation_report

    for path in write_ablation_report(out):
        print(path)
    return 0
