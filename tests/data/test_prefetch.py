"""The prefetching wrapper: the same batches as the source alone, a position that excludes the batch
in flight, the work done in its own thread, and errors surfacing where the batch is asked for."""

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from pixelrun.config import aspect_buckets
from pixelrun.data import Batch, Prefetcher
from pixelrun.data.folder import FolderBatchSource, ImageFolder


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(23):
        h, w = [(40, 40), (24, 48), (48, 24)][i % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
        (tmp_path / f"{i:02d}.txt").write_text(f"item {i}")
    (tmp_path / "99.png").write_bytes(b"not an image")  # skipped and counted, in either thread
    (tmp_path / "99.txt").write_text("broken")
    return ImageFolder(tmp_path)


def _source(folder):
    return FolderBatchSource(folder, 4, aspect_buckets(32, 8), seed=3)


def _same(a: Batch, b: Batch) -> bool:
    return a.captions == b.captions and torch.equal(a.images, b.images)


def test_same_batches_and_a_position_without_the_batch_in_flight(folder):
    plain, ahead = _source(folder), Prefetcher(_source(folder))
    states = []
    for _ in range(9):  # more than one epoch
        assert _same(next(plain), next(ahead))
        states.append(plain.state_dict())
        assert ahead.state_dict() == states[-1]
    assert ahead.skipped == plain.skipped == 1  # attributes come from the source
    resumed = Prefetcher(_source(folder))
    resumed.load_state_dict(states[4])
    replay = _source(folder)
    replay.load_state_dict(states[4])
    for _ in range(5):
        assert _same(next(replay), next(resumed))
    resumed.close()
    assert resumed.state_dict() == replay.state_dict()  # closing drops the batch in flight, not the position


class _Recorder:
    """Batch k is built on the thread recorded in `threads[k]`; batch `fail_at` raises."""

    def __init__(self, fail_at=None):
        self.k, self.threads, self.fail_at = 0, [], fail_at

    def __next__(self):
        self.threads.append(threading.current_thread().name)
        self.k += 1
        if self.k == self.fail_at:
            raise RuntimeError(f"batch {self.k} failed")
        return Batch(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), [str(self.k)])

    def state_dict(self):
        return {"k": self.k}


def test_the_next_batch_is_built_in_the_background():
    src = _Recorder()
    ahead = Prefetcher(src)
    assert next(ahead).captions == ["1"] and next(ahead).captions == ["2"]
    ahead.close()
    assert src.threads[0] == threading.current_thread().name
    assert all(t.startswith("pixelrun-prefetch") for t in src.threads[1:]) and len(src.threads) == 3
    assert ahead.state_dict() == {"k": 2}


def test_captions_are_encoded_in_the_background_and_stored_embeddings_kept():
    """With `encode`, each batch arrives with its captions' embeddings, computed in the prefetch
    thread (after the first); a batch that already carries embeddings (converted shards) keeps them."""
    calls = []

    def encode(captions):
        calls.append((threading.current_thread().name, list(captions)))
        codes = torch.tensor([float(c) for c in captions])
        return codes[:, None, None].expand(-1, 2, 3).clone(), torch.ones(len(captions), 2, dtype=torch.bool)

    ahead = Prefetcher(_Recorder(), encode)
    for k in (1, 2, 3):
        batch = next(ahead)
        assert batch.captions == [str(k)] and batch.text is not None and batch.text_mask is not None
        assert torch.equal(batch.text, torch.full((1, 2, 3), float(k))) and batch.text_mask.all()
    ahead.close()
    assert [c for _, c in calls] == [["1"], ["2"], ["3"], ["4"]]  # in order, the 4th in flight at close
    assert all(name.startswith("pixelrun-prefetch") for name, _ in calls[1:])

    class _Stored(_Recorder):
        def __next__(self):
            batch = super().__next__()
            batch.text, batch.text_mask = torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.bool)
            return batch

    calls.clear()
    stored = Prefetcher(_Stored(), encode)
    assert torch.equal(next(stored).text, torch.zeros(1, 2, 3))
    stored.close()
    assert calls == []


def test_an_error_surfaces_when_its_batch_is_asked_for():
    ahead = Prefetcher(_Recorder(fail_at=3))
    next(ahead), next(ahead)  # batch 3 fails in the background meanwhile
    with pytest.raises(RuntimeError, match="batch 3 failed"):
        next(ahead)


def test_training_prefetches_only_when_data_prefetch_is_on(tmp_path, tiny_encoder_dir, monkeypatch):
    from conftest import tiny_overrides

    import pixelrun.run.train as train_mod
    from pixelrun.config import load_config

    made = []

    class Counted(Prefetcher):
        def __init__(self, source, encode=None):
            made.append(encode)
            super().__init__(source, encode)

    monkeypatch.setattr(train_mod, "Prefetcher", Counted)
    for on in (True, False):
        train_mod.train(
            load_config(
                None,
                tiny_overrides(
                    tmp_path / str(on),
                    tiny_encoder_dir,
                    **{"train.steps": 2, "eval.prompts": 0, "data.prefetch": str(on).lower()},
                ),
            )
        )
    assert len(made) == 1 and made[0] is not None  # the run with data.prefetch=true only, encoding there
    last = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1]) for run in ("True", "False")]
    assert last[0]["loss"] == last[1]["loss"]  # the same batches and embeddings either way
