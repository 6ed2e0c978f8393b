"""Cheap checks that run before any heavy work, so bad input fails in seconds with one line."""

from __future__ import annotations

import codecs
import json
import math
import struct
from pathlib import Path
from typing import NamedTuple

from sae_core.config import DataConfig, PipelineConfig, check_expander_graph
from sae_core.data.assets import resolve_corpus, resolve_model_path
from sae_core.data.models import ModelFacts, check_transcoder_hooks, inspect_model
from sae_core.env import hub_offline, machine_memory
from sae_core.errors import ConfigError
from sae_core.storage.store import Store, default_store_uri
from sae_core.training.resources import check_world_size, training_bytes

MAX_SHARDS = 100_000  # more files than a store lists or a loader opens in reasonable time
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
_READ_BYTES = 1 << 20


def _safetensors_problem(file: Path) -> str | None:
    """Why a .safetensors file is not whole (truncated, padded, not safetensors), or None.
    Reads the header only: its tensors' byte ranges must end exactly at the end of the file."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size} bytes, no header"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return "its header length exceeds the file"
        try:
            header = json.loads(fh.read(length))
            end = max(
                (t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0
            )
        except (ValueError, TypeError, KeyError, IndexError):
            return "its header is not safetensors JSON"
    if size != 8 + length + end:
        return f"{size} bytes where its header needs {8 + length + end}"
    return None


def check_model_files(path: str, vocab_size: int | None = None) -> None:
    """A local model folder: whole safetensors weights (pickle weights are refused: loading them
    can run code) and a tokenizer that loads, whose ids fit the model's embedding of
    `vocab_size` rows. Hub ids and GGUF files are checked when loaded."""
    hub_offline()
    from transformers import AutoTokenizer

    folder = Path(resolve_model_path(path))
    if not folder.is_dir():
        return
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f" (found pickle files {', '.join(pickled)}: never loaded, they can run code)"
        raise ConfigError(
            f"model.path '{path}': no .safetensors weights{found if pickled else ''}; "
            "convert the weights to safetensors or give a GGUF file"
        )
    for file in weights:
        if (problem := _safetensors_problem(file)) is not None:
            raise ConfigError(
                f"model.path '{path}': {file.name} is damaged ({problem}); "
                "restore the model files (re-download, or `make setup` for a demo model)"
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001 - any tokenizer failure is a bad model.path
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ConfigError(
            f"model.path '{path}': its tokenizer does not load ({reason}); "
            "restore the tokenizer files (tokenizer.json, tokenizer_config.json)"
        ) from None
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ConfigError(
            f"model.path '{path}': its tokenizer's vocabulary of {len(tokenizer)} tokens exceeds "
            f"the model's embedding of {vocab_size} rows (ids beyond it cannot be embedded); "
            "put the model's own tokenizer in the folder"
        )


def check_sizes(config: PipelineConfig, facts: ModelFacts) -> None:
    """Sizes that could only fail after hours (or exhaust memory): contexts longer than the
    model's positions, a batch larger than the training set, an SAE larger than this machine."""
    data, sae = config.data, config.sae
    if facts.positions is not None and data.context_len > facts.positions:
        raise ConfigError(
            f"data.context_len={data.context_len} exceeds the model's {facts.positions} "
            f"positions; choose data.context_len <= {facts.positions}"
        )
    per_context = data.context_len - (1 if data.skip_first_position else 0)
    rows = math.ceil(data.train_tokens / data.context_len) * per_context
    if config.train.batch_size > rows:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} exceeds the {rows} training "
            f"activations data.train_tokens={data.train_tokens} gives; lower train.batch_size "
            "or raise data.train_tokens"
        )
    from sae_core.device import pick_device, state_copies

    world = config.train.world_size
    copies = state_copies(pick_device(config.train.device), world)
    need = copies * training_bytes(sae, facts.width)
    memory = machine_memory()
    if need > memory:
        ranks = f" in train.world_size={world} processes" if copies > 1 else ""
        raise ConfigError(
            f"sae.n_latents={sae.n_latents}: its weights, gradients and Adam moments need "
            f"~{need / 2**30:,.0f} GiB at width {facts.width}{ranks}, more than this machine's "
            f"{memory / 2**30:,.0f} GiB; lower sae.n_latents{' or train.world_size' if ranks else ''}"
        )


