"""`pixelrun sample` takes the lock of its `--out` folder as train and convert take theirs: a second
`pixelrun sample` to the same folder at once is refused in one line, before any work. The lock file
lies beside the folder (the folder is swapped in whole when the images are written)."""

from __future__ import annotations

from conftest import one_line_error

from pixelrun.cli import main
from pixelrun.infra.locks import LOCK_FILE, folder_lock


def test_a_second_sample_to_one_out_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "images"
    with folder_lock(out, "--out", "pixelrun sample", beside=True):  # a `pixelrun sample` writing there
        assert (tmp_path / f".images{LOCK_FILE}").exists() and not out.exists()
        code = main(["sample", "--checkpoint", str(tmp_path / "no-run"), "--prompt", "a red circle", "--out", str(out)])
        assert code == 2
        one_line_error(capsys, "--out:", f"{out} is in use by another pixelrun sample (pid", "wait for it to finish")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the lock file goes with its holder


def test_the_lock_is_released_when_sample_stops(tmp_path, capsys):
    out = tmp_path / "images"
    code = main(["sample", "--checkpoint", str(tmp_path / "no-run"), "--prompt", "a red circle", "--out", str(out)])
    assert code == 2 and "in use" not in capsys.readouterr().err  # refused for the missing checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with folder_lock(out, "--out", "pixelrun sample", beside=True):
        pass  # free again
