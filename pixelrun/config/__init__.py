"""One typed config tree. YAML files plus dotted `key=value` overrides; unknown keys are errors.
Every error names the dotted key, so the CLI can print one line and exit with code 2.

The modules, each importing only those listed before it:

- ``errors``: ConfigError (a bad value, named by its key) and RunFailed (work that cannot go on).
- ``rules``: what validation checks against, as data and pure functions: the model presets, the
  names of sources, samplers and metrics, the TREAD span rule, the aspect buckets, the caption grammar.
- ``schema``: the dataclasses, one per section, whose defaults are the built-in default run; and the
  conversion between a plain mapping and the typed tree.
- ``derived``: values computed from a Config (the architecture, the routed span, the batch split,
  the stage plan, the REPA projector, what a resume may change).
- ``validate``: ``validate(cfg)``, one function per section.
- ``load``: a validated Config from YAML, overrides or a saved tree; and back to YAML.
- ``reference``: generates docs/configuration.md from ``schema``'s dataclasses and their comments.

The rest of pixelrun imports these names from ``pixelrun.config``.
"""

from __future__ import annotations

from pixelrun.config.derived import (
    batch_split,
    ema_decays,
    image_sizes,
    model_fields,
    repa_block,
    repa_hidden,
    resume_changes,
    routing_span,
    stage_plan,
)
from pixelrun.config.errors import ConfigError, RunFailed
from pixelrun.config.load import config_from_dict, load_config, to_yaml, with_overrides
from pixelrun.config.rules import (
    DATA_SOURCES,
    GUIDANCE_MODES,
    METRICS,
    PRESETS,
    SAMPLERS,
    SPACINGS,
    aspect_buckets,
    parse_captions,
    parse_weights,
    span_for_depth,
)
from pixelrun.config.schema import Config, EvalConfig, SampleConfig, TextConfig, to_dict

__all__ = [
    "DATA_SOURCES",
    "GUIDANCE_MODES",
    "METRICS",
    "PRESETS",
    "SAMPLERS",
    "SPACINGS",
    "Config",
    "ConfigError",
    "RunFailed",
    "EvalConfig",
    "SampleConfig",
    "TextConfig",
    "aspect_buckets",
    "batch_split",
    "config_from_dict",
    "ema_decays",
    "image_sizes",
    "load_config",
    "model_fields",
    "parse_captions",
    "parse_weights",
    "repa_block",
    "repa_hidden",
    "resume_changes",
    "routing_span",
    "span_for_depth",
    "stage_plan",
    "to_dict",
    "to_yaml",
    "with_overrides",
]
