"""The README's results table, rendered from the kept studies' summary.json files so that it cannot
disagree with their reports (issue 31), with the shapes score's kind measure beside its placed one.

A listing file (benchmarks/results/ablations/headline.yaml) names the studies in the table's order:
each one's folder (relative to the listing), the title written before its budget, and a label for
each variant shown, the baseline first:

    studies:
      - folder: routing-deep-cpu
        title: TREAD on 8 blocks, 144 tokens
        variants: {dense: dense, tread: "TREAD, half the tokens past blocks 2..4"}

Everything else comes from the summaries: the budget, each variant's mean with its interval, the
paired difference from the baseline with its interval and the verdict, the protocol the sentence
above the table states (one for every study, or a one-line refusal; only the weights scored may
differ, and a study that scores others says so after its title), and for a `target` study its
speed-ups, in a paragraph between that sentence and the table. Adding a study is one
entry; then

    python -m pixelrun.experiments.headline benchmarks/results/ablations/headline.yaml          # print it
    python -m pixelrun.experiments.headline benchmarks/results/ablations/headline.yaml README.md  # replace it there

tests/experiments/test_headline.py fails while README.md holds anything else.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
from pathlib import Path

import yaml

from pixelrun.config import ConfigError
from pixelrun.config.load import load_yaml
from pixelrun.experiments.render import speedup_sentence
from pixelrun.experiments.speedup import BASELINE
from pixelrun.infra import units
from pixelrun.infra.files import write_atomic

MEASURES = ("shapes/placed", "shapes/kind")
COLUMNS = ["study (budget)", "variant", "placed", "Δ placed", "kind", "Δ kind", "verdict (placed / kind)"]
MARK = "<!-- the results table: python -m pixelrun.experiments.headline"  # where a target file holds it


@dataclasses.dataclass(frozen=True)
class Study:
    """One entry of the listing, with its study's summary.json."""

    title: str
    labels: dict[str, str]  # variant -> its label, in display order, the baseline first
    summary: dict


def load_listing(path: str | Path) -> list[Study]:
    """The listing file's studies, each with its summary; anything wrong is a ConfigError naming
    the entry and the key, before any table is written."""
    path = Path(path)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError("LISTING", f"{path} cannot be read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError("LISTING", f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or set(data) != {"studies"} or not isinstance(data["studies"], list):
        raise ConfigError("LISTING", f"{path} must hold one key, studies: a list of {{folder, title, variants}}")
    return [_study(path.parent, i, entry) for i, entry in enumerate(data["studies"])]


def _study(root: Path, i: int, entry: object) -> Study:
    key = f"studies[{i}]"
    if not isinstance(entry, dict) or set(entry) != {"folder", "title", "variants"}:
        raise ConfigError(key, f"must have the keys folder, title and variants; got {entry!r}")
    labels = entry["variants"]
    if not isinstance(labels, dict) or not labels or not all(isinstance(v, str) for v in labels.values()):
        raise ConfigError(f"{key}.variants", "must map each variant shown to its label, the baseline first")
    if any("|" in text for text in [str(entry["title"]), *labels.values()]):
        raise ConfigError(key, "a title or label holds '|', which would split a cell of the table")
    summary_path = root / str(entry["folder"]) / "summary.json"
    if not summary_path.is_file():
        raise ConfigError(f"{key}.folder", f"{summary_path} is missing: `pixelrun ablate report` writes it")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    unknown = [v for v in labels if v not in summary["variants"]]
    if unknown:
        raise ConfigError(f"{key}.variants", f"{unknown} are not variants of {summary['name']}: {summary['variants']}")
    if next(iter(labels)) != summary["baseline"]:
        raise ConfigError(f"{key}.variants", f"must list the baseline, {summary['baseline']}, first")
    if summary["incomplete"]:
        raise ConfigError(
            key, f"{summary['name']} has {len(summary['incomplete'])} incomplete run(s): not a result yet"
        )
    for variant in labels:
        missing = [m for m in MEASURES if not (summary["final"].get(variant) or {}).get(m)]
        if missing:
            raise ConfigError(f"{key}.variants", f"{summary['name']}'s {variant} has no {', '.join(missing)}")
    return Study(str(entry["title"]), dict(labels), summary)


def fixed(x: float | None, sign: bool = False) -> str:
    """Three decimals, as the table writes every score (a difference with its sign: +0.129)."""
    if x is None:
        return units.MISSING
    text = f"{x:{'+' if sign else ''}.3f}"
    return "+0.000" if text == "-0.000" else text


def with_interval(value: dict | None, sign: bool = False) -> str:
    """'0.085 [0.059, 0.115]', or '-0.008 [-0.043, +0.032]' for a difference; the estimate alone
    where the interval has no bounds."""
    if value is None:
        return ""
    text = fixed(value["estimate"], sign)
    if value.get("low") is None or value.get("high") is None:
        return text
    return f"{text} [{fixed(value['low'], sign)}, {fixed(value['high'], sign)}]"


def budget_text(budget: dict) -> str:
    """A study's budget as the title writes it: '3.84e13 FLOPs', '9,600 images', '6 min of step time'."""
    kind, value = budget["kind"], budget["value"]
    if kind == "flops":
        return f"{value:.3g} FLOPs".replace("e+", "e")
    if kind == "images":
        return f"{units.count(value)} images"
    if kind == "minutes":
        return f"{value:g} min of step time"  # pixelrun/experiments/plan.py: minutes x 60 / the benched step
    target = "the baseline's final score" if budget["target"] == BASELINE else f"{budget['target']:g}"
    return f"{budget['metric']} to {target}, at most {units.count(value)} images"


def rows(study: Study, weights: str | None = None) -> list[list[str]]:
    """The study's rows: its title and budget on the first, one variant a row. ``weights``: those the
    sentence above the table names; a study that scored others says which after its budget."""
    out = []
    scored = study.summary["protocol"]["weights"]
    other = f", {scored.upper()} weights" if weights is not None and scored != weights else ""
    for i, (variant, label) in enumerate(study.labels.items()):
        cells = [study.summary["final"][variant][m] for m in MEASURES]
        verdicts = " / ".join(c["verdict"] or units.MISSING for c in cells) if i else ""
        title = f"{study.title} ({budget_text(study.summary['budget'])}{other})" if i == 0 else ""
        out.append(
            [title, label]
            + [t for c in cells for t in (with_interval(c["mean"]), with_interval(c["delta"], True))]
            + [verdicts]
        )
    return out


def protocol(studies: list[Study]) -> dict:
    """What every study shares and the sentence above the table states; a study measured otherwise
    is refused in one line (the table would state a protocol it did not follow). The weights scored
    are the first study's; another study's differing weights are written in its title (`rows`)."""

    def of(s: dict) -> dict:
        p = s["protocol"]
        return {
            "weights": p["weights"],
            "prompts": p["prompts"],
            "seeds": len(s["seeds"]),
            "guidance": f"{s['primary_guidance']:g} ({p['guidance_mode']})",
            "confidence": s["confidence"],
            "cooldown": s["budget"]["cooldown"],
        }

    first = of(studies[0].summary)
    for i, s in enumerate(studies[1:], 1):
        differ = {k: v for k, v in of(s.summary).items() if v != first[k] and k != "weights"}
        if differ:
            k = next(iter(differ))
            raise ConfigError(
                f"studies[{i}]",
                f"{s.summary['name']} has {k} {differ[k]}, {studies[0].summary['name']} {first[k]}: the table "
                f"states one protocol for every study",
            )
    return first


def lead(p: dict) -> str:
    """The sentence that says what the table's numbers are, wrapped as the README's prose is."""
    text = (
        f"Shapes score of the {p['weights'].upper()} weights (unless a study's budget names others) on "
        f"{p['prompts']} held-out prompts at guidance "
        f"{p['guidance']}, mean of {p['seeds']} seeds; every study at an equal budget whose last "
        f"{p['cooldown']:.0%} is a cooldown. **placed**: the fraction of prompted shapes drawn in their colour "
        f"in the prompted cell; **kind**: the fraction drawn (anywhere) with the prompted kind's fill ratio, "
        f"where drawing every shape, all of one kind, scores about 1/3 (circles, squares and triangles are "
        f"equally frequent). Δ: the paired difference from the study's baseline (its first row) with its "
        f"{p['confidence']:.0%} bootstrap interval; a verdict is better or worse only when that interval excludes zero."
    )
    return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)


