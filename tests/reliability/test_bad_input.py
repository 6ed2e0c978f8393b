"""Malformed input through the real CLI: each is refused in one `error:` line that names the
field and the fix, exit code 2, no traceback, and nothing is written to the store or registry.

The cases are refused by the configuration or by the preflight checks, before Prefect or any
model weights load, so the whole table runs in seconds."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.helpers.tiny_models import build_tiny_llama, build_tokenizer
from tests.reliability.conftest import Workspace, error_line


class Case(NamedTuple):
    args: list[str]  # after `run --preset ... --store ...`; {files} is the bad-files folder
    field: str  # what the message must name
    fix: str  # and the remedy it must give
    env: dict[str, str] = {}


def sets(*overrides: str) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


CASES = {
    # wrong types
    "int-as-text": Case(sets("sae.k=abc"), "sae.k", "should be a valid integer"),
    "bool-as-text": Case(sets("data.skip_first_position=maybe"), "data.skip_first_position", "should be a valid boolean"),
    "section-as-number": Case(sets("sae=5"), "sae", "should be a valid dictionary"),
    "list-as-number": Case(sets("sweep.k=7"), "sweep.k", "should be a valid list"),
    # negative, zero and non-finite sizes
    "negative-latents": Case(sets("sae.n_latents=-5"), "sae.n_latents", "greater than or equal to 1"),
    "negative-tokens": Case(sets("data.train_tokens=-1"), "data.train_tokens", "greater than or equal to 1"),
    "zero-batch": Case(sets("train.batch_size=0"), "train.batch_size", "greater than or equal to 1"),
    "negative-lr": Case(sets("train.lr=-0.001"), "train.lr", "greater than 0"),
    "nan-lr": Case(sets("train.lr=.nan"), "train.lr", "should be a finite number"),
    "inf-norm-filter": Case(sets("data.max_norm=.inf"), "data.max_norm", "should be a finite number"),
    "ema-decay-above-one": Case(sets("train.ema_decay=1.5"), "train.ema_decay", "less than 1"),
    # impossible combinations
    "k-over-n": Case(sets("sae.k=300"), "sae.k=300", "choose k <= n_latents"),
    "multi-topk-4k-over-n": Case(sets("sae.multi_topk=true", "sae.k=100"), "sae.multi_topk", "lower sae.k"),
    "expander-field-on-topk": Case(sets("sae.degree=4"), "sae.degree", "set sae.kind=expander"),
    # unknown names
    "unknown-key": Case(sets("sae.kk=3"), "sae.kk", "unknown key; check the spelling"),
    "unknown-section": Case(sets("optimizer.lr=0.1"), "optimizer", "unknown key; check the spelling"),
    "unknown-dtype": Case(sets("model.dtype=int8"), "model.dtype", "should be 'auto', 'float32' or 'bfloat16'"),
    "unknown-preset": Case(["--preset", "nosuch"], "unknown preset 'nosuch'", "choose one of"),
    "override-syntax": Case(["--set", "sae.k"], "--set 'sae.k'", "expected key.path=value"),
    "preset-not-a-mapping": Case(["--preset", "{files}/list.yaml"], "list.yaml", "expected a mapping of sections"),
    # hooks
    "hook-without-layer": Case(sets("model.hook=resid_post"), "model.hook", "should match pattern"),
    "unknown-hook-kind": Case(sets("model.hook=embed.1"), "model.hook 'embed.1'", "e.g. resid_post.15"),
    "hook-beyond-depth": Case(sets("model.hook=resid_post.9"), "model.hook 'resid_post.9'", "choose a layer in 0..3"),
    # models
    "unknown-model-path": Case(sets("model.path=/nonexistent/model"), "model.path", "give an HF model folder"),
    "uncached-hub-model": Case(sets("model.path=nobody/no-such-model"), "model.path 'nobody/no-such-model'", "give a local Hugging Face model folder"),
    "truncated-weights": Case(sets("model.path={files}/truncated-model"), "model.safetensors is damaged", "restore the model files"),
    "garbage-weights": Case(sets("model.path={files}/garbage-model"), "model.safetensors is damaged", "restore the model files"),
    "garbage-model-config": Case(sets("model.path={files}/bad-config-model"), "model.path", "give a local Hugging Face model folder"),
    "broken-tokenizer": Case(sets("model.path={files}/bad-tokenizer-model"), "its tokenizer does not load", "restore the tokenizer files"),
    "pickle-weights": Case(sets("model.path={files}/pickle-model"), "pytorch_model.bin", "convert the weights to safetensors"),
    # corpora
    "missing-corpus": Case(sets("data.corpus=/nonexistent/corpus.jsonl"), "data.corpus", "no such local file"),
    "empty-corpus-file": Case(sets("data.corpus={files}/empty/part.jsonl"), "data.corpus", "its files are empty"),
    "corpus-folder-without-text": Case(sets("data.corpus={files}/no-text"), "data.corpus", "folder holds no"),
    "non-utf8-corpus": Case(sets("data.corpus={files}/latin1.txt"), "latin1.txt is not UTF-8", "convert it"),
    "corpus-line-not-json": Case(sets("data.corpus={files}/broken.jsonl"), "broken.jsonl line 1 is not JSON", "fix the file"),
    "missing-text-column": Case(sets("data.text_column=body"), "data.text_column 'body'", "set data.text_column"),
    "unsupported-corpus-type": Case(sets("data.corpus={files}/corpus.csv"), "data.corpus", "unsupported file type"),
    # huge values
    "huge-context": Case(sets("data.context_len=100000"), "data.context_len", "less than or equal to 8192"),
    "context-beyond-positions": Case(sets("data.context_len=512"), "data.context_len=512", "choose data.context_len <= 256"),
    "ranks-not-splitting-batch": Case(sets("train.world_size=3"), "train.world_size=3", "a multiple of it"),
    "batch-beyond-data": Case(sets("train.batch_size=100000"), "train.batch_size=100000", "lower train.batch_size"),
    "latents-beyond-memory": Case(sets("sae.n_latents=1000000000000"), "sae.n_latents=1000000000000", "lower sae.n_latents"),
    "tokens-beyond-corpus": Case(sets("data.train_tokens=10000000000000"), "data.train_tokens", "lower data.train_tokens"),
    # path traversal in names
    "traversal-in-run-name": Case(sets("name=../../etc"), "name", "should match pattern"),
    "traversal-in-model-name": Case(sets("registry.model_name=../evil"), "registry.model_name", "should match pattern"),
    "space-in-alias": Case(sets("registry.alias=a b"), "registry.alias", "should match pattern"),
    # devices
    "unknown-device": Case(sets("train.device=tpu"), "train.device", "expected auto, cpu, cuda or cuda:N"),
    "absent-gpu": Case(sets("model.device=cuda:99"), "model.device", "use"),
    # stores
    "store-scheme": Case(["--store", "ftp://host/x"], "store 'ftp://host/x'", "use a local path or s3://bucket/prefix"),
    "store-under-a-file": Case(["--store", "{files}/corpus.csv/store"], "corpus.csv/store", "check the path exists and is writable"),
    "unreachable-s3": Case(
        ["--store", "s3://bucket/prefix"], "http://127.0.0.1:9", "start the server",
        {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
    ),
    "credentials-in-store-uri": Case(["--store", "s3://AKIAEXAMPLE:hunter2@bucket/p"], "credentials in the URI", "set AWS_ACCESS_KEY_ID"),
    # issue 28: accepted silently, a traceback, or a message naming the wrong thing
    "duplicate-section": Case(["--preset", "{files}/duplicate.yaml"], "duplicate.yaml: duplicate key 'sae'", "keep one"),
    "preset-nested-deep": Case(["--preset", "{files}/deep.yaml"], "deep.yaml", "nested too deeply"),
    "override-nested-deep": Case(sets("sae.k=" + "[" * 50_000), "--set sae.k", "nested too deeply"),
    "seed-beyond-64-bits": Case(sets("train.seed=36893488147419103232"), "train.seed", "less than or equal to 4294967295"),
    "k-aux-over-n": Case(sets("sae.k_aux=300"), "sae.k_aux=300", "choose sae.k_aux <= sae.n_latents"),
    "empty-store": Case(["--store", ""], "--store ''", "leave --store out"),
    "store-in-etc": Case(["--store", "file:///etc"], "store /etc", "system directory"),
    "store-under-usr": Case(["--store", "/usr/share/saeflow-store"], "store /usr/share/saeflow-store", "system directory"),
    "store-is-a-file": Case(["--store", "{files}/corpus.csv"], "corpus.csv", "not a directory"),
    "tiny-shards": Case(
        sets("data.corpus={files}/big.txt", "data.shard_rows=null", "data.shard_mb=1e-9", "data.context_len=2", "data.train_tokens=300000"),
        "data.shard_mb=1e-09", "raise data.shard_mb",
    ),
    "few-rows-per-shard": Case(sets("data.corpus={files}/big.txt", "data.shard_rows=1", "data.context_len=2", "data.train_tokens=300000"), "data.shard_rows=1", "raise data.shard_rows"),
    "whitespace-corpus": Case(sets("data.corpus={files}/blank.txt"), "blank.txt", "hold only whitespace"),
    "number-as-text": Case(sets("data.corpus={files}/numbers.jsonl"), "numbers.jsonl line 1: 'text' is a number", "make data.text_column"),
    "folder-with-one-broken-file": Case(sets("data.corpus={files}/one-broken"), "b.jsonl line 1 is not JSON", "fix the file"),
    "long-model-path": Case(sets("model.path=/" + "m" * 5000), "model.path", "give an HF model folder"),
    "fifo-corpus": Case(sets("data.corpus={files}/pipe.txt"), "pipe.txt", "not a regular file"),
    "device-corpus": Case(sets("data.corpus=/dev/zero"), "data.corpus '/dev/zero'", "not a regular file"),
    "gzip-named-txt": Case(sets("data.corpus={files}/packed.txt"), "packed.txt is gzip-compressed", "decompress it"),
    "vocabulary-beyond-embedding": Case(sets("model.path={files}/small-embedding-model"), "model.path", "vocabulary of 211 tokens exceeds"),
}  # fmt: skip


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory, tiny_llama_dir: Path) -> Path:
    """Damaged models and corpora, and a preset that is not a mapping."""
    root = tmp_path_factory.mktemp("bad-files")

    def model(name: str, damage: Callable[[Path], None]) -> None:
        folder = root / name
        shutil.copytree(tiny_llama_dir, folder)
        damage(folder)

    def truncate(folder: Path) -> None:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])

    def pickled(folder: Path) -> None:
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")

    model("truncated-model", truncate)
    model("garbage-model", lambda f: (f / "model.safetensors").write_bytes(b"\x80\x04junk" * 99))
    model("bad-config-model", lambda f: (f / "config.json").write_text("{not json"))
    model("bad-tokenizer-model", lambda f: (f / "tokenizer.json").write_text("{not json"))
    model("pickle-model", pickled)
    (root / "empty").mkdir()
    (root / "empty" / "part.jsonl").write_bytes(b"")
    (root / "no-text").mkdir()
    (root / "no-text" / "notes.md").write_text("no corpus here")
    (root / "latin1.txt").write_bytes(
        "Caf\u00e9 au lait, s'il vous pla\u00eet.\n".encode("latin-1")
    )
    (root / "broken.jsonl").write_text('{oops\n{"text": "fine"}\n')
    (root / "corpus.csv").write_text("text\nhello\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "duplicate.yaml").write_text("sae:\n  k: 8\nsae:\n  k: 4\n")
    (root / "deep.yaml").write_text("sae: " + "[" * 50_000)
    (root / "big.txt").write_text("the old dog saw a man . " * 100_000)
    (root / "blank.txt").write_text(" \n\t\n" * 50_000)
    (root / "numbers.jsonl").write_text('{"text": 5}\n' * 10_000)
    (root / "one-broken").mkdir()
    (root / "one-broken" / "a.jsonl").write_text('{"text": "fine words here"}\n' * 10_000)
    (root / "one-broken" / "b.jsonl").write_text('{oops\n{"text": "fine"}\n')
    os.mkfifo(root / "pipe.txt")
    (root / "packed.txt").write_bytes(gzip.compress(b"plain words " * 100_000))
    small = root / "small-embedding-model"
    build_tiny_llama(vocab_size=64).save_pretrained(small)
    build_tokenizer().save_pretrained(small)
    return root


def nothing_written(ws: Workspace) -> None:
    store = Path(ws.store)
    files = [p for p in store.rglob("*") if p.is_file()] if store.is_dir() else []
    assert files == [], files
    assert not (ws.home / "mlflow.db").exists()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_refused_in_one_line(case: Case, new_workspace, bad_files: Path) -> None:
    ws = new_workspace("ws")
    args = [arg.format(files=bad_files) for arg in case.args]
    result = ws.invoke(*ws.args(), *args, env=case.env)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert case.field.format(files=bad_files) in lines[0], lines[0]
    assert case.fix in lines[0], lines[0]
    assert "Traceback" not in result.output
    nothing_written(ws)


def test_the_case_table_covers_thirty_kinds_of_bad_input() -> None:
    assert len(CASES) >= 30


def test_a_secret_in_the_store_uri_is_not_echoed(new_workspace) -> None:
    ws = new_workspace("ws")
    result = ws.invoke(*ws.args(), "--store", "s3://AKIAEXAMPLE:hunter2@bucket/p")
    assert result.exit_code == 2 and "hunter2" not in result.output, result.output


@pytest.mark.parametrize("overrides", [["sae.k=abc"], ["data.context_len=512"]])
def test_the_installed_command_prints_one_line_and_no_traceback(
    overrides: list[str], new_workspace
) -> None:
    """The real console script, its stdout and stderr together: Typer and Rich print nothing else."""
    ws = new_workspace("ws")
    saeflow = Path(sys.executable).with_name("saeflow")
    proc = subprocess.run(
        [saeflow, *ws.args(*overrides)], env=ws.env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    nothing_written(ws)


# Servers that refuse the credentials (none given) -------------------------------------------
@pytest.fixture(scope="module")
def refusing_server() -> Iterator[str]:
    """An HTTP server that answers every request 401, as Prefect's and MLflow's do without the
    credentials `saeflow services env` prints: its URL."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def refuse(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b"You are not authenticated."
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="saeflow"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = refuse

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _one_refusal_line(output: str, variables: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output[-3000:]
    assert "(401)" in lines[0] and variables in lines[0], lines[0]
    assert 'eval "$(saeflow services env)"' in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("server", "variables"),
    [("prefect", "PREFECT_API_AUTH_STRING"), ("mlflow", "MLFLOW_TRACKING_PASSWORD")],
)
def test_a_server_refusing_the_credentials_is_one_line_naming_services_env(
    server: str, variables: str, refusing_server: str, new_workspace
) -> None:
    """Before: a 220-line traceback ending in a 401 (Prefect at once; MLflow after the whole
    pipeline ran, at registration). Now: refused in seconds, before the flow starts."""
    ws = new_workspace("ws")
    env = (
        {"PREFECT_API_URL": f"{refusing_server}/api"}
        if server == "prefect"
        else {"MLFLOW_TRACKING_URI": refusing_server}
    )
    result = ws.invoke(*ws.args(), env=env)
    assert result.exit_code == 2, (result.output, result.exception)
    _one_refusal_line(result.output, variables)
    nothing_written(ws)


