"""`pixelrun export --push-to-hub` (issue 30): the exported folder uploaded with huggingface_hub's
create_repo and upload_folder, here against a stand-in of the Hub's HTTP API (HF_ENDPOINT) that
records each request; --dry-run lists the files and sends nothing; offline, no token or a bad id is
one line before any export."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import one_line_error, tiny_overrides

from pixelrun.cli import main


class FakeHub(BaseHTTPRequestHandler):
    """The endpoints create_repo and upload_folder (one commit, regular files) call: repos/create,
    preupload and commit; every file of a commit is decoded and kept."""

    created: list[dict] = []
    commits: list[dict[str, bytes]] = []
    calls: list[str] = []

    def log_message(self, *args):  # quiet
        pass

    def _answer(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self):  # the reachability probe
        self.send_response(200)
        self.end_headers()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?")[0]
        self.calls.append(path)
        host = f"http://{self.headers['Host']}"
        if path == "/api/repos/create":
            request = json.loads(body)
            self.created.append(request | {"authorization": self.headers.get("authorization")})
            return self._answer({"url": f"{host}/{request['organization']}/{request['name']}"})
        if path.startswith("/api/models/") and "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._answer(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if path.startswith("/api/models/") and "/commit/" in path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            files = {
                op["value"]["path"]: base64.b64decode(op["value"]["content"]) for op in lines if op["key"] == "file"
            }
            self.commits.append(files)
            repo = path[len("/api/models/") : path.index("/commit/")]
            return self._answer(
                {"commitUrl": f"{host}/{repo}/commit/abc123", "commitOid": "abc123", "pullRequestUrl": None}
            )
        return self._answer({"error": f"not served here: {path}"}, 404)


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    FakeHub.created, FakeHub.commits, FakeHub.calls = [], [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read at import; the tests set it (conftest.py)
    monkeypatch.setenv("HF_TOKEN", "hf_standin_token")
    yield endpoint
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_encoder_dir) -> Path:
    run = tmp_path_factory.mktemp("push") / "run"
    assert main(["train", *tiny_overrides(run, tiny_encoder_dir, **{"train.steps": 1, "eval.prompts": 0})]) == 0
    return run


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_the_exported_folder_as_it_is(run_dir, tmp_path, hub, capsys):
    out = tmp_path / "export"
    args = ["export", "--checkpoint", str(run_dir), "--out", str(out), "--push-to-hub", "me/tiny", "--private"]
    assert main(args) == 0
    assert FakeHub.created == [
        {
            "name": "tiny",
            "organization": "me",
            "visibility": "private",
            "type": "model",
            "authorization": "Bearer hf_standin_token",
        }
    ]
    assert FakeHub.commits == [_files(out)] and {"model.safetensors", "config.yaml"} <= set(_files(out))
    assert f"uploaded {len(_files(out))} files" in capsys.readouterr().out


def test_dry_run_lists_the_files_and_sends_nothing(run_dir, tmp_path, hub, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")  # a dry run needs no token and no network
    out = tmp_path / "export"
    assert (
        main(["export", "--checkpoint", str(run_dir), "--out", str(out), "--push-to-hub", "me/tiny", "--dry-run"]) == 0
    )
    printed = capsys.readouterr().out.splitlines()
    files = _files(out)
    for name, data in files.items():
        assert f"  {name} ({len(data):,} bytes)" in printed
    assert printed[-1] == (
        f"dry run: would upload {len(files)} files ({sum(map(len, files.values())):,} bytes) to me/tiny; nothing was uploaded"
    )
    assert FakeHub.calls == [] and FakeHub.created == []


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ({"HF_TOKEN": None}, "no Hugging Face token"),
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "does not answer"),
        ({"repo": "not a repo id"}, "is not a repository id"),
    ],
)
def test_push_refusals_are_one_line_before_the_export(run_dir, tmp_path, hub, capsys, monkeypatch, setup, words):
    for key, value in setup.items():
        if key == "repo":
            continue
        if value is None:
            monkeypatch.delenv(key)
        else:
            monkeypatch.setenv(key, value)
    monkeypatch.setattr("huggingface_hub.utils._auth._get_token_from_file", lambda: None)
    out = tmp_path / "export"
    repo = setup.get("repo", "me/tiny")
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out), "--push-to-hub", repo]) == 2
    one_line_error(capsys, "--push-to-hub", words)
    assert not out.exists() and FakeHub.calls == []


def test_private_and_dry_run_need_push_to_hub(run_dir, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "x"), "--dry-run"]) == 2
    one_line_error(capsys, "--push-to-hub", "--dry-run")
