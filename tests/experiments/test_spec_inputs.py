"""SPEC files refused in one line before any work: a binary file, an `out:` that is a file, a variant
written twice (YAML would keep the last silently)."""

from __future__ import annotations

import pytest
from test_ablate import write_spec

from pixelrun.cli import main


def _refused(capsys, spec, *words) -> None:
    assert main(["ablate", "plan", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def test_a_binary_spec_is_refused(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 8)
    _refused(capsys, spec, "config error: SPEC:", "is not a text file (not UTF-8)")


def test_a_spec_whose_out_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    _refused(capsys, write_spec(tmp_path), "config error: spec.out:", "is a file")
    assert (tmp_path / "out").read_text() == "not a folder"


@pytest.mark.parametrize("where", ["variants", "top"])
def test_a_key_written_twice_in_a_spec_is_refused_naming_it(tmp_path, capsys, where):
    spec = write_spec(tmp_path)
    text = spec.read_text()
    if where == "variants":  # `deeper:` a second time: YAML keeps the last, the first is lost
        text = text.replace("variants:\n", "variants:\n  deeper:\n  - model.depth=8\n")
        word = "'deeper' is given twice"
    else:
        text += "seeds: 3\n"
        word = "'seeds' is given twice"
    spec.write_text(text)
    _refused(capsys, spec, "config error: SPEC:", word, "line")
    assert not (tmp_path / "out").exists()
