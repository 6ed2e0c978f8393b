"""A `PipelineConfig` from a YAML preset (by name or path) and `--set key.path=value` overrides;
validation errors as one line per field."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sae_core.config.pipeline import PipelineConfig
from sae_core.errors import ConfigError
from sae_core.yaml_files import YAML_FAILURES, read_yaml

# Package data: a preset is found by name wherever saeflow is installed.
PRESET_DIR = Path(str(resources.files("sae_core") / "presets"))


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`sae.k=64` -> ("sae.k", 64); the value is read as YAML so numbers and booleans type."""
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[a-z_]+(\.[a-z_]+)*", key.strip()):
        raise ConfigError(f"--set '{text}': expected key.path=value, e.g. --set sae.k=64")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except RecursionError:
        raise ConfigError(
            f"--set {key.strip()}: the value is nested too deeply to read; give a flat value"
        ) from None
    except YAML_FAILURES:  # e.g. `!!int abc`: the text itself
        value = raw
    return key.strip(), value


def format_validation_error(err: ValidationError) -> str:
    """One line per failed field: `config error: sae.k: <why>`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against `saeflow config` (the resolved configuration)"
        lines.append(f"config error: {loc}: {msg}")
    return "\n".join(lines)


def build_config(
    data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    tree = yaml.safe_load(yaml.safe_dump(data)) or {}
    for text in overrides:
        _set_path(tree, *parse_override(text))
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(
    preset: str = "demo", overrides: list[str] | tuple[str, ...] = (), store: str | None = None
) -> PipelineConfig:
    """A preset by name (sae_core/presets/NAME.yaml) or a path to a YAML file, plus overrides."""
    path = Path(preset)
    if not path.suffix:
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown preset '{preset}': choose one of {', '.join(available_presets())} "
            "or give a path to a YAML file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"preset {path}: not UTF-8 text (at byte {err.start}); give a YAML file"
        ) from None
    data = read_yaml(text, f"preset {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path}: expected a mapping of sections at the top level")
    overrides = list(overrides)
    if store is not None and not store.strip():
        raise ConfigError(
            f"--store {store!r}: empty; give a directory or s3://bucket/prefix, or leave "
            "--store out for the default store"
        )
    if store is not None:
        overrides.append(f"store={store}")
    return build_config(data, overrides)
