"""Great Expectations data docs of one validation: rendered to HTML in a scratch folder, then
copied to the store next to the validation's manifest.

Pages: one per expectation suite, one per recorded validation result (the caller records the
overview and the failures, not every passing shard, so the docs stay small at 10^4 shards) and
an index. GE's large tutorial animations are left out.
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sae_core.storage.store import DatasetWriter

_SITE = "saeflow"
_MAX_ASSET_BYTES = 256 * 1024  # skips GE's multi-MB tutorial GIFs; pages, styles, fonts stay


class DataDocs:
    """Collects validation results in a GE context and publishes them as a static site."""

    def __init__(self, context: Any, run_name: str):
        self.context = context
        self.folder = tempfile.TemporaryDirectory(prefix="saeflow-datadocs-")
        context.add_data_docs_site(
            site_name=_SITE,
            site_config={
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": self.folder.name,
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        self.run_name = run_name
        self.run_time = datetime.now(UTC)

    def record(self, suite_name: str, result: Any, where: str) -> None:
        """Keep one validation result (of suite `suite_name`, about `where`) for the docs."""
        from great_expectations.core.run_identifier import RunIdentifier
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
            ValidationResultIdentifier,
        )

        key = ValidationResultIdentifier(
            ExpectationSuiteIdentifier(name=suite_name),
            RunIdentifier(run_name=self.run_name, run_time=self.run_time),
            batch_identifier=where.replace("/", "__").replace(" ", "-"),
        )
        self.context.validation_results_store.set(key, result)

    def publish(self, writer: DatasetWriter, prefix: str = "docs") -> str:
        """Render the site and copy it under `prefix/` of the dataset; the URL of its index page."""
        self.context.build_data_docs(site_names=[_SITE])
        root = Path(self.folder.name)
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            if file.suffix != ".html" and file.stat().st_size > _MAX_ASSET_BYTES:
                continue
            writer.write_bytes(f"{prefix}/{file.relative_to(root).as_posix()}", file.read_bytes())
        self.folder.cleanup()
        url = writer.store.url(f"{writer.dataset}/{prefix}/index.html")
        return url if "://" in url else f"file://{url}"
