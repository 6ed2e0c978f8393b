"""Corpus -> fixed-length token contexts, split into eval and train, written as Parquet.

A document is a row of a .jsonl, .json or .parquet file, or a whole .txt file (not a line of
it: a text file is one piece of writing, as a row of the other kinds is). Documents are
shuffled with the seed and tokenised a chunk at a time (batched `Dataset.map`) until enough
tokens are in hand, so a large hub corpus is never tokenised whole. Each document
is followed by EOS and a stream of documents is cut into `context_len` contexts; a context may
cross a document boundary and records the document it starts in.

data.split=document (the default): the first documents in seeded order form the eval stream,
each cut to data.eval_contexts_per_document contexts (the rest of it is dropped), the next
ones the train stream, so no eval context shares a document with training. data.split=context:
one stream whose contexts are shuffled, eval taking the first ones and train the next (disjoint
contexts, shared documents).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from sae_core import stopping
from sae_core.config import DataConfig
from sae_core.env import hub_offline
from sae_core.errors import ConfigError
from sae_core.storage.manifests import TokensManifest, TokensSplit
from sae_core.storage.store import DatasetWriter

SCHEMA_VERSION = 1
_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
_DOC_CHUNK = 1024  # documents tokenised per step: part of the sampling, do not vary per run

TOKENS_SCHEMA = pa.schema(
    [("tokens", pa.list_(pa.int32())), ("context_id", pa.int64()), ("doc_id", pa.string())]
)


@contextmanager
def _quiet_datasets(quiet: bool) -> Iterator[None]:
    # datasets' bars are global state: silence them only for this call, then restore.
    datasets = _datasets()

    was_disabled = datasets.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if quiet and not was_disabled:
            datasets.enable_progress_bars()


def _local_files(files: list[str] | str) -> list[str] | None:
    """The corpus as local files, or None for a hub dataset name."""
    if isinstance(files, str):
        if not os.path.exists(files):
            return None
        root = Path(files)
        files = (
            [str(p) for p in sorted(root.rglob("*")) if p.suffix in _BUILDERS]
            if root.is_dir()
            else [files]
        )
    if not files:
        raise ConfigError("data.corpus: no .txt/.jsonl/.json/.parquet files found; check the path")
    for f in files:
        if not os.path.isfile(f):
            raise ConfigError(
                f"data.corpus: file '{f}' does not exist; check the path or run `make setup`"
            )
    return list(files)


def _reason(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _load_local(kind: str, files: list[str], cache_dir: str) -> Any:
    # A .txt file is one document, as a row of .jsonl or .parquet is (not a document per line).
    options = {"sample_by": "document"} if kind == "text" else {}
    return _datasets().load_dataset(
        kind, data_files=files, split="train", cache_dir=cache_dir, **options
    )


def _datasets() -> Any:
    hub_offline()
    import datasets

    return datasets


def _unloadable(kind: str, files: list[str], cache_dir: str) -> tuple[str, str] | None:
    """The first of `files` that does not load alone, and why; None if each does (then the
    files disagree with each other, e.g. in their columns). Run only once loading failed."""
    for file in files:
        try:
            _load_local(kind, [file], cache_dir)
        except Exception as err:  # noqa: BLE001 - any loader failure names this file
            return file, _reason(err)
    return None


def load_corpus(files: list[str] | str, cache_dir: str) -> Any:
    """A `datasets.Dataset` of documents from local files (cached under `cache_dir`) or the hub.

    A document is a row of a .jsonl/.json/.parquet file, or a whole .txt file."""
    datasets = _datasets()
    local = _local_files(files)
    if local is None:
        try:
            return datasets.load_dataset(files, split="train")
        except Exception as err:  # noqa: BLE001 - any loader failure is a bad data.corpus
            raise ConfigError(
                f"data.corpus '{files}': cannot load as a hub dataset (offline: must be cached) "
                f"({_reason(err)})"
            ) from None
    kinds = {_BUILDERS.get(Path(f).suffix) for f in local}
    if None in kinds or len(kinds) != 1:
        suffixes = sorted({Path(f).suffix or "(none)" for f in local})
        raise ConfigError(
            f"data.corpus: files of kind {', '.join(suffixes)}; use one of .txt, .jsonl/.json or .parquet"
        )
    kind = kinds.pop()
    try:
        return _load_local(kind, local, cache_dir)
    except Exception as err:  # noqa: BLE001 - any loader failure is a bad data.corpus
        found = _unloadable(kind, local, cache_dir) if len(local) > 1 else (local[0], _reason(err))
        if found is None:
            raise ConfigError(
                f"data.corpus: its {len(local)} files load one by one but not together "
                f"({_reason(err)}); give them the same columns and types"
            ) from None
        file, reason = found
        raise ConfigError(
            f"data.corpus: {file} cannot be loaded as local files ({reason}); fix or remove that file"
        ) from None


def check_text_column(corpus: Any, data_cfg: DataConfig) -> None:
    """The loaded corpus holds data.text_column, as strings."""
    column = data_cfg.text_column
    if column not in corpus.column_names:
        raise ConfigError(
            f"data.text_column '{column}': the corpus has columns "
            f"{', '.join(corpus.column_names)}; set data.text_column to the text column"
        )
    # A column of one type has a dtype (int64, ...); JSON lines mixing types load as Json.
    dtype = getattr(corpus.features[column], "dtype", None) or "mixed types"
    if dtype not in ("string", "large_string"):
        raise ConfigError(
            f"data.corpus '{data_cfg.corpus}': column '{column}' holds {dtype}, not only text; "
            "make every data.text_column value a string (quote numbers) or set "
            "data.text_column to the text column"
        )


def _tokenize_chunk(
    corpus: Any, rows: np.ndarray, tokenizer: Any, text_column: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Token ids of the documents at `rows`: (values [n_tokens] int64, lengths [n_docs], doc ids).

    A document is named by its `doc_id` column, else by its row number in the corpus.
    """
    has_ids = "doc_id" in corpus.column_names

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [t if isinstance(t, str) else "" for t in batch[text_column]]
        return {"input_ids": tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]}

    docs = corpus.select(rows)
    # A fingerprint of our own: without one datasets hashes `encode` and its tokenizer with
    # dill, which disassembles the function by printing to a captured stdout, and Prefect's
    # log_prints turned those ~60 lines into task logs. The dataset stays in memory, so the
    # name never keys a cache file.
    out = docs.map(
        encode,
        batched=True,
        remove_columns=docs.column_names,
        keep_in_memory=True,
        new_fingerprint=f"saeflow-tokens-{hashlib.sha256(rows.tobytes()).hexdigest()[:16]}",
    ).with_format("arrow")
    ids = out["input_ids"].combine_chunks()
    keys = [str(d) for d in docs["doc_id"]] if has_ids else [str(r) for r in rows]
    values = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    return values, np.diff(ids.offsets.to_numpy()), keys


