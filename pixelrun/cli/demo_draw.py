"""What `pixelrun demo` draws, apart from its page (cli/demo_page.py): FOLDER opened as a run or an
ablation (`open_study`), the settings as `pixelrun sample`'s overrides (`Settings`), the choices the
page offers (each from what the config accepts, so that a new sample.sampler or weights plugs in
here), and the models, each loaded once per weights and drawn with `generate` (`Drawer`).

An image drawn here is `pixelrun sample`'s for the same settings, bit for bit: the settings become
the same `sample.*` overrides of the checkpoint's own config, the checkpoint is opened, verified and
loaded by the same functions (pixelrun/infra/inference.py) and drawn by the same `generate`
(pixelrun/diffusion/generate.py). Nothing is written into FOLDER."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pixelrun.config import Config, ConfigError, with_overrides

if TYPE_CHECKING:
    from pixelrun.infra.checkpoint_verify import ReadChoice

SAMPLER_CANDIDATES = ("euler", "heun")  # the names a sample.sampler key may take, when the config has one
NEITHER = (
    "is neither a run (no checkpoint in it: a `pixelrun train` folder, one of its checkpoints/step_* or a "
    "`pixelrun export` folder) nor an ablation (no ablation.json: a `pixelrun ablate` folder)"
)


# ----------------------------------------------------------------------------- the folder


@dataclass
class Entry:
    """One checkpoint on the page: a run's, or one (variant, seed) of an ablation."""

    label: str
    checkpoint: ReadChoice  # as opened: verified once, loaded from that
    variant: str = ""
    seed: int | None = None


@dataclass
class Study:
    kind: str  # run | ablation
    folder: Path
    entries: list[Entry]
    verdict: str = ""  # an ablation's verdict table, as Markdown
    notes: list[str] = field(default_factory=list)  # runs left out and checkpoints skipped, one line each


def open_study(folder: Path) -> Study:
    """FOLDER as a run or an ablation, every checkpoint opened and verified; anything else refused
    in one line (ConfigError naming FOLDER), before any model is loaded."""
    if not folder.is_dir():
        raise ConfigError("FOLDER", f"{folder} is not a folder: give a run folder or an ablation folder")
    if (folder / "ablation.json").is_file():
        return _open_ablation(folder)
    from pixelrun.infra import checkpoint as ckpt

    if not (ckpt.is_complete(folder) or (folder / ckpt.EXPORT_FILE).is_file() or ckpt.list_checkpoints(folder)):
        raise ConfigError("FOLDER", f"{folder} {NEITHER}")
    notes: list[str] = []
    entry = Entry(folder.resolve().name, _open(folder, notes.append))
    return Study("run", folder, [entry], notes=notes)


def _open(folder: Path, say):
    """The checkpoint of a run folder, verified (`ReadChoice`); its refusal names FOLDER."""
    from pixelrun.infra.inference import open_checkpoint

    try:
        return open_checkpoint(folder, say)
    except ConfigError as e:
        raise ConfigError("FOLDER", str(e).removeprefix(f"{e.key}: ")) from None


def _open_ablation(folder: Path) -> Study:
    from pixelrun.experiments.folders import read_plan
    from pixelrun.infra.records import RecordError

    try:
        plan = read_plan(folder)
    except RecordError as e:  # a damaged ablation.json: its one line, as a bad FOLDER
        raise ConfigError("FOLDER", str(e)) from None
    entries: list[Entry] = []
    notes: list[str] = []
    for r in plan.runs:
        try:
            choice = _open(folder / r.dir, notes.append)
        except (ConfigError, FileNotFoundError) as e:
            notes.append(f"{r.variant} seed {r.seed} left out: {str(e).removeprefix('FOLDER: ')}")
            continue
        entries.append(Entry(f"{r.variant} · seed {r.seed}", choice, r.variant, r.seed))
    if not entries:
        raise ConfigError("FOLDER", f"{folder} is an ablation none of whose runs has a checkpoint yet")
    return Study("ablation", folder, entries, verdict=verdict_table(folder), notes=notes)


