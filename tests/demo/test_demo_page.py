"""`pixelrun demo` in a real headless browser (Debian's chromium and chromedriver, driven by Selenium;
nothing downloaded): a toy ablation of 2 variants x 2 seeds is trained, its page opened, a prompt
typed and Generate pressed; each image the page shows, fetched from its <img src>, equals the PNG
`pixelrun sample` writes for that run with the same settings, pixel for pixel. A run's page does the
same with every setting changed, loads each model once per weights, and no folder is written into.

Without chromium or chromedriver these tests are skipped with the reason, except where
PIXELRUN_REQUIRE_BROWSER=1 (.ci/run sets it): there they fail. PIXELRUN_DEMO_SCREENSHOT=FILE saves the
ablation page as FILE (the picture of docs/demo.md)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import free_port, one_line_error
from PIL import Image

from pixelrun.cli import main

PROMPT = "a small blue square above a red circle"
TOY = [
    "text.max_tokens=16",
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.patch_size=8",
    "data.resolution=32",
    "train.batch_size=4",
    "cadence.log_every=1",
    "cadence.sample_every=0",
    "cadence.checkpoint_every=0",
    "schedule.warmup_steps=1",
    "sample.grid_prompts=0",
    "repa.weight=0",
]
WAIT_S = 120  # the longest a page may take to load or to draw: a bound, not a pace


def need(ok: bool, reason: str) -> None:
    """Skip with `reason` unless the browser tests are required (CI), where they fail instead."""
    if ok:
        return
    if os.environ.get("PIXELRUN_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (PIXELRUN_REQUIRE_BROWSER=1: the browser tests may not be skipped)")
    pytest.skip(reason)


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder`: (size, mtime in ns) by relative path."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_encoder_dir) -> Path:
    """A toy ablation as `pixelrun ablate` leaves it: the plan and configs (`ablate commands`), each
    run trained by the command its line holds (`pixelrun train --config`, here in this process) and
    the report (`ablate report`): baseline and deeper, seeds 0 and 1, 2 steps each."""
    root = tmp_path_factory.mktemp("demo-study")
    spec = {
        "name": "toy",
        "out": str(root / "out"),
        "base": {"overrides": [f"text.encoder={tiny_encoder_dir}", *TOY]},
        "variants": {"baseline": [], "deeper": ["model.depth=3"]},
        "seeds": 2,
        "budget": {"kind": "images", "value": 8},
        "evaluation": {"points": [1.0], "prompts": 2, "sample_steps": 2, "guidance": [2.0], "val_images": 0},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = root / "out"
    assert main(["ablate", "commands", str(root / "spec.yaml")]) == 0
    for line in (out / "commands.sh").read_text().splitlines():
        if " pixelrun train --config " in line:
            assert main(["train", "--config", line.split(" --config ")[1]]) == 0
    assert main(["ablate", "report", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    need(
        bool(chromium and driver),
        "no headless browser: apt-get install chromium chromium-driver (Debian) to run the page tests",
    )
    need(_importable("selenium") and _importable("gradio"), "selenium and gradio: pip install -e '.[test]'")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # Nothing on the network: without these chromium waits on connections it cannot make.
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tempfile.mkdtemp(prefix='pixelrun-chromium-')}",
    ):
        options.add_argument(flag)
    b = webdriver.Chrome(service=Service(driver), options=options)
    yield b
    b.quit()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="module")
def ablation_page(browser, study):
    """`pixelrun demo OUT`, the command itself, on a free port: (its URL, the folder's files before)."""
    before = tree(study)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixelrun", "demo", str(study), "--port", str(port), "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(WAIT_S)
    if not first or not first[0].startswith("pixelrun demo: http://127.0.0.1:"):
        proc.kill()
        pytest.fail(f"pixelrun demo did not start: {first} {proc.stderr.read()[-3000:]}")
    yield f"http://127.0.0.1:{port}", before
    proc.terminate()
    proc.wait(WAIT_S)


def sample(run: Path, out: Path, weights: str, overrides: list[str]) -> np.ndarray:
    """What `pixelrun sample` draws for PROMPT, as an array."""
    assert main(["sample", "--checkpoint", str(run), "--prompt", PROMPT, "--out", str(out), "--weights", weights, *overrides]) == 0  # fmt: skip
    return np.asarray(Image.open(out / "000.png"))


def settings(**values) -> list[str]:
    return [f"sample.{k}={v}" for k, v in values.items()]


# ----------------------------------------------------------------------------- driving the page


def open_page(browser, url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, WAIT_S).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#generate"))


def set_number(browser, elem_id: str, value) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)  # Gradio takes a number when its box loses focus


