"""Cheap checks that run before any heavy work, so bad input fails in seconds with one line."""

from __future__ import annotations

import codecs
import json
import math
import struct
from pathlib import Path

from sae_core.config import DataConfig, PipelineConfig, check_expander_graph
from sae_core.data.assets import resolve_corpus, resolve_model_path
from sae_core.data.models import ModelFacts, inspect_model
from sae_core.env import hub_offline, machine_memory
from sae_core.errors import ConfigError
from sae_core.storage.store import Store, default_store_uri
from sae_core.training.resources import check_world_size, training_bytes

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


def check_model_files(path: str) -> None:
    """A local model folder: whole safetensors weights (pickle weights are refused: loading them
    can run code) and a tokenizer that loads. Hub ids and GGUF files are checked when loaded."""
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
        AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001 - any tokenizer failure is a bad model.path
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ConfigError(
            f"model.path '{path}': its tokenizer does not load ({reason}); "
            "restore the tokenizer files (tokenizer.json, tokenizer_config.json)"
        ) from None


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


def _utf8_error(file: Path) -> str | None:
    """Where a text file stops being UTF-8, or None; streamed, so any size costs one read."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(file, "rb") as fh:
        while chunk := fh.read(_READ_BYTES):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                return f"byte {offset + err.start}"
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "its last character is cut"
    return None


def _first_record(file: Path) -> dict | None:
    """The first JSON record of a .jsonl file (None if it has none); ConfigError if not JSON."""
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
                return record
    return None


def check_corpus(data: DataConfig) -> None:
    """Local corpus files: not empty, UTF-8, records holding data.text_column, and enough text
    for the tokens asked (a token takes at least a byte, a document's EOS aside)."""
    import pyarrow.parquet as pq

    files = [Path(f) for f in resolve_corpus(data.corpus) if Path(f).is_file()]
    if not files:
        return  # a hub dataset: checked when it is loaded
    for file in files:
        if file.suffix in _TEXT_SUFFIXES and (where := _utf8_error(file)) is not None:
            raise ConfigError(
                f"data.corpus: {file} is not UTF-8 text (at {where}); convert it, "
                f"e.g. iconv -f LATIN1 -t UTF-8"
            )
    text_bytes = sum(f.stat().st_size for f in files if f.suffix in _TEXT_SUFFIXES)
    if text_bytes == 0 and all(f.suffix in _TEXT_SUFFIXES for f in files):
        raise ConfigError(
            f"data.corpus '{data.corpus}': its files are empty; give a corpus with text"
        )
    first = files[0]
    if first.suffix == ".txt":
        columns: list[str] | None = ["text"]
    elif first.suffix == ".jsonl":
        record = _first_record(first)
        columns = None if record is None else list(record)
    elif first.suffix == ".parquet":
        columns = pq.read_schema(first).names
    else:
        columns = None  # .json: an array or lines, told apart when loaded
    if columns is not None and data.text_column not in columns:
        raise ConfigError(
            f"data.text_column '{data.text_column}': the corpus has columns "
            f"{', '.join(columns)}; set data.text_column to the text column"
        )
    needed = (
        math.ceil(data.train_tokens / data.context_len)
        + math.ceil(data.eval_tokens / data.context_len)
    ) * data.context_len
    if first.suffix in _TEXT_SUFFIXES and needed > 2 * text_bytes:
        raise ConfigError(
            f"data.train_tokens + data.eval_tokens need {needed} tokens, more than the corpus's "
            f"{text_bytes} bytes of text can give; lower data.train_tokens or use a larger corpus"
        )


def preflight(config: PipelineConfig) -> ModelFacts:
    """Store reachable and writable, model and hook valid, model files whole, corpus present
    and readable, devices present (a GPU per rank), sizes possible, an expander SAE's
    sae.degree possible at the model's width."""
    from sae_core.device import pick_device

    facts = inspect_model(config.model.path, config.model.hook)
    if config.sae.kind == "expander":
        check_expander_graph(config.sae.n_latents, facts.width, config.sae.degree)
    check_model_files(config.model.path)
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
    Store(config.store or default_store_uri()).check()
    return facts