def check_shard_count(config: PipelineConfig, width: int) -> None:
    """Activation shards a run would write: at most MAX_SHARDS (a shard holds whole contexts,
    at least one, so a tiny data.shard_mb or data.shard_rows means a file per context)."""
    from sae_core.data.activations import contexts_per_shard, storage_dtype

    data = config.data
    dtype = storage_dtype(config.model.dtype, data)
    per_shard = contexts_per_shard(data, width, dtype, data.context_len)
    shards = sum(
        math.ceil(math.ceil(tokens / data.context_len) / per_shard)
        for tokens in (data.train_tokens, data.eval_tokens)
    )
    if shards > MAX_SHARDS:
        field = (
            f"data.shard_rows={data.shard_rows}"
            if data.shard_rows is not None
            else f"data.shard_mb={data.shard_mb:g}"
        )
        raise ConfigError(
            f"{field} makes {shards:,} activation shards of {per_shard} context(s) each, more "
            f"than {MAX_SHARDS:,}; raise {field.split('=')[0]}"
        )


# What a compressed file starts with: a .txt that is really one gets "decompress it", not iconv.
_COMPRESSION_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
}
_DECOMPRESS = {"gzip": "gunzip -k FILE", "bzip2": "bunzip2 -k FILE", "xz": "unxz -k FILE",
               "zstd": "unzstd FILE", "zip": "unzip FILE"}  # fmt: skip
_JSON_TYPES = {bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}


class TextScan(NamedTuple):
    """One streamed pass over a text file."""

    utf8_error: str | None  # where it stops being UTF-8, or None
    has_text: bool  # a character other than whitespace


def _compression(file: Path) -> str | None:
    """The compression format `file` starts with (by its magic bytes), or None."""
    with open(file, "rb") as fh:
        head = fh.read(8)
    return next(
        (kind for magic, kind in _COMPRESSION_MAGIC.items() if head.startswith(magic)), None
    )


def _scan_text(file: Path) -> TextScan:
    """Where a text file stops being UTF-8, and whether it holds more than whitespace;
    streamed, so any size costs one read."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text = 0, False
    with open(file, "rb") as fh:
        while chunk := fh.read(_READ_BYTES):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                return TextScan(f"byte {offset + err.start}", has_text)
            has_text = has_text or bool(chunk.strip())
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return TextScan("its last character is cut", has_text)
    return TextScan(None, has_text)


def _first_record(file: Path) -> tuple[int, dict] | None:
    """The first JSON record of a .jsonl file and its line number (None if it has none);
    ConfigError if that line is not a JSON object."""
    with open(file, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise ConfigError(
                        f"data.corpus: {file} line {number} is not JSON ({err}); "
                        "fix the file: one JSON object per line"
                    ) from None
                if not isinstance(record, dict):
                    raise ConfigError(
                        f"data.corpus: {file} line {number} is not a JSON object; "
                        "fix the file: one JSON object per line"
                    )
                return number, record
    return None


def _check_text_value(file: Path, number: int, record: dict, column: str) -> None:
    """The text column of a jsonl record holds a string (a number there is no text)."""
    value = record.get(column)
    if value is not None and not isinstance(value, str):
        kind = _JSON_TYPES.get(type(value), type(value).__name__)
        raise ConfigError(
            f"data.corpus: {file} line {number}: '{column}' is a {kind} ({str(value)[:40]}), "
            f"not text; make data.text_column a column of strings (quote the values) or set "
            "data.text_column to the text column"
        )


def _columns(file: Path, column: str) -> list[str] | None:
    """The columns a corpus file holds (None: known only when loaded), its first record's
    text value checked to be a string."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if file.suffix == ".txt":
        return ["text"]
    if file.suffix == ".jsonl":
        first = _first_record(file)
        if first is None:
            return None
        _check_text_value(file, *first, column)
        return list(first[1])
    if file.suffix == ".parquet":
        try:
            schema = pq.read_schema(file)
        except (OSError, pa.ArrowException) as err:
            raise ConfigError(
                f"data.corpus: {file} is not a readable Parquet file ({str(err)[:120]}); "
                "fix or remove that file"
            ) from None
        if (
            column in schema.names
            and not pa.types.is_string(schema.field(column).type)
            and not pa.types.is_large_string(schema.field(column).type)
        ):
            raise ConfigError(
                f"data.corpus: {file}: column '{column}' holds {schema.field(column).type}, "
                "not text; make data.text_column a column of strings or set data.text_column "
                "to the text column"
            )
        return schema.names
    return None  # .json: an array or lines, told apart when loaded


