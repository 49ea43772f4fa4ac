"""pixelrun/infra/records.py: a record written and read back is the same object; an unknown field, a
missing one, a wrong shape or a newer format is one RecordError naming the file; a file without
`format` (every file before the records) is read as format 1; every kept result under
benchmarks/results/ loads; metrics.jsonl rows skip a torn line."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import ClassVar

import pytest

from pixelrun.infra.records import (
    EvalPoint,
    GuidanceResult,
    Provenance,
    Record,
    RecordError,
    RunSummary,
    read_metrics,
)
from pixelrun.run.outputs import evaluation_point, images_seen, write_point

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def a_point(step: int = 10) -> EvalPoint:
    return EvalPoint(
        step=step,
        fraction=0.5,
        images=40,
        flops=4e10,
        train_seconds=1.5,
        weights="ema",
        sample_seed=0,
        prompts=["a red circle", "a blue square"],
        val={"val/flow/low": 0.25, "val_ema/flow/low": None},
        results=[
            GuidanceResult(
                guidance=4.0,
                guidance_mode="cfg",
                metrics={"shapes": {"placed": 0.5, "n": 2}, "fd-effnet": 12.0},
                per_prompt={"shapes": {"placed": [0.0, 1.0]}},
            ),
            GuidanceResult(guidance=1.0, guidance_mode="cfg", metrics={"fd-effnet": 20.0}, per_prompt={}),
        ],
        settings={"guidance": 4.0, "prompts": 2},
    )


def a_summary() -> RunSummary:
    return RunSummary(
        status="done",
        steps=10,
        images=40,
        flops=4e10,
        flops_per_image=1e9,
        train_seconds=3.0,
        images_per_s=13.3,
        step_seconds=0.3,
        peak_memory_bytes=2**30,
        device="cpu",
        world_size=1,
    )


def test_each_record_round_trips_through_its_file(tmp_path):
    provenance = Provenance(
        git_commit=None, git_dirty=None, packages={"torch": "2.5"}, python="3.11", host="h", device="cpu", command="x"
    )
    for record in (a_point(), a_summary(), provenance):
        path = record.write(tmp_path / f"{record.KIND}.json")
        back = type(record).read(path)
        assert back == record
        assert json.loads(path.read_text())["format"] == type(record).FORMAT == 1
        assert record.content() == {k: v for k, v in json.loads(path.read_text()).items() if k != "format"}
    assert isinstance(EvalPoint.read(tmp_path / "evaluation point.json").results[1], GuidanceResult)
    # a nested record is written without its own format: the file's version covers it
    assert "format" not in json.loads((tmp_path / "evaluation point.json").read_text())["results"][0]


def test_non_finite_numbers_are_written_as_null(tmp_path):
    summary = dataclasses.replace(a_summary(), images_per_s=math.nan, step_seconds=math.inf)
    back = RunSummary.read(summary.write(tmp_path / "s.json"))
    assert back.images_per_s is None and back.step_seconds is None


def test_unknown_missing_and_misshapen_fields_name_the_file(tmp_path):
    data = a_point().to_dict()
    cases = {
        "unknown": ({**data, "per_prompt": {}}, r"unknown field evaluation point\.per_prompt in a evaluation point"),
        "missing": (
            {k: v for k, v in data.items() if k != "train_seconds"},
            r"missing field evaluation point\.train_seconds",
        ),
        "nested": (
            {**data, "results": [{**data["results"][0], "per_prompts": {}}]},
            r"unknown field evaluation point\.results\[0\]\.per_prompts in a guidance result record",
        ),
        "shape": ({**data, "results": ["4.0"]}, r"field evaluation point\.results\[0\] is not an object"),
        "newer": ({**data, "format": 2}, r"evaluation point record of format 2; this pixelrun reads format 1"),
        "not an object": ([data], r"not a evaluation point record"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}: {message}"):
            EvalPoint.read(path)
    (tmp_path / "torn.json").write_text('{"step": 1')
    with pytest.raises(RecordError, match=r"torn\.json: cannot be read as a evaluation point record"):
        EvalPoint.read(tmp_path / "torn.json")


def test_a_file_without_format_is_format_1(tmp_path):
    data = a_summary().to_dict()
    del data["format"]
    (tmp_path / "run-summary.json").write_text(json.dumps(data))
    assert RunSummary.read(tmp_path / "run-summary.json") == a_summary()


def test_the_base_builds_nested_lists_dicts_and_optionals(tmp_path):
    @dataclasses.dataclass
    class Outer(Record):
        KIND: ClassVar[str] = "outer"
        by_name: dict[str, GuidanceResult]
        maybe: GuidanceResult | None = None
        note: str = "default"

    inner = {"guidance": 2.0, "guidance_mode": "cfg", "metrics": {}, "per_prompt": {}}
    outer = Outer.from_dict({"by_name": {"a": inner}, "maybe": inner}, "outer.json")
    assert outer.by_name["a"] == outer.maybe == GuidanceResult(2.0, "cfg", {}, {})
    assert outer.note == "default"  # a field with a default may be absent
    assert Outer.from_dict(outer.to_dict()) == outer
    with pytest.raises(RecordError, match=r"^outer\.json: unknown field outer\.by_name\.a\.extra in a guidance"):
        Outer.from_dict({"by_name": {"a": {**inner, "extra": 1}}}, "outer.json")


def test_every_kept_result_loads_and_keeps_its_content():
    """The point files, run summaries and provenance under benchmarks/results/, written before the
    records (no `format`) or by them (`format: 1`), read as records whose content is the file's."""
    kinds = {
        EvalPoint: [p for p in RESULTS.rglob("step_*.json") if p.parent.name == "points"],
        RunSummary: list(RESULTS.rglob("run-summary.json")),
        Provenance: list(RESULTS.rglob("provenance.json")),
    }
    assert [len(files) >= n for files, n in zip(kinds.values(), (56, 28, 28))] == [True] * 3
    for kind, files in kinds.items():
        for f in files:
            record = kind.read(f)
            kept = {k: v for k, v in json.loads(f.read_text()).items() if k != "format"}
            assert {k: v for k, v in record.to_dict().items() if k != "format"} == kept, f
    point = EvalPoint.read(kinds[EvalPoint][0])
    assert isinstance(point.results[0], GuidanceResult) and point.results[0].metrics["shapes"]["n"] > 0


