"""Bad input through the CLI: one clear line naming the field or resource, exit code 2, no traceback."""

from __future__ import annotations

import pytest

from tests.helpers.cli import assert_one_line_error, invoke


@pytest.fixture
def tiny_args(tiny_llama_dir, tiny_corpus_dir, tmp_path):
    return [
        "--set", f"model.path={tiny_llama_dir}",
        "--set", "model.hook=resid_post.2",
        "--set", f"data.corpus={tiny_corpus_dir}",
        "--store", str(tmp_path / "store"),
    ]  # fmt: skip


def test_unknown_preset():
    assert_one_line_error(invoke("run", "--preset", "nightly"), "unknown preset 'nightly'", "demo")


def test_unknown_config_key():
    assert_one_line_error(invoke("run", "--set", "sae.kk=3"), "sae.kk", "unknown key")


def test_k_greater_than_n():
    assert_one_line_error(invoke("run", "--set", "sae.k=5000"), "sae.k=5000", "n_latents")


def test_hook_beyond_the_models_depth(tiny_args):
    result = invoke("run", *tiny_args, "--set", "model.hook=resid_post.9")
    assert_one_line_error(result, "model.hook", "4 layers")


def test_missing_corpus_path(tiny_args, tmp_path):
    result = invoke("run", *tiny_args, "--set", f"data.corpus={tmp_path / 'missing'}")
    assert_one_line_error(result, "data.corpus")


def test_missing_model_path(tiny_args, tmp_path):
    result = invoke("run", *tiny_args, "--set", f"model.path={tmp_path / 'no-model'}")
    assert_one_line_error(result, "model.path")


def test_unreachable_s3_endpoint(tiny_args):
    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    result = invoke("run", *tiny_args, "--store", "s3://bucket/prefix", env=env)
    assert_one_line_error(result, "http://127.0.0.1:9", "unreachable")


def test_bad_input_writes_nothing_to_the_store(tiny_args, tmp_path):
    invoke("run", *tiny_args, "--set", "model.hook=resid_post.9")
    assert not (tmp_path / "store").exists()


def test_config_command_prints_the_resolved_yaml():
    result = invoke("config", "--set", "sae.k=48")
    assert result.exit_code == 0
    assert "k: 48" in result.output and "hook: resid_post.15" in result.output


@pytest.mark.parametrize(
    "text",
    ["threads", "dask", "dask://", "dask://host", "dask://:8786", "dask://host:port",
     "tcp://127.0.0.1:8786", "dask://host:8786/path"],
)  # fmt: skip
@pytest.mark.parametrize("command", ["run", "sweep", "frontier"])
def test_runner_must_be_local_or_a_dask_scheduler(command, text, tiny_args):
    result = invoke(command, *tiny_args, "--runner", text)
    assert_one_line_error(result, f"--runner '{text}'", "'local' or 'dask://HOST:PORT'")


def test_dask_runner_needs_a_prefect_api_and_a_scheduler_that_answers(unused_port):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.runners import dask_address, task_runner
    from sae_core.errors import ConfigError

    assert dask_address("dask://10.0.0.7:8786") == "tcp://10.0.0.7:8786"
    assert dask_address("dask://[::1]:8786") == "tcp://[::1]:8786"
    assert dask_address("local") is None
    runner = f"dask://127.0.0.1:{unused_port}"
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(ConfigError, match=r"--runner dask://.*PREFECT_API_URL"):
            task_runner(runner)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        with pytest.raises(
            ConfigError, match=rf"no Dask scheduler answers at 127.0.0.1:{unused_port}"
        ):
            task_runner(runner)


def test_importing_the_cli_loads_no_heavy_module():
    import subprocess
    import sys

    heavy = ["torch", "pyarrow", "pandas", "prefect", "mlflow", "transformers",
             "great_expectations", "scipy", "matplotlib"]  # fmt: skip
    code = f"import sys, flows.cli; print([m for m in {heavy!r} if m in sys.modules])"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]", run.stdout
