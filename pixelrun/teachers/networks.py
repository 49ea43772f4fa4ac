"""Which pretrained networks a config's training loads: its text encoder and the teachers a stage
turns on, each with the key that names it. One list for the start-up preflight
(pixelrun/run/preflight.py, which adds the metric networks) and the projection's stand-ins
(pixelrun/tools/forecast.py), so both name the same networks by the same keys."""

from __future__ import annotations

from pixelrun.config import Config, stage_plan
from pixelrun.teachers.features import EFFICIENTNET_SPECS

#: text.encoder values installed with pixelrun (pixelrun/model/text.py), never a folder or hub id
TEXT_ALIASES = ("minilm",)


def training_networks(cfg: Config) -> list[tuple[str, str]]:
    """(key, spec) of every model folder or Hugging Face id the training of `cfg` loads; the
    offline EfficientNet stand-ins, which install with pixelrun, are left out."""
    every = [c for _, _, c in stage_plan(cfg)]
    out = [] if cfg.text.encoder in TEXT_ALIASES else [("text.encoder", cfg.text.encoder)]
    if any(c.repa.weight > 0 for c in every):
        out.append(("repa.teacher", cfg.repa.teacher))
    if any(c.perceptual.dino_weight > 0 for c in every):
        out.append(("perceptual.dino_teacher", cfg.perceptual.dino_teacher))
    return [(k, v) for k, v in out if v and v not in EFFICIENTNET_SPECS]