def test_the_point_writer_keeps_what_the_evaluator_returned(tmp_path):
    """run/outputs.py: the evaluator's results become the point record, its images sit beside it."""
    from types import SimpleNamespace

    import numpy as np

    scfg = SimpleNamespace(eval=SimpleNamespace(weights="ema"), sample=SimpleNamespace(seed=3))
    results = [
        {
            "settings": {"guidance": g, "guidance_mode": "cfg"},
            "metrics": {"fd-effnet": 10.0 / g},
            "per_prompt": {},
            "prompts": ["p0", "p1"],
        }
        for g in (4.0, 1.0)
    ]
    row = {"val/flow/low": 0.5, "eval/fd-effnet": 2.5, "val_ema/flow/low": 0.4}
    plan, splits = [(0, 4, None), (4, 10, None)], [(8,), (4,)]
    seen = images_seen(plan, splits, 6)
    assert seen == 4 * 8 + 2 * 4
    point = evaluation_point(6, 10, seen, 1e9, 2.0, scfg, row, results)  # type: ignore[arg-type]
    path = write_point(tmp_path, point, np.zeros((2, 4, 4, 3), np.uint8))  # the evaluator's batch
    assert path == tmp_path / "points" / "step_00000006.json"
    back = EvalPoint.read(path)
    assert (back.fraction, back.flops, back.sample_seed, back.prompts) == (0.6, 40e9, 3, ["p0", "p1"])
    assert back.val == {"val/flow/low": 0.5, "val_ema/flow/low": 0.4}
    assert [(r.guidance, r.metrics["fd-effnet"]) for r in back.results] == [(4.0, 2.5), (1.0, 10.0)]
    assert back.settings == results[0]["settings"]
    assert sorted(p.name for p in EvalPoint.image_folder(path).iterdir()) == ["000.png", "001.png"]


def test_metrics_rows_skip_torn_lines_and_rows_without_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\nnot json\n[1, 2]\n{"loss": 1}\n{"step": 2.0}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 0.5}, {"step": 2.0}]
    assert read_metrics(tmp_path / "missing.jsonl") == []
