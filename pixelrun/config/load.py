"""Where a Config comes from: a YAML file, dotted `key=value` overrides, a saved tree (a checkpoint's),
each built into the typed tree (unknown keys and wrong types are errors naming the key) and
validated; and back out to YAML.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

from pixelrun.config.errors import ConfigError
from pixelrun.config.schema import MOVED_KEYS, Config, _build, to_dict
from pixelrun.config.validate import validate


def _set_dotted(tree: dict, dotted: str, value):
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, "is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    seen: set[str] = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "overrides are written key=value (for example train.steps=100)")
        key, raw = item.split("=", 1)
        if key.strip() in seen:  # e.g. an unquoted data.path={0..9}.tar that the shell expanded into several
            raise ConfigError(
                key.strip(),
                "given twice on the command line (quote a value that the shell could "
                "expand: data.path='shards/{00000..00009}.tar')",
            )
        seen.add(key.strip())
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error: PyYAML keeps
    the last one silently, and the first is usually the one the user meant to edit."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key != "<<" and key in seen:
                raise _DuplicateKey(
                    f"the key {key!r} is given twice in one section (line {key_node.start_mark.line + 1})"
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str):
    """YAML text read as `--config` is: a key written twice in one mapping is a yaml.YAMLError naming
    it and its line (for other YAML files of pixelrun's: an ablation SPEC)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("--config", f"no such file: {p}")
        try:
            data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except UnicodeDecodeError:
            raise ConfigError("--config", f"{p} is not a text file (not UTF-8); give a YAML config") from None
        except OSError as e:
            raise ConfigError("--config", f"cannot read {p}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError("--config", f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if data is None or data == {}:
            raise ConfigError(
                "--config",
                f"{p} holds no keys (empty, or only comments): it would train on every default; give the keys "
                "to change, or leave --config out to train on the defaults",
            )
        if not isinstance(data, dict):
            raise ConfigError(
                "--config",
                f"{p} must hold a mapping of sections (run:, model:, train:, ...); it holds a {type(data).__name__}",
            )
    data = _merge(move_old_keys(data), move_old_keys(parse_overrides(list(overrides))))
    return config_from_dict(data)


def with_overrides(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A config from a saved tree (a checkpoint's) with dotted `key=value` overrides applied."""
    return config_from_dict(
        _merge(move_old_keys(_saved_defaults(data)), move_old_keys(parse_overrides(list(overrides))))
    )


def _saved_defaults(data: dict) -> dict:
    """A saved tree written before text.precision existed encoded its captions in fp32: it keeps
    doing so, so its samples are those it was trained for (the key's default is auto)."""
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, dict) or "precision" in text:
        return data
    return {**data, "text": {**text, "precision": "fp32"}}


_announced: set[str] = set()


def move_old_keys(data: dict) -> dict:
    """`data` with the keys that left `train` in the split by concern (schema.MOVED_KEYS) at their
    new place, saying so once per process in one line: a config or run folder written before the
    split loads and resumes as it did. An old and a new key given together is an error naming both."""
    train = data.get("train") if isinstance(data, dict) else None
    old = [k for k in MOVED_KEYS if isinstance(train, dict) and k.split(".", 1)[1] in train]
    if not old:
        return data
    data = copy.deepcopy(data)
    for key in old:
        section, name = MOVED_KEYS[key].split(".")
        target = data.get(section)
        if not isinstance(target, dict):  # absent, or an empty `optimizer:` line in YAML (None)
            data[section] = target = {}
        if name in target:
            raise ConfigError(
                key, f"and {MOVED_KEYS[key]} are both given: {key} is the old name; keep {MOVED_KEYS[key]}"
            )
        target[name] = data["train"].pop(key.split(".", 1)[1])
    new = [k for k in old if k not in _announced]
    if new:
        _announced.update(new)
        moves = ", ".join(f"{k} -> {MOVED_KEYS[k]}" for k in new)
        print(f"pixelrun: note: renamed config keys, loaded under their new names: {moves}", file=sys.stderr)
    return data


def config_from_dict(data: dict) -> Config:
    data = move_old_keys(data)
    cfg = _build(Config, data)
    if cfg.stages:  # the run is as long as its stages
        total = sum(st.steps for st in cfg.stages)
        given = (data.get("train") or {}).get("steps")
        if given is not None and given != total:
            raise ConfigError(
                "train.steps", f"is {given} but the stages add up to {total} steps: leave it out or set it to their sum"
            )
        cfg.train.steps = total
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
