"""`pixelrun demo FOLDER` refuses, in one line and before loading anything, a folder that is neither a
run nor an ablation; the page's choice lists come from what the config accepts. (The page itself, in a
browser: test_demo_page.py.)"""

from __future__ import annotations

import pytest
from conftest import one_line_error

from pixelrun.cli import main
from pixelrun.cli.demo_draw import guidance_mode_choices, sampler_choices
from pixelrun.config import to_dict
from pixelrun.config.schema import Config


def _run_without_checkpoint(d):
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (d / "checkpoints").mkdir()
    return d


def _file(d):
    (d / "notes.txt").write_text("hi")
    return d / "notes.txt"


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: d, ["is neither a run", "nor an ablation"]),  # an empty folder
        (_run_without_checkpoint, ["is neither a run"]),  # a run that has not saved a checkpoint yet
        (_file, ["is not a folder"]),
        (lambda d: d / "missing", ["is not a folder"]),
    ],
)
def test_a_folder_that_is_neither_a_run_nor_an_ablation_is_one_line(tmp_path, capsys, make, words):
    folder = make(tmp_path)
    assert main(["demo", str(folder)]) == 2
    err = one_line_error(capsys, "pixelrun: config error: FOLDER:", str(folder), *words)
    assert err.startswith("pixelrun: config error: FOLDER:")


def test_a_damaged_ablation_json_is_one_line(tmp_path, capsys):
    (tmp_path / "ablation.json").write_text('{"name": "toy", "runs": [')  # cut mid-write
    assert main(["demo", str(tmp_path)]) == 2
    one_line_error(capsys, "pixelrun: config error: FOLDER:", "ablation.json", "cannot be read as a ablation plan")


def test_a_port_that_cannot_be_served_is_one_line(tmp_path, capsys):
    import socket

    assert main(["demo", str(tmp_path), "--port", "70000"]) == 2
    one_line_error(capsys, "pixelrun: config error: --port:", "1 to 65535", "70000")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["demo", str(tmp_path), "--port", str(port)]) == 2
        one_line_error(capsys, "pixelrun: config error: --port:", f"127.0.0.1:{port} cannot be served")


def test_choices_are_what_the_config_accepts():
    """self-guidance needs a model trained with routing; the samplers are sample.sampler's (Euler and
    Heun), each of which every model accepts."""
    dense, routed = to_dict(Config()), to_dict(Config())
    dense["routing"]["ratio"], routed["routing"]["ratio"] = 0.0, 0.5
    assert guidance_mode_choices([dense]) == ["cfg", "none"]
    assert guidance_mode_choices([routed]) == ["cfg", "none", "self"]
    assert guidance_mode_choices([routed, dense]) == ["cfg", "none"]  # every model of the page accepts it
    assert sampler_choices([dense]) == ["euler", "heun"]
