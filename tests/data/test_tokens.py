from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_core.config import DataConfig
from sae_core.data.tokens import sample_tokens
from sae_core.errors import ConfigError
from sae_core.storage.store import Store
from tests.helpers.tiny_models import build_tokenizer, generated_text, write_corpus


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _cfg(**kw) -> DataConfig:
    base = {
        "corpus": "tiny",
        "context_len": 16,
        "train_tokens": 1000,
        "eval_tokens": 100,
        "seed": 0,
    }
    return DataConfig(**{**base, **kw})


def _sample(tmp_path, tokenizer, files, name="tokens/fp0", **kw):
    store = Store(str(tmp_path / "store"))
    with store.writing(name) as writer:
        manifest = sample_tokens(_cfg(**kw), tokenizer, files, writer, progress=False)
    tables = {s: pq.read_table(store.open(f"{name}/{s}.parquet")) for s in ("train", "eval")}
    return store, manifest.to_json(), tables


def test_counts_schema_and_manifest(tmp_path, tokenizer, tiny_corpus_dir):
    store, manifest, tables = _sample(tmp_path, tokenizer, str(tiny_corpus_dir))
    # 1000 / 16 -> 63 contexts (rounded up), 100 / 16 -> 7.
    assert manifest["splits"]["train"]["contexts"] == 63 == tables["train"].num_rows
    assert manifest["splits"]["eval"]["contexts"] == 7 == tables["eval"].num_rows
    assert manifest["splits"]["train"]["tokens"] == 63 * 16
    assert store.manifest("tokens/fp0") == {**manifest, "uri": store.url("tokens/fp0")}
    assert manifest["kind"] == "tokens" and manifest["fingerprint"] == "fp0"
    assert manifest["context_len"] == 16 and manifest["vocab_size"] == len(tokenizer)
    schema = tables["train"].schema
    assert schema.field("tokens").type == pa.list_(pa.int32())
    assert schema.field("context_id").type == pa.int64()
    assert schema.field("doc_id").type == pa.string()
    for table in tables.values():
        lengths = {len(t) for t in table.column("tokens").to_pylist()}
        assert lengths == {16}
    ids = np.array(tables["train"].column("tokens").to_pylist())
    assert ids.min() >= 0 and ids.max() < len(tokenizer)
    assert tokenizer.unk_token_id not in ids
    assert all(d.startswith("doc") for d in tables["train"].column("doc_id").to_pylist())


def test_splits_disjoint_and_seed_deterministic(tmp_path, tokenizer, tiny_corpus_dir):
    _, _, a = _sample(tmp_path / "a", tokenizer, str(tiny_corpus_dir))
    _, _, b = _sample(tmp_path / "b", tokenizer, str(tiny_corpus_dir))
    _, _, c = _sample(tmp_path / "c", tokenizer, str(tiny_corpus_dir), seed=1)
    train_ids = set(a["train"].column("context_id").to_pylist())
    eval_ids = set(a["eval"].column("context_id").to_pylist())
    assert not train_ids & eval_ids and len(train_ids) == 63 and len(eval_ids) == 7
    assert a["train"].equals(b["train"]) and a["eval"].equals(b["eval"])
    assert a["train"].column("tokens") != c["train"].column("tokens")


def test_documents_joined_with_eos(tmp_path, tokenizer):
    docs = tmp_path / "corpus" / "docs.jsonl"
    docs.parent.mkdir()
    docs.write_text(
        "".join(
            json.dumps({"doc_id": f"d{i}", "text": "the old dog saw a man ."}) + "\n"
            for i in range(40)
        )
    )
    _, manifest, tables = _sample(
        tmp_path, tokenizer, [str(docs)], context_len=8, train_tokens=160, eval_tokens=16
    )
    # Each document is 7 tokens + EOS: every context of 8 starts at a document start.
    expected = tokenizer("the old dog saw a man .")["input_ids"] + [tokenizer.eos_token_id]
    for row in tables["train"].column("tokens").to_pylist():
        assert row == expected
    # Eval takes 2 documents (16 tokens), train the next 20 (160): only those are in the streams.
    assert manifest["stream_tokens"] == 22 * 8


def test_text_corpus(tmp_path, tokenizer):
    import random

    rng = random.Random(0)
    files = []
    for i in range(20):  # a .txt file is one document
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text("\n".join(generated_text(rng, 10) for _ in range(3)))
    _, manifest, _ = _sample(
        tmp_path, tokenizer, [str(f) for f in files], train_tokens=500, eval_tokens=50
    )
    assert manifest["splits"]["train"]["contexts"] == 32


