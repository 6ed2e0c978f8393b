"""Every YAML file saeflow reads (presets, prefect.yaml): PyYAML's safe loader, a key given twice
refused, a value nested too deeply or text that is not YAML one ConfigError naming the file."""

from __future__ import annotations

from typing import Any

import yaml

from sae_core.errors import ConfigError


class DuplicateKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping repeating a key is an error: by default the
    last one silently wins (a second `sae:` section replaces the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`, then keys override it
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: construct_mapping below names it
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


# What PyYAML raises on malformed input besides YAMLError (`!!int abc` is a ValueError, ...),
# and RecursionError for a value nested thousands deep.
YAML_FAILURES = (yaml.YAMLError, ValueError, LookupError, AttributeError, RecursionError)


def read_yaml(text: str, source: str) -> Any:
    """YAML text that saeflow reads (a preset, prefect.yaml) as Python values; ConfigError
    naming `source` for a duplicate key, a value nested too deeply or text that is not YAML."""
    try:
        return _load_yaml(text)
    except yaml.constructor.ConstructorError as err:
        if err.problem and err.problem.startswith("duplicate key"):
            line = err.problem_mark.line + 1 if err.problem_mark else "?"
            raise ConfigError(f"{source}: {err.problem} (line {line}); keep one of them") from None
        raise ConfigError(f"{source}: not valid YAML ({err.__class__.__name__})") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to read; flatten it") from None
    except YAML_FAILURES as err:
        raise ConfigError(f"{source}: not valid YAML ({err.__class__.__name__})") from None


def _load_yaml(text: str) -> Any:
    """What yaml.load does, with DuplicateKeyLoader (a SafeLoader)."""
    loader = DuplicateKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
