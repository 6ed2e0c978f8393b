"""The viewer's files, by URL path: plain HTML/CSS/JS pages (static/) and the data they fetch,
read from a latent statistics dataset on the store.

Data paths: `data/summary.json`, `data/index/chunk-NNNNN.json` (as stored) and
`data/latent/NNNNN.json`, one latent's record, cut from the stored page that holds it (a few
pages are kept in memory). The same tree serves over HTTP and exports as a static site.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sae_core.storage.manifests import LatentStatsManifest
from sae_core.storage.refs import DatasetRef

STATIC = Path(__file__).with_name("static")
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8", ".json": "application/json"}  # fmt: skip
_CHUNK = re.compile(r"^data/index/chunk-(\d{5})\.json$")
_LATENT = re.compile(r"^data/latent/(\d{5,})\.json$")
_PAGES_KEPT = 8  # stored pages held in memory (each PAGE_SIZE latent records)


class LatentSite:
    """The site of one latent statistics dataset (kind `latent_stats`)."""

    def __init__(self, ref: DatasetRef):
        ref.manifest(LatentStatsManifest)  # DatasetDamaged if it holds another kind
        self.ref, self.store = ref, ref.open_store()
        self.summary: dict[str, Any] = self.store.read_json(f"{ref.path}/summary.json")
        self.n = int(self.summary["n_latents"])
        self._pages: OrderedDict[int, list[dict[str, Any]]] = OrderedDict()

    def get(self, path: str) -> tuple[bytes, str] | None:
        """The body and content type at a URL path ("/" is the index page); None if absent."""
        path = path.lstrip("/") or "index.html"
        kind = _TYPES.get(Path(path).suffix)
        if kind is None:
            return None
        if "/" not in path:
            file = STATIC / path
            return (file.read_bytes(), kind) if file.is_file() else None
        if path == "data/summary.json":
            return self.store.read_bytes(f"{self.ref.path}/summary.json"), kind
        if (m := _CHUNK.match(path)) and int(m[1]) < self.summary["layout"]["index_chunks"]:
            return self.store.read_bytes(f"{self.ref.path}/index/chunk-{m[1]}.json"), kind
        if (m := _LATENT.match(path)) and int(m[1]) < self.n:
            return json.dumps(self.latent(int(m[1])), separators=(",", ":")).encode(), kind
        return None

    def latent(self, j: int) -> dict[str, Any]:
        """Latent j's record, from its stored page."""
        size = self.summary["layout"]["page_size"]
        page = self._pages.get(j // size)
        if page is None:
            page = self.store.read_json(f"{self.ref.path}/latents/page-{j // size:05d}.json")
            self._pages[j // size] = page
            while len(self._pages) > _PAGES_KEPT:
                self._pages.popitem(last=False)
        self._pages.move_to_end(j // size)
        return page[j % size]

    def paths(self) -> Iterator[str]:
        """Every path of the site: the pages, the summary, the index chunks, each latent."""
        yield from sorted(p.name for p in STATIC.iterdir() if p.suffix in _TYPES)
        yield "data/summary.json"
        for i in range(self.summary["layout"]["index_chunks"]):
            yield f"data/index/chunk-{i:05d}.json"
        for j in range(self.n):
            yield f"data/latent/{j:05d}.json"

    def export(self, folder: Path, progress: bool = True) -> int:
        """Write the whole site under `folder` (serve it with any static web server; browsers
        refuse `fetch` from file:// pages). Returns the number of files written."""
        paths = list(self.paths())
        for path in tqdm(paths, desc="export", unit="file", disable=not progress):
            found = self.get(path)
            assert found is not None, path  # paths() lists only what get() serves
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(found[0])
        return len(paths)
