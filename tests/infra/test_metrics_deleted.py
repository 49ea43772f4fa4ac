"""metrics.jsonl deleted while a run writes it: the tracker writes it again whole at its next row
(every row so far, those from before a resume included) and says so in one line."""

from __future__ import annotations

import json

from pixelrun.config import load_config
from pixelrun.infra.tracking import Tracker


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_deleted_metrics_file_is_written_again_whole(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = load_config(None, [f"run.dir={run}"])
    first = Tracker(cfg, run)
    for step in (1, 2, 3):
        first.scalars(step, {"loss": 1.0 / step})
    first.close()
    tracker = Tracker(cfg, run, start_step=2)  # resumed from step 2: row 3 dropped
    tracker.scalars(3, {"loss": 0.3})
    path = run / "metrics.jsonl"
    path.unlink()  # deleted mid-run
    assert "deleted" not in capsys.readouterr().err
    tracker.scalars(4, {"loss": 0.25})
    tracker.scalars(5, {"loss": 0.2})
    tracker.close()
    assert [r["step"] for r in _rows(path)] == [1, 2, 3, 4, 5]
    assert _rows(path)[2] == {"step": 3, "loss": 0.3}
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "metrics.jsonl was deleted during the run" in err and "3 rows, steps 1 to 3" in err and "none lost" in err


def test_a_replaced_metrics_file_is_appended_to_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    tracker = Tracker(load_config(None, [f"run.dir={run}"]), run)
    tracker.scalars(1, {"loss": 1.0})
    path = run / "metrics.jsonl"
    tmp = run / "other"
    tmp.write_text('{"step": 1, "loss": 9.0}\n')
    tmp.replace(path)  # another file in its place (an editor's save): kept, and appended to
    tracker.scalars(2, {"loss": 0.5})
    tracker.close()
    assert _rows(path) == [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 0.5}]
    assert capsys.readouterr().err == ""
