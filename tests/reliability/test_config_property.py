"""Property: any configuration value either validates or raises ConfigError naming the field;
never another exception (which the CLI would show as a traceback)."""

from __future__ import annotations

import re
from typing import Any

import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from sae_core.config import PipelineConfig, build_config, load_config
from sae_core.errors import ConfigError


def field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every section and leaf of the configuration, dotted: sae, sae.k, ..."""
    paths = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            paths += field_paths(info.annotation, f"{path}.")
    return paths


PATHS = field_paths(PipelineConfig)
# Keys the override syntax accepts, known or not (unknown ones must be named too).
KEYS = st.sampled_from(PATHS) | st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8}){0,2}", fullmatch=True)
TEXT = st.text(
    st.characters(exclude_categories=("Cs",)), max_size=40
)  # YAML cannot hold surrogates
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | TEXT
)
# No example database: it would be written into the working tree.
THOROUGH = settings(max_examples=300, deadline=None, database=None)
QUICK = settings(max_examples=100, deadline=None, database=None)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


def names(message: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z_]){re.escape(word)}(?![A-Za-z_])", message) is not None


def assert_names_the_field(err: ConfigError, key: str) -> None:
    """The message names the override's section, and the field itself when it exists (an
    unknown key is named down to its first unknown part)."""
    message = str(err)
    parts = key.split(".")
    assert names(message, parts[0]), (key, message)
    if key in PATHS:
        assert names(message, parts[-1]), (key, message)


def validates_or_names(key: str, value_text: str) -> None:
    try:
        build_config({}, [f"{key}={value_text}"])
    except ConfigError as err:
        assert_names_the_field(err, key)


@THOROUGH
@given(key=KEYS, value=VALUES)
@example(key="sweep.k", value=[5000])
@example(key="sae.n_latents", value=3)
def test_any_value_validates_or_names_its_field(key: str, value: Any) -> None:
    validates_or_names(key, yaml.safe_dump(value, default_flow_style=True))


@THOROUGH
@given(key=KEYS, raw=TEXT)
@example(key="sae.k", raw="!!int abc")  # PyYAML raises ValueError, not YAMLError, for these
@example(key="train.lr", raw="!!float x")
@example(key="data.seed", raw="!!timestamp abc")
@example(key="sae.multi_topk", raw="!!bool maybe")
@example(key="sweep.k", raw="&a [*a]")
def test_any_override_text_validates_or_names_its_field(key: str, raw: str) -> None:
    validates_or_names(key, raw)


@QUICK
@given(text=TEXT)
def test_any_override_syntax_is_parsed_or_refused(text: str) -> None:
    try:
        build_config({}, [text])
    except ConfigError as err:
        assert str(err).startswith(("--set", "config error:")), str(err)


@QUICK
@given(body=TEXT | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
@example(body="sae: {k: !!int abc}")
def test_any_preset_file_loads_or_is_refused(body: str, tmp_path_factory) -> None:
    preset = tmp_path_factory.getbasetemp() / "any.yaml"
    preset.write_text(body, encoding="latin-1", errors="replace")  # not always UTF-8
    try:
        load_config(str(preset))
    except ConfigError as err:
        assert str(err).startswith(("preset", "config error:")), str(err)