def verdict_table(folder: Path) -> str:
    """The head of the ablation's report (its budget and protocol lines, the main table with each
    variant's verdicts and the validation losses) as Markdown, from its summary.json; a line saying
    how to make one when the study has no report yet."""
    import json

    from pixelrun.experiments.render import ablation_blocks, render_markdown

    path = folder / "summary.json"
    if not path.is_file():
        return f"No report yet ({path.name} is missing): `pixelrun ablate report {folder}` writes it."
    try:
        blocks = ablation_blocks(json.loads(path.read_text()), {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path} cannot be read as a report ({type(e).__name__}: {e}); `pixelrun ablate report {folder}`"
    # the budget, the protocol, the warnings, the main table and the validation losses: the first other
    # section ends it
    kept = ("Validation", "Warnings")
    end = next((i for i, b in enumerate(blocks) if b[0] == "h2" and not b[1].startswith(kept)), len(blocks))
    return render_markdown([b for b in blocks[:end] if b[0] != "h1"], folder)


# ----------------------------------------------------------------------------- the settings


@dataclass(frozen=True)
class Settings:
    """What the page asks: each a `pixelrun sample` override or flag."""

    steps: int
    guidance: float
    guidance_mode: str
    seed: int
    weights: str = "ema"
    sampler: str = "euler"

    def overrides(self) -> list[str]:
        """The `sample.*` overrides `pixelrun sample` takes for these settings (the same strings)."""
        out = [
            f"sample.steps={self.steps}",
            f"sample.guidance={self.guidance}",
            f"sample.guidance_mode={self.guidance_mode}",
            f"sample.seed={self.seed}",
        ]
        if has_sampler_key():
            out.append(f"sample.sampler={self.sampler}")
        return out


def has_sampler_key() -> bool:
    from pixelrun.config.schema import SampleConfig

    return "sampler" in {f.name for f in dataclasses.fields(SampleConfig)}


def valid(saved: dict, overrides: list[str]) -> bool:
    try:
        with_overrides(saved, overrides)
    except ConfigError:
        return False
    return True


def sampler_choices(saved: list[dict]) -> list[str]:
    """The samplers every model of the page accepts: Euler alone while the config has no
    sample.sampler key (pixelrun/diffusion/sampling.py's one sampler); else each candidate name its
    validation accepts."""
    if not has_sampler_key():
        return ["euler"]
    return [s for s in SAMPLER_CANDIDATES if all(valid(d, [f"sample.sampler={s}"]) for d in saved)]


def guidance_mode_choices(saved: list[dict]) -> list[str]:
    """cfg, self, none: those every model of the page accepts (self needs a model trained with routing)."""
    from pixelrun.config.rules import GUIDANCE_MODES

    return [m for m in GUIDANCE_MODES if all(valid(d, [f"sample.guidance_mode={m}"]) for d in saved)]


def weight_choices(entries: list[Entry]) -> list[str]:
    """The weights `--weights` loads: ema and raw from a checkpoint; an export holds one set."""
    from pixelrun.infra import checkpoint as ckpt

    if all((e.checkpoint.path / ckpt.EXPORT_FILE).is_file() for e in entries):
        return ["ema"]
    return ["ema", "raw"]


# ----------------------------------------------------------------------------- drawing


class Drawer:
    """The study's models, each loaded once per weights on first use and kept; `draw` gives one image
    per entry, all from the same settings (so the same noise)."""

    def __init__(self, study: Study, device: str = "auto"):
        from pixelrun.infra import checkpoint as ckpt
        from pixelrun.infra.distributed import resolve_device

        self.study = study
        self.device = resolve_device(device, "--device")
        self.saved = [ckpt.saved_config(e.checkpoint.path)[0] for e in study.entries]
        self.loaded: dict[tuple[int, str], tuple] = {}
        self.loads: list[tuple[str, str]] = []  # (label, weights) of every load, in order
        self.lock = threading.Lock()  # one drawing at a time: the models are shared between page sessions
        self.drawings = 0  # drawings made, numbered on the page: the same images twice still read as new

    def defaults(self) -> Settings:
        """The first model's own sample.* settings: what `pixelrun sample` draws without overrides."""
        s = with_overrides(self.saved[0]).sample
        return Settings(s.steps, s.guidance, s.guidance_mode, s.seed)

    def config(self, index: int, settings: Settings, saved: dict | None = None) -> Config:
        """The entry's config as `pixelrun sample` makes it: the checkpoint's own, with the overrides."""
        return with_overrides(self.saved[index] if saved is None else saved, settings.overrides())

    def model(self, index: int, weights: str) -> tuple:
        """(model, text encoder, the saved config of the checkpoint they came from), loaded once: the
        checkpoint opened, or the next older one where these weights cannot be read (as `pixelrun
        sample` falls back, saying so)."""
        key = (index, weights)
        if key not in self.loaded:
            from pixelrun.infra import checkpoint as ckpt
            from pixelrun.infra.inference import load_for_inference

            entry = self.study.entries[index]
            model, encoder, _, path = load_for_inference(entry.checkpoint, weights, str(self.device))
            encoder.warn = lambda message: None  # the page says it, under the images
            self.loaded[key] = (model, encoder, ckpt.saved_config(path)[0])
            self.loads.append((entry.label, weights))
        return self.loaded[key]

    def draw(self, prompt: str, settings: Settings) -> tuple[list, list[str]]:
        """(one uint8 [H, W, 3] image per entry, notes): every entry's config checked before any is
        drawn (a ConfigError names the key)."""
        from pixelrun.diffusion.generate import generate

        for i in range(len(self.study.entries)):
            self.config(i, settings)
        images: list = []
        notes: list[str] = []
        with self.lock:
            for i in range(len(self.study.entries)):
                model, encoder, saved = self.model(i, settings.weights)
                cfg = self.config(i, settings, saved)
                before = encoder.truncated
                side = cfg.data.resolution
                image = generate(
                    model, encoder, [prompt], cfg, next(model.parameters()).device, seed=cfg.sample.seed,
                    height=side, width=side,
                )[0]  # fmt: skip
                images.append(image)
                if encoder.truncated > before and not notes:
                    notes.append(
                        f"The prompt is longer than text.max_tokens={cfg.text.max_tokens} tokens: "
                        "the model saw only its start."
                    )
            self.drawings += 1
        return images, notes