class _Stream(NamedTuple):
    """Documents joined into one token stream."""

    tokens: np.ndarray  # [n_tokens] int64
    doc_keys: list[str]  # the documents, in stream order
    doc_ends: np.ndarray  # [n_docs] int64, the end offset of each document

    def contexts(self, context_len: int) -> int:
        return self.tokens.size // context_len

    def doc_of_contexts(self, context_len: int) -> list[str]:
        """The document each whole context starts in."""
        starts = np.arange(self.contexts(context_len), dtype=np.int64) * context_len
        return [self.doc_keys[i] for i in np.searchsorted(self.doc_ends, starts, side="right")]


def _documents(
    corpus: Any, tokenizer: Any, text_column: str, seed: int
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, token ids + EOS) of each non-empty document, in seeded order, tokenised a chunk at
    a time as they are consumed."""
    eos = tokenizer.eos_token_id
    separator = np.array([] if eos is None else [eos], dtype=np.int64)
    doc_order = np.random.default_rng(seed).permutation(len(corpus))
    for start in range(0, len(corpus), _DOC_CHUNK):
        stopping.check()
        rows = doc_order[start : start + _DOC_CHUNK]
        values, lengths, keys = _tokenize_chunk(corpus, rows, tokenizer, text_column)
        for doc, key in zip(np.split(values, np.cumsum(lengths)[:-1]), keys, strict=True):
            if doc.size:
                yield key, np.concatenate([doc, separator])


def _fill(
    documents: Iterator[tuple[str, np.ndarray]],
    needed: int,
    bar: Any,
    max_doc_tokens: int | None = None,
) -> _Stream:
    """Documents taken from `documents` until the stream holds `needed` tokens (or they run
    out); each cut to `max_doc_tokens` when given."""
    pieces: list[np.ndarray] = []
    doc_keys: list[str] = []
    doc_ends: list[int] = []
    total = 0
    while total < needed:
        key, doc = next(documents, (None, None))
        if key is None:
            break
        pieces.append(doc[:max_doc_tokens])
        total += pieces[-1].size
        doc_keys.append(key)
        doc_ends.append(total)
        bar.update(min(total, needed) - min(total - pieces[-1].size, needed))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return _Stream(stream, doc_keys, np.asarray(doc_ends, dtype=np.int64))


def _contexts_table(
    stream: _Stream, indices: np.ndarray, context_len: int, offset: int
) -> pa.Table:
    """The stream's contexts at `indices`, named `offset + index`."""
    whole = stream.contexts(context_len) * context_len
    tokens = stream.tokens[:whole].reshape(-1, context_len)[indices]
    doc_of_context = stream.doc_of_contexts(context_len)
    offsets = pa.array(np.arange(len(indices) + 1, dtype=np.int32) * context_len)
    return pa.table(
        {
            "tokens": pa.ListArray.from_arrays(
                offsets, pa.array(tokens.reshape(-1).astype(np.int32))
            ),
            "context_id": pa.array(indices.astype(np.int64) + offset),
            "doc_id": pa.array([doc_of_context[i] for i in indices], pa.string()),
        },
        schema=TOKENS_SCHEMA,
    )


