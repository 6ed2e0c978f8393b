"""Corpus -> fixed-length token contexts, split into eval and train, written as Parquet.

Documents are shuffled with the seed and tokenised a chunk at a time (batched `Dataset.map`)
until the stream holds enough tokens, so a large hub corpus is never tokenised whole. Each
document is followed by EOS and the stream is cut into `context_len` contexts; a context may
cross a document boundary and records the document it starts in. The contexts are shuffled
with the seed; eval takes the first ones, train the next, so the splits are disjoint.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    hub_offline()
    import datasets

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


def load_corpus(files: list[str] | str, cache_dir: str) -> Any:
    """A `datasets.Dataset` of documents from local files (cached under `cache_dir`) or the hub."""
    hub_offline()
    import datasets

    local = _local_files(files)
    try:
        if local is None:
            return datasets.load_dataset(files, split="train")
        kinds = {_BUILDERS.get(Path(f).suffix) for f in local}
        if None in kinds or len(kinds) != 1:
            suffixes = sorted({Path(f).suffix or "(none)" for f in local})
            raise ConfigError(
                f"data.corpus: files of kind {', '.join(suffixes)}; use one of .txt, .jsonl/.json or .parquet"
            )
        return datasets.load_dataset(
            kinds.pop(), data_files=local, split="train", cache_dir=cache_dir
        )
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any loader failure is a bad data.corpus
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        where = "local files" if local is not None else "a hub dataset (offline: must be cached)"
        raise ConfigError(
            f"data.corpus '{files if local is None else local[0]}': cannot load as {where} ({reason})"
        ) from None


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
    out = docs.map(
        encode, batched=True, remove_columns=docs.column_names, keep_in_memory=True
    ).with_format("arrow")
    ids = out["input_ids"].combine_chunks()
    keys = [str(d) for d in docs["doc_id"]] if has_ids else [str(r) for r in rows]
    values = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    return values, np.diff(ids.offsets.to_numpy()), keys


def _token_stream(
    corpus: Any, tokenizer: Any, text_column: str, seed: int, needed: int, progress: bool
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Documents in seeded order, each followed by EOS, until `needed` tokens (or the end).

    Returns (stream [n_tokens] int64, document names, end offset of each document).
    """
    eos = tokenizer.eos_token_id
    separator = np.array([] if eos is None else [eos], dtype=np.int64)
    doc_order = np.random.default_rng(seed).permutation(len(corpus))
    pieces: list[np.ndarray] = []
    doc_keys: list[str] = []
    doc_ends: list[int] = []
    total = 0
    bar = tqdm(total=needed, unit="tok", desc="tokenize", disable=not progress)
    for start in range(0, len(corpus), _DOC_CHUNK):
        stopping.check()
        rows = doc_order[start : start + _DOC_CHUNK]
        values, lengths, keys = _tokenize_chunk(corpus, rows, tokenizer, text_column)
        for doc, key in zip(np.split(values, np.cumsum(lengths)[:-1]), keys, strict=True):
            if doc.size == 0:
                continue
            pieces.append(np.concatenate([doc, separator]))
            total += pieces[-1].size
            doc_keys.append(key)
            doc_ends.append(total)
        bar.update(min(total, needed) - bar.n)
        if total >= needed:
            break
    bar.close()
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return stream, doc_keys, np.asarray(doc_ends, dtype=np.int64)


def _contexts_table(
    stream: np.ndarray, context_ids: np.ndarray, context_len: int, doc_of_context: list[str]
) -> pa.Table:
    tokens = stream[: (stream.size // context_len) * context_len].reshape(-1, context_len)[
        context_ids
    ]
    offsets = pa.array(np.arange(len(context_ids) + 1, dtype=np.int32) * context_len)
    return pa.table(
        {
            "tokens": pa.ListArray.from_arrays(
                offsets, pa.array(tokens.reshape(-1).astype(np.int32))
            ),
            "context_id": pa.array(context_ids.astype(np.int64)),
            "doc_id": pa.array([doc_of_context[i] for i in context_ids], pa.string()),
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
    hub_offline()
    import datasets

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
        if data_cfg.text_column not in corpus.column_names:
            raise ConfigError(
                f"data.text_column '{data_cfg.text_column}': the corpus has columns "
                f"{', '.join(corpus.column_names)}; set data.text_column to the text column"
            )
        stream, doc_keys, doc_ends = _token_stream(
            corpus, tokenizer, data_cfg.text_column, data_cfg.seed, needed, progress
        )
        n_docs = len(corpus)

    total = stream.size
    available = total // T
    if available < n_eval + n_train:
        raise ConfigError(
            f"data.corpus '{data_cfg.corpus}' has {total} tokens ({available} contexts of "
            f"{T}) but data.train_tokens + data.eval_tokens need {needed}; lower data.train_tokens "
            "(or data.eval_tokens, data.context_len) or use a larger corpus"
        )
    # The document each context starts in.
    starts = np.arange(available, dtype=np.int64) * T
    doc_index = np.searchsorted(doc_ends, starts, side="right")
    doc_of_context = [doc_keys[i] for i in doc_index]
    order = np.random.default_rng(data_cfg.seed).permutation(available)
    split_ids = {"eval": order[:n_eval], "train": order[n_eval : n_eval + n_train]}

    splits = {}
    for split, ids in split_ids.items():
        table = _contexts_table(stream, ids, T, doc_of_context)
        nbytes = _write_parquet(writer, f"{split}.parquet", table)
        splits[split] = TokensSplit(contexts=len(ids), tokens=len(ids) * T, bytes=nbytes)

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
        documents_tokenized=len(doc_keys),
        stream_tokens=total,
        splits=splits,
    )
    writer.manifest = manifest
    return manifest