def choose(browser, elem_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input[value='{value}']").click()


def choices(browser, elem_id: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [i.get_attribute("value") for i in browser.find_elements(By.CSS_SELECTOR, f"#{elem_id} input[type=radio]")]


def status(browser) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, "#status").text


def press_generate(browser, prompt: str) -> str:
    """Type `prompt` (replacing what is there), press Generate and return the status line that ends
    the drawing (the page numbers its drawings, and clears the images and the status first)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    before = status(browser)
    box = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(prompt)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    ended = lambda b: (s := status(b)) != before and s.startswith(("Drawing ", "Not drawn")) and s != "Drawing…"
    WebDriverWait(browser, WAIT_S).until(ended)
    return status(browser)


def generate(browser, count: int, prompt: str = PROMPT) -> list[np.ndarray]:
    """The `count` images of the next drawing of `prompt`, each fetched from its <img src> as the
    browser gets it and decoded (the earlier ones were cleared when Generate was pressed)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def sources(b) -> list[str]:
        return [i.get_attribute("src") or "" for i in b.find_elements(By.CSS_SELECTOR, "[id^=image-] img")]

    line = press_generate(browser, prompt)
    assert line.startswith("Drawing ") and prompt[:20] in line, line
    WebDriverWait(browser, WAIT_S).until(lambda b: len(s := sources(b)) == count and all(s))
    images = []
    for src in sources(browser):
        data = urllib.request.urlopen(src, timeout=WAIT_S).read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", src  # lossless, as served (Gradio's default would be WebP)
        images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return images


# ----------------------------------------------------------------------------- the tests


def test_the_ablation_page_draws_every_run_as_pixelrun_sample_does(browser, study, ablation_page, tmp_path):
    from selenium.webdriver.common.by import By

    url, before = ablation_page
    open_page(browser, url)
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "[id^=image-] [data-testid=block-label]")]
    runs = [("baseline", 0), ("baseline", 1), ("deeper", 0), ("deeper", 1)]
    assert labels == [f"{v} · seed {s}" for v, s in runs]
    verdict = browser.find_element(By.CSS_SELECTOR, "#verdict").text
    assert "deeper" in verdict and "within noise" in verdict  # the report's verdict column
    set_number(browser, "seed", 5)  # every run from the same noise: seed 5, not each run's own seed
    shown = generate(browser, 4)
    if os.environ.get("PIXELRUN_DEMO_SCREENSHOT"):  # the whole page, verdict table included
        page, chrome = browser.execute_script(
            "return [document.body.scrollHeight, window.outerHeight - window.innerHeight]"
        )
        browser.set_window_size(1400, page + chrome)
        browser.save_screenshot(os.environ["PIXELRUN_DEMO_SCREENSHOT"])
    overrides = settings(steps=2, guidance=2.0, guidance_mode="cfg", seed=5)  # the study's own, seed 5
    for image, (variant, seed) in zip(shown, runs):
        expected = sample(study / f"runs/{variant}/seed{seed}", tmp_path / f"{variant}{seed}", "ema", overrides)
        assert image.shape == expected.shape == (32, 32, 3)
        assert np.array_equal(image, expected), (variant, seed)
    assert len({im.tobytes() for im in shown}) == 4  # four models, four images
    assert tree(study) == before  # nothing written into the ablation's folder


def test_a_run_page_takes_every_setting_and_loads_each_model_once(browser, study, tmp_path):
    """The page served from this process, so that its loads can be counted: each weights once."""
    from selenium.webdriver.common.by import By

    from pixelrun.cli.demo_draw import Drawer, open_study
    from pixelrun.cli.demo_page import serve

    run = study / "runs/deeper/seed1"
    before = tree(run)
    drawer = Drawer(open_study(run), "cpu")
    server = serve(drawer, free_port())
    try:
        open_page(browser, server.url)
        assert choices(browser, "mode") == ["cfg", "none"]  # no self-guidance: trained without routing
        assert choices(browser, "sampler") == ["euler", "heun"] and choices(browser, "weights") == ["ema", "raw"]
        for steps, guidance, mode, seed, weights in ((3, 1.5, "cfg", 7, "raw"), (4, 2.5, "none", 11, "ema")):
            set_number(browser, "steps", steps)
            set_number(browser, "guidance", guidance)
            choose(browser, "mode", mode)
            set_number(browser, "seed", seed)
            choose(browser, "weights", weights)
            [image] = generate(browser, 1)
            overrides = settings(steps=steps, guidance=guidance, guidance_mode=mode, seed=seed)
            assert np.array_equal(image, sample(run, tmp_path / f"{weights}{seed}", weights, overrides))
        generate(browser, 1, prompt="a green triangle")  # ema again: loaded already
        set_number(browser, "guidance", 0.5)  # below 1 with cfg: refused by the config, nothing drawn
        choose(browser, "mode", "cfg")
        line = " ".join(press_generate(browser, PROMPT).split())
        assert line.startswith("Not drawn: sample.guidance: must be >= 1"), line
        assert not browser.find_elements(By.CSS_SELECTOR, "[id^=image-] img")
    finally:
        server.close()
    assert drawer.loads == [("seed1", "raw"), ("seed1", "ema")]
    assert drawer.drawings == 3
    assert tree(run) == before


def test_an_ablation_none_of_whose_runs_has_a_checkpoint_is_one_line(study, tmp_path, capsys):
    shutil.copy(study / "ablation.json", tmp_path / "ablation.json")  # planned, nothing trained
    assert main(["demo", str(tmp_path)]) == 2
    one_line_error(capsys, "pixelrun: config error: FOLDER:", "none of whose runs has a checkpoint yet")


def test_without_gradio_the_command_says_which_extra_in_one_line(study, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed: importing it raises ImportError
    assert main(["demo", str(study / "runs/baseline/seed0")]) == 2
    one_line_error(capsys, "'gradio'", "not installed", "pip install 'pixelrun[demo]'")


def test_a_missing_browser_skips_but_fails_where_required(monkeypatch):
    monkeypatch.delenv("PIXELRUN_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no chromium"):
        need(False, "no chromium")
    monkeypatch.setenv("PIXELRUN_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="no chromium .*may not be skipped"):
        need(False, "no chromium")
    need(True, "no chromium")  # present: nothing