def test_doc_ids_name_the_source_document(tmp_path, tokenizer, monkeypatch):
    # Without a doc_id column a document is named by its row; tokenised in chunks of 4 rows.
    monkeypatch.setattr("sae_core.data.tokens._DOC_CHUNK", 4)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.islower()][:20]
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": [" ".join([w] * 40) for w in words]}), parquet)
    _, manifest, tables = _sample(
        tmp_path, tokenizer, [str(parquet)], text_column="body", train_tokens=400, eval_tokens=40
    )
    assert manifest["documents_tokenized"] == 12  # 3 chunks cover the 448 tokens needed
    for table in tables.values():
        rows = table.column("tokens").to_pylist()
        docs = table.column("doc_id").to_pylist()
        for row, doc in zip(rows, docs, strict=True):
            # The context starts inside its document: in its words or at its closing EOS.
            assert tokenizer.convert_ids_to_tokens(row[0]) in (words[int(doc)], tokenizer.eos_token)


def test_not_enough_tokens_says_how_many(tmp_path, tokenizer):
    files = write_corpus(tmp_path / "small", n_docs=3, n_files=1)
    with pytest.raises(ConfigError, match=r"has \d+ tokens .* lower data\.train_tokens") as err:
        _sample(tmp_path, tokenizer, files, train_tokens=100_000)
    assert len(str(err.value).splitlines()) == 1


def test_bad_corpus_errors(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="does not exist"):
        _sample(tmp_path, tokenizer, [str(tmp_path / "missing.jsonl")])
    with pytest.raises(ConfigError, match="no .txt/.jsonl"):
        _sample(tmp_path, tokenizer, [])
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ConfigError, match="no .txt/.jsonl"):
        _sample(tmp_path, tokenizer, str(empty_dir))
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ConfigError, match="has 0 tokens"):
        _sample(tmp_path, tokenizer, [str(blank)])
    with pytest.raises(ConfigError, match=r"data\.text_column 'body'.*text"):
        _sample(tmp_path, tokenizer, [str(blank)], text_column="body")
    odd = tmp_path / "notes.md"
    odd.write_text("hello")
    with pytest.raises(ConfigError, match="files of kind"):
        _sample(tmp_path, tokenizer, [str(odd)])
    with pytest.raises(ConfigError, match="data.corpus 'no-such/dataset'"):
        _sample(tmp_path, tokenizer, "no-such/dataset")


def _many_documents(tmp_path, n_docs: int, words: int) -> list[str]:
    import random

    rng = random.Random(0)
    docs = tmp_path / "corpus" / "docs.jsonl"
    docs.parent.mkdir(parents=True)
    docs.write_text(
        "".join(
            json.dumps({"doc_id": f"d{i}", "text": generated_text(rng, words)}) + "\n"
            for i in range(n_docs)
        )
    )
    return [str(docs)]


def test_document_split_holds_eval_documents_out_of_training(tmp_path, tokenizer):
    files = _many_documents(tmp_path, n_docs=200, words=60)
    _, manifest, tables = _sample(tmp_path, tokenizer, files, train_tokens=2000, eval_tokens=300)
    eval_docs = set(tables["eval"].column("doc_id").to_pylist())
    train_docs = set(tables["train"].column("doc_id").to_pylist())
    assert eval_docs and train_docs and not eval_docs & train_docs
    assert manifest["split"] == "document" and manifest["eval_contexts_per_document"] == 4
    assert manifest["splits"]["eval"]["documents"] == len(eval_docs)
    # Each eval document is cut to 4 contexts of 16: the 19 eval contexts span >= 5 documents.
    assert len(eval_docs) >= 5
    ids = (
        tables["eval"].column("context_id").to_pylist()
        + tables["train"].column("context_id").to_pylist()
    )
    assert len(set(ids)) == len(ids)


def test_eval_contexts_per_document_caps_each_document(tmp_path, tokenizer):
    files = _many_documents(tmp_path, n_docs=200, words=60)
    _, _, tables = _sample(
        tmp_path, tokenizer, files, train_tokens=800, eval_tokens=320, eval_contexts_per_document=1
    )
    # One context per eval document: 20 eval contexts come from at least 20 documents (a
    # context may start in one document and end in the next).
    assert len(set(tables["eval"].column("doc_id").to_pylist())) == 20


def test_context_split_shares_documents(tmp_path, tokenizer):
    files = _many_documents(tmp_path, n_docs=40, words=200)
    _, manifest, tables = _sample(
        tmp_path, tokenizer, files, train_tokens=4000, eval_tokens=400, split="context"
    )
    eval_docs = set(tables["eval"].column("doc_id").to_pylist())
    train_docs = set(tables["train"].column("doc_id").to_pylist())
    assert manifest["split"] == "context" and "eval_contexts_per_document" not in manifest
    assert eval_docs & train_docs  # the old default: 114 of Brown's 118 eval documents shared