def check_corpus(data: DataConfig) -> None:
    """Local corpus files: plain (not compressed) UTF-8 text that holds more than whitespace,
    every file's records holding data.text_column as text, and enough text for the tokens asked
    (a token takes at least a byte, a document's EOS aside). A folder's files are each checked,
    so the message names the broken one."""
    files = [Path(f) for f in resolve_corpus(data.corpus) if Path(f).is_file()]
    if not files:
        return  # a hub dataset: checked when it is loaded
    has_text = False
    for file in files:
        if (packed := _compression(file)) is not None:
            raise ConfigError(
                f"data.corpus: {file} is {packed}-compressed (its first bytes are {packed}'s "
                f"magic number); decompress it first (e.g. {_DECOMPRESS.get(packed, 'unpack it')})"
            )
        if file.suffix not in _TEXT_SUFFIXES:
            continue
        scan = _scan_text(file)
        if scan.utf8_error is not None:
            raise ConfigError(
                f"data.corpus: {file} is not UTF-8 text (at {scan.utf8_error}); convert it, "
                f"e.g. iconv -f LATIN1 -t UTF-8"
            )
        has_text = has_text or scan.has_text
    text_bytes = sum(f.stat().st_size for f in files if f.suffix in _TEXT_SUFFIXES)
    only_text = all(f.suffix in _TEXT_SUFFIXES for f in files)
    if text_bytes == 0 and only_text:
        raise ConfigError(
            f"data.corpus '{data.corpus}': its files are empty; give a corpus with text"
        )
    if not has_text and only_text:
        raise ConfigError(
            f"data.corpus '{data.corpus}': its files hold only whitespace; give a corpus with text"
        )
    for file in files:
        columns = _columns(file, data.text_column)
        if columns is not None and data.text_column not in columns:
            where = f" ({file})" if len(files) > 1 else ""
            raise ConfigError(
                f"data.text_column '{data.text_column}': the corpus{where} has columns "
                f"{', '.join(columns)}; set data.text_column to the text column"
            )
    needed = (
        math.ceil(data.train_tokens / data.context_len)
        + math.ceil(data.eval_tokens / data.context_len)
    ) * data.context_len
    if files[0].suffix in _TEXT_SUFFIXES and needed > 2 * text_bytes:
        raise ConfigError(
            f"data.train_tokens + data.eval_tokens need {needed} tokens, more than the corpus's "
            f"{text_bytes} bytes of text can give; lower data.train_tokens or use a larger corpus"
        )


def preflight(config: PipelineConfig) -> ModelFacts:
    """Store reachable, writable and not a system directory, model and hook valid, model
    files whole, a tokenizer the model's embedding covers, corpus present and readable as text,
    devices present (a GPU per rank), sizes possible (shards countable), an expander SAE's
    sae.degree possible at the model's width, a transcoder's output hook after its input hook."""
    from sae_core.device import pick_device

    facts = inspect_model(config.model.path, config.model.hook)
    if config.model.hook_out is not None:  # a transcoder's output hook exists and fires later
        try:
            inspect_model(config.model.path, config.model.hook_out)
        except ConfigError as err:  # the same checks as model.hook's: name the field checked
            raise ConfigError(str(err).replace("model.hook ", "model.hook_out ", 1)) from None
        check_transcoder_hooks(config.model.hook, config.model.hook_out)
    if config.sae.kind == "expander":
        check_expander_graph(config.sae.n_latents, facts.width, config.sae.degree)
    check_model_files(config.model.path, facts.vocab_size)
    for field, device in (
        ("model.device", config.model.device),
        ("train.device", config.train.device),
    ):
        try:
            pick_device(device)
        except ConfigError as err:
            raise ConfigError(f"{field}: {err}") from None
    check_world_size(config.train)
    check_sizes(config, facts)
    check_corpus(config.data)
    check_shard_count(config, facts.width)  # after the corpus: more tokens than it has come first
    Store(config.store or default_store_uri()).check()
    return facts