def time_to_target(study: Study) -> str | None:
    """A `target` study's speed-ups as one paragraph (its report's sentences, with the listing's
    labels), or None for a study at an equal budget."""
    found = study.summary.get("speedup") or {}
    base = study.labels[study.summary["baseline"]]
    sentences = [speedup_sentence(label, found[v], base) for v, label in study.labels.items() if v in found]
    if not sentences:
        return None
    text = f"**Time to target** ({study.title}): " + "; ".join(sentences) + "."
    return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)


def render(studies: list[Study]) -> str:
    """The sentence, each time-to-target study's speed-ups, and the table, as Markdown."""
    if not studies:
        raise ConfigError("studies", "lists no study")
    paragraphs = [t for t in map(time_to_target, studies) if t is not None]
    shared = protocol(studies)
    lines = [
        lead(shared),
        "",
        *[line for t in paragraphs for line in (t, "")],
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += [
        "|" + "|".join(f" {cell} " if cell else " " for cell in row) + "|"
        for s in studies
        for row in rows(s, shared["weights"])
    ]
    return "\n".join(lines) + "\n"


def replace_in(text: str, table: str) -> str:
    """`text` with the block that follows its MARK line (up to the table's last row) replaced by
    `table`."""
    lines = text.splitlines(keepends=True)
    at = next((i for i, line in enumerate(lines) if line.startswith(MARK)), None)
    if at is None:
        raise ConfigError("TARGET", f"holds no line starting {MARK!r} to put the table after")
    start = next((i for i in range(at + 1, len(lines)) if lines[i].startswith("|")), None)
    if start is None:
        raise ConfigError("TARGET", f"holds no table after its line {at + 1}, {MARK!r}")
    end = start
    while end < len(lines) and lines[end].startswith("|"):  # the old sentence and table, up to its last row
        end += 1
    return "".join(lines[: at + 1]) + table + "".join(lines[end:])


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print("usage: python -m pixelrun.experiments.headline LISTING.yaml [TARGET]", file=sys.stderr)
        return 2
    try:
        table = render(load_listing(argv[0]))
        if len(argv) == 1:
            sys.stdout.write(table)
            return 0
        target = Path(argv[1])
        write_atomic(target, replace_in(target.read_text(encoding="utf-8"), table))
    except ConfigError as e:
        print(f"headline: {e}", file=sys.stderr)
        return 2
    print(f"wrote the table into {argv[1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
