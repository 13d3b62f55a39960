"""Load a run config: preset, then a YAML/JSON file, then ``a.b=value`` overrides, in that order."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from megatron_seed.config.presets import run_preset
from megatron_seed.config.schema import ConfigError, RunConfig


def load_config(path: Optional[str] = None, overrides: Iterable[str] = (), preset: Optional[str] = None) -> RunConfig:
    """``preset`` (or the file's ``preset:`` key, default ``tiny``), updated by the file, then overrides."""
    raw = read_config_file(path)
    if "stages" in raw:
        # A staged file is several runs; reading it as one would silently drop all but the base.
        raise ConfigError(f"config file {path} lists stages: run it with python -m megatron_seed.pretrain "
                          "(megatron_seed.training.stages), or remove the stages: key")
    return config_from_dict(raw, overrides, preset)


def read_config_file(path: Optional[str]) -> dict[str, Any]:
    """The top-level mapping of a YAML/JSON config file ({} without a path)."""
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = file.read_text()
    try:
        raw = (json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)) or {}
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    return raw


def config_from_dict(raw: dict[str, Any], overrides: Iterable[str] = (), preset: Optional[str] = None) -> RunConfig:
    """What :func:`load_config` does once the file is read: preset, ``raw``, then overrides."""
    raw = dict(raw)
    overrides = list(overrides)
    for item in overrides:
        if item.startswith("preset="):
            preset = item.split("=", 1)[1]
    config = run_preset(preset or raw.pop("preset", None) or "tiny")
    raw.pop("preset", None)
    _merge(config, raw, "")
    for item in overrides:
        if item.startswith("preset="):
            continue
        key, value = _parse_override(item)
        _set_path(config, key, value)
    return config


def apply_settings(config: RunConfig, settings: dict[str, Any]) -> None:
    """Set already-parsed values by dotted key (``{"train.steps": 100}``; nested mappings such as
    ``{"train": {"steps": 100}}`` mean the same), type-checked like overrides."""
    for key, value in settings.items():
        if isinstance(value, dict):
            apply_settings(config, {f"{key}.{sub}": v for sub, v in value.items()})
        else:
            _set_path(config, str(key), value)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. train.steps=20)")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_path(config: Any, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    target = config
    for i, part in enumerate(parents):
        if not dataclasses.is_dataclass(target) or part not in _field_names(target):
            raise ConfigError(f"unknown config key {'.'.join(parents[:i + 1])!r} in override {dotted}")
        target = getattr(target, part)
    if not dataclasses.is_dataclass(target) or leaf not in _field_names(target):
        known = ", ".join(sorted(_field_names(target))) if dataclasses.is_dataclass(target) else ""
        raise ConfigError(f"unknown config key {dotted!r}; known keys here: {known}")
    setattr(target, leaf, _coerce(target, leaf, value, dotted))


def _merge(config: Any, raw: dict, prefix: str) -> None:
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in _field_names(config):
            raise ConfigError(f"unknown config key {dotted!r}; known: {', '.join(sorted(_field_names(config)))}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _merge(current, value, dotted + ".")
        else:
            setattr(config, key, _coerce(config, key, value, dotted))


def _field_names(obj: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)}


def _coerce(obj: Any, name: str, value: Any, dotted: str) -> Any:
    """Check the value against the field's annotation; convert ints to floats and scalars to lists."""
    hints = typing.get_type_hints(type(obj))
    hint = hints[name]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    allowed = args if origin is typing.Union else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{dotted} cannot be null")
    for option in allowed:
        o = typing.get_origin(option) or option
        if o is typing.Literal:
            if value in typing.get_args(option):
                return value
            continue
        if o is list:
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        if o is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if o is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if o is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if o is bool and isinstance(value, bool):
            return value
        if o is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{dotted}={value!r} does not fit type {hint}")


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)
