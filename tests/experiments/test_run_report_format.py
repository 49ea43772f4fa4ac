"""`pixelrun report RUN` reads like a tool's output (issue 30): run-summary.json's numbers by their
kind, the packages as a table, images/s from a loaded machine marked, constant series named rather
than drawn, a series of one point written as a value, every plot labelled."""

from __future__ import annotations

import html
import json
import re

import numpy as np
from test_report import write_run
from test_report_format import raw_numbers

from pixelrun.experiments import figures
from pixelrun.experiments.render import LOADED
from pixelrun.experiments.report import write_run_report

# issue 30's run summary, as the run wrote it
SUMMARY = {
    "status": "done",
    "steps": 104,
    "images": 1664,
    "flops": 1537736704000.0,
    "flops_per_image": 924120000.0,
    "train_seconds": 229.49473762512207,
    "images_per_s": 7.251093864440918,
    "step_seconds": 2.2065842151641846,
    "peak_memory_bytes": 881475584,
    "device": "cpu (x86_64, 2 threads)",
    "world_size": 1,
    "load_1min": 5.25,
    "cpus": 2,
}
PACKAGES = {"pixelrun": "0.1.0", "torch": "2.5.1", "numpy": "2.1.0"}


def page_text(path) -> str:
    """The HTML page's text: tags and embedded images out, cells separated by ' | '."""
    text = re.sub(r"data:image/png;base64,[^\"]*", "", path.read_text())
    text = re.sub(r"</t[dh]>\s*<t[dh]>", " | ", text)
    return html.unescape(re.sub(r"<[^>]+>", "\n", text))


def run_folder(tmp_path):
    run = tmp_path / "run"
    write_run(run, np.random.default_rng(5))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[:-1]]
    for r in rows:
        if "loss" in r:
            r["skipped_steps"] = 0  # always 0
        if "eval/shapes/placed" in r:
            r["eval/shapes/n"] = 8  # a constant
    rows.append({"step": 10, "eval/fd-effnet": 269.73456})  # one point
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "run-summary.json").write_text(json.dumps(SUMMARY))
    prov = json.loads((run / "provenance.json").read_text())
    (run / "provenance.json").write_text(json.dumps({**prov, "packages": PACKAGES}))
    return run


def test_run_report_numbers_by_kind_packages_as_a_table(tmp_path, monkeypatch):
    run = run_folder(tmp_path)
    drawn = []
    real = figures.draw
    monkeypatch.setattr(figures, "draw", lambda panels, x: drawn.append((panels, real(panels, x))) or drawn[-1][1])
    page = write_run_report(run)[-1]
    text = page_text(page)
    for line in (
        "training FLOPs | 1.54 TFLOP",
        "FLOPs per image | 924 MFLOP",
        "training time | 3 min 49 s",
        "step time | 2.21 s",
        "peak memory | 841 MiB",
        "images | 1,664",
        f"images/s (median of the logged) | 7.251 {LOADED}: the 1-minute load average was 5.25 on 2 CPUs",
    ):
        assert line in text, line
    for name, version in PACKAGES.items():
        assert f"{name} | {version}" in text
    assert '{"pixelrun"' not in text  # not a JSON dict
    assert raw_numbers(text) == []
    # constant series named once, not drawn; a series of one point written as its value
    assert "Not drawn, the same at every point: eval/shapes/n (8), skipped_steps (0)." in text
    assert "eval/fd-effnet | run | 10 | 269.7" in text
    titles = [title for panels, _ in drawn for title, _ in panels]
    assert "skipped_steps" not in titles and "eval/shapes/n" not in titles and "eval/fd-effnet" not in titles
    assert {"loss", "flow", "repa", "lr", "grad_norm", "images_per_s", "eval/shapes/placed"} <= set(titles)
    # every plot labelled: the step below, the metric beside
    for panels, fig in drawn:
        assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes] == [
            ("step", title.split(" (", 1)[0]) for title, _ in panels
        ]


def test_a_machine_under_its_cpus_is_not_marked(tmp_path):
    run = run_folder(tmp_path)
    (run / "run-summary.json").write_text(json.dumps({**SUMMARY, "load_1min": 1.5}))
    assert LOADED not in page_text(write_run_report(run)[-1])


def test_a_run_summary_records_the_machine_load(tmp_path, monkeypatch):
    """run_summary writes the 1-minute load average and the CPUs this process may use, what the
    reports' loaded-machine mark is decided from."""
    import os

    from pixelrun.run.outputs import run_summary

    monkeypatch.setattr(os, "getloadavg", lambda: (3.25, 1.0, 0.5))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "images_per_s": 8.0}\n')
    s = run_summary(
        tmp_path,
        steps=1,
        images=4,
        flops_per_image=1e9,
        train_seconds=0.5,
        global_batch=4,
        device="cpu",
        world_size=1,
    )
    assert (s.load_1min, s.cpus, s.images_per_s, s.step_seconds) == (3.25, 2, 8.0, 0.5)
