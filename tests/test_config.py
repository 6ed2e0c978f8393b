import pytest
from pydantic import ValidationError

from sae_core.config import (
    PipelineConfig,
    available_presets,
    build_config,
    load_config,
    parse_override,
)
from sae_core.errors import ConfigError


def test_demo_preset_loads_with_issue_values():
    cfg = load_config("demo")
    assert cfg.model.hook == "resid_post.15"
    assert (cfg.sae.n_latents, cfg.sae.k) == (4608, 32)
    assert (cfg.data.train_tokens, cfg.data.eval_tokens, cfg.data.context_len) == (2**17, 2**13, 64)


def test_overrides_type_values_from_yaml():
    cfg = load_config("demo", ["sae.k=64", "data.skip_first_position=false", "train.lr=1e-3"])
    assert cfg.sae.k == 64 and cfg.data.skip_first_position is False and cfg.train.lr == 1e-3


def test_store_option_sets_store():
    assert load_config("demo", store="s3://bucket/prefix").store == "s3://bucket/prefix"


@pytest.mark.parametrize(
    "override, field",
    [
        ("sae.kk=3", "sae.kk"),
        ("sae.k=99999", "sae"),
        ("train.batch_size=-1", "train.batch_size"),
        ("data.context_len=abc", "data.context_len"),
        ("model.hook=layer15", "model.hook"),
        ("model.dtype=float8", "model.dtype"),
        ("registry.model_name=../evil", "registry.model_name"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    message = str(err.value)
    assert message.startswith(f"config error: {field}")
    assert "\n" not in message


def test_k_greater_than_n_says_the_fix():
    with pytest.raises(ConfigError, match="choose k <= n_latents"):
        build_config({"sae": {"n_latents": 8, "k": 9}})


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        load_config("nope")
    assert "demo" in str(err.value) and "nope" in str(err.value)
    assert "demo" in available_presets()


def test_malformed_override_is_refused():
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("no-equals-sign")


def test_section_used_as_value_is_refused():
    with pytest.raises(ConfigError, match="is a value"):
        load_config("demo", ["name.x=1"])


def test_configs_are_immutable():
    cfg = PipelineConfig()
    with pytest.raises(ValidationError):
        cfg.sae.k = 3  # type: ignore[misc]