def test_promote_against_a_refusing_server_is_one_line(refusing_server: str, new_workspace) -> None:
    ws = new_workspace("ws")
    result = ws.invoke("promote", "reliability-sae", env={"MLFLOW_TRACKING_URI": refusing_server})
    assert result.exit_code == 2, (result.output, result.exception)
    _one_refusal_line(result.output, "MLFLOW_TRACKING_PASSWORD")


def test_a_refusal_the_clients_raise_mid_command_becomes_the_same_line(refusing_server) -> None:
    """What one_line_errors makes of the 401 each client raises where no check ran first."""
    import httpx
    import mlflow
    from mlflow.exceptions import MlflowException
    from prefect.exceptions import PrefectHTTPStatusError

    from deployments.access import refused

    with pytest.raises(MlflowException) as mlflow_error:
        mlflow.MlflowClient(tracking_uri=refusing_server).get_registered_model("x")
    try:
        httpx.post(f"{refusing_server}/api/flows/filter").raise_for_status()
    except httpx.HTTPStatusError as err:
        prefect_error = PrefectHTTPStatusError.from_httpx_error(err)
    mlflow_line = str(refused(mlflow_error.value))
    assert "MLflow server" in mlflow_line and "MLFLOW_TRACKING_PASSWORD" in mlflow_line
    prefect_line = str(refused(prefect_error))
    assert f"Prefect server at {refusing_server}/api refused the request (401)" in prefect_line
    assert all('eval "$(saeflow services env)"' in line for line in (mlflow_line, prefect_line))
    assert refused(ValueError("401")) is None  # anything else keeps its traceback


def test_s3_without_credentials_names_services_env(new_workspace, refusing_server: str) -> None:
    ws = new_workspace("ws")
    env = {"AWS_ENDPOINT_URL": refusing_server, "AWS_ACCESS_KEY_ID": None}
    result = ws.invoke(*ws.args(), "--store", "s3://saeflow/store", env=env)
    assert result.exit_code == 2, (result.output, result.exception)
    line = error_line(result.output)
    assert "AWS_ACCESS_KEY_ID" in line and 'eval "$(saeflow services env)"' in line, line