def _write_parquet(writer: DatasetWriter, name: str, table: pa.Table) -> int:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    writer.write_bytes(name, buf.getvalue())
    return buf.tell()


def sample_tokens(
    data_cfg: DataConfig,
    tokenizer: Any,
    files: list[str] | str,
    writer: DatasetWriter,
    progress: bool = True,
) -> TokensManifest:
    """Tokenise the corpus, cut, shuffle and split contexts; write `eval.parquet` and
    `train.parquet` (columns tokens: list<int32>[context_len], context_id, doc_id) and set
    the writer's manifest, which it returns.

    `files`: local corpus files (or one file/folder), or a hub dataset name.
    """
    datasets = _datasets()
    T = data_cfg.context_len
    n_eval = math.ceil(data_cfg.eval_tokens / T)
    n_train = math.ceil(data_cfg.train_tokens / T)
    needed = (n_eval + n_train) * T

    with (
        tempfile.TemporaryDirectory(prefix="saeflow-datasets-") as cache_dir,
        _quiet_datasets(not progress),
    ):
        corpus = load_corpus(files, cache_dir)
        if isinstance(
            corpus, datasets.DatasetDict | datasets.IterableDataset | datasets.IterableDatasetDict
        ):
            raise ConfigError(f"data.corpus '{files}': expected one map-style split 'train'")
        check_text_column(corpus, data_cfg)
        documents = _documents(corpus, tokenizer, data_cfg.text_column, data_cfg.seed)
        with tqdm(total=needed, unit="tok", desc="tokenize", disable=not progress) as bar:
            if data_cfg.split == "document":
                cap = data_cfg.eval_contexts_per_document * T
                streams = {
                    "eval": _fill(documents, n_eval * T, bar, max_doc_tokens=cap),
                    "train": _fill(documents, n_train * T, bar),
                }
            else:
                whole = _fill(documents, needed, bar)
        n_docs = len(corpus)

    rng = np.random.default_rng(data_cfg.seed)
    if data_cfg.split == "document":
        short = [s for s, n in (("eval", n_eval), ("train", n_train)) if streams[s].contexts(T) < n]
        tables = {}
        offset = 0  # context ids stay unique across the splits
        for split, n in (("eval", n_eval), ("train", n_train)):
            stream = streams[split]
            ids = rng.permutation(stream.contexts(T))[:n]
            tables[split] = (stream, ids, offset)
            offset += stream.contexts(T)
        total = sum(stream.tokens.size for stream in streams.values())
    else:
        available = whole.contexts(T)
        short = ["eval", "train"] if available < n_eval + n_train else []
        order = rng.permutation(available)
        tables = {
            "eval": (whole, order[:n_eval], 0),
            "train": (whole, order[n_eval : n_eval + n_train], 0),
        }
        total = whole.tokens.size
    if short:
        raise ConfigError(
            f"data.corpus '{data_cfg.corpus}' has {total} tokens to use ({data_cfg.split} split; "
            f"the {' and '.join(short)} split came up short) but data.train_tokens + "
            f"data.eval_tokens need {needed}; lower data.train_tokens (or data.eval_tokens, "
            "data.context_len) or use a larger corpus"
        )

    splits = {}
    for split, (stream, ids, offset) in tables.items():
        table = _contexts_table(stream, ids, T, offset)
        nbytes = _write_parquet(writer, f"{split}.parquet", table)
        docs = set(table.column("doc_id").to_pylist())
        splits[split] = TokensSplit(
            contexts=len(ids), tokens=len(ids) * T, bytes=nbytes, documents=len(docs)
        )

    manifest = TokensManifest(
        schema_version=SCHEMA_VERSION,
        fingerprint=writer.fingerprint,
        context_len=T,
        tokenizer=getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        corpus=data_cfg.corpus,
        text_column=data_cfg.text_column,
        seed=data_cfg.seed,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        corpus_documents=n_docs,
        documents_tokenized=sum(len(stream.doc_keys) for stream, _, _ in tables.values()),
        stream_tokens=total,
        split=data_cfg.split,
        **(
            {"eval_contexts_per_document": data_cfg.eval_contexts_per_document}
            if data_cfg.split == "document"
            else {}
        ),
        splits=splits,
    )
    writer.manifest = manifest
    return manifest
