"""The store: datasets addressed by URI (local directory or s3://), committed atomically.

A dataset is a folder of data files plus `_MANIFEST.json` (one typed model per kind:
sae_core.storage.manifests). Writers put the data first and the manifest last, so a folder
without a manifest is never taken for a finished dataset. A long writer may leave per-part
completion markers under `_progress/` so that an interrupted attempt resumes
(`Store.resuming`); they go once the manifest is written.
"""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from fsspec.core import url_to_fs

from sae_core.env import saeflow_home
from sae_core.errors import StoreError
from sae_core.storage import s3_sessions
from sae_core.storage.manifests import Manifest

MANIFEST = "_MANIFEST.json"
PROGRESS = "_progress"  # completion markers of an unfinished dataset (Store.resuming)
_TEMPORARY = ".tmp-"  # infix of a local write not yet renamed into place
_SAFE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=@+-]*$")


def default_store_uri() -> str:
    """SAEFLOW_STORE if set (e.g. by `saeflow services env`), else $SAEFLOW_HOME/store."""
    return os.environ.get("SAEFLOW_STORE") or str(saeflow_home() / "store")


def safe_relpath(rel: str) -> str:
    """Reject user-derived paths that could leave the store root (.., absolute, odd names)."""
    parts = [p for p in rel.split("/") if p]
    for part in parts:
        if part in (".", "..") or not _SAFE_PART.match(part):
            raise StoreError(
                f"store path '{rel}': part '{part}' is not allowed (letters, digits, _.-=@+)"
            )
    return "/".join(parts)


def _redacted(uri: str) -> str:
    """`s3://KEY:SECRET@bucket/x` -> `s3://***@bucket/x`."""
    scheme, sep, rest = uri.partition("://")
    return f"{scheme}{sep}***@{rest.split('@', 1)[1]}" if "@" in rest.split("/", 1)[0] else uri


# The operating system's own trees: a store is never made anywhere inside them (as root, a store
# at file:///etc would write its stage folders into /etc).
_SYSTEM_TREES = ("/etc", "/usr", "/bin", "/sbin", "/boot", "/dev", "/proc", "/sys")
# Shared roots: refused as the store itself, but a folder of one's own inside them is fine
# (/var/tmp/store, /var/lib/saeflow, /home/me/store, /opt/saeflow).
_SYSTEM_ROOTS = ("/", "/run", "/var", "/var/lib", "/var/log", "/var/cache", "/var/spool", "/var/mail",
                 "/home", "/root", "/opt", "/srv", "/mnt", "/media", "/tmp", "/var/tmp")  # fmt: skip


def system_directory(path: Path) -> bool:
    """Whether a local store at `path` (resolved) would write into the system: inside one of
    its own trees (/etc, /usr, /lib, /lib64, ...) or straight into a shared root (/, /var, /home, ...)."""
    text = str(path)
    inside = any(text == tree or text.startswith(f"{tree}/") for tree in _SYSTEM_TREES) or re.match(
        r"^/lib(32|64|x32)?(/|$)", text
    )
    return bool(inside) or text in _SYSTEM_ROOTS


def connect_failure(url: str, timeout: float = 3.0) -> str | None:
    """Why a TCP connect to an http(s) URL's host and port fails, None when it connects:
    seconds to find out, where the clients' retries take minutes."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except (OSError, ValueError) as err:
        return getattr(err, "strerror", None) or type(err).__name__
    return None


def _probe_endpoint(endpoint: str) -> None:
    """StoreError naming the fix when the S3 endpoint does not answer."""
    if (why := connect_failure(endpoint)) is not None:
        raise StoreError(
            f"S3 endpoint {endpoint} is unreachable ({why}): "
            "start the server (saeflow services up) or fix AWS_ENDPOINT_URL"
        )


class Store:
    """A root URI and the fsspec filesystem behind it."""

    def __init__(self, uri: str | None = None):
        uri = uri or default_store_uri()
        if "\x00" in uri:  # no path or URI holds one; the OS would refuse it mid-command
            raise StoreError(f"store {uri!r}: holds a NUL character; give a directory or s3:// URI")
        if "@" in urlsplit(uri).netloc:
            # The URI is recorded in manifests, MLflow params and logs: a secret in it would leak.
            raise StoreError(
                f"store '{_redacted(uri)}': credentials in the URI are refused (they would be "
                "logged); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE instead"
            )
        if "://" not in uri:
            uri = str(Path(uri).expanduser().resolve())
        self.uri = uri.rstrip("/")
        self.protocol = uri.split("://")[0] if "://" in uri else "file"
        self.endpoint: str | None = None
        if self.protocol not in ("file", "s3", "memory"):
            raise StoreError(
                f"store '{uri}': unsupported scheme; use a local path or s3://bucket/prefix"
            )
        options: dict[str, Any] = {}
        if self.protocol == "s3":
            # Endpoint and credentials come from the standard AWS variables.
            self.endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
                "AWS_ENDPOINT_URL"
            )
            if self.endpoint:
                options["client_kwargs"] = {"endpoint_url": self.endpoint}
            options["config_kwargs"] = {
                "connect_timeout": 5,
                "read_timeout": 60,
                "retries": {"max_attempts": 5, "mode": "standard"},
            }
        self._options = options
        self.fs, self.root = url_to_fs(self.uri, **options)
        s3_sessions.use_for(self.fs)
        self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def check(self) -> None:
        """Fail fast with a clear message when the store cannot be reached or written: a
        local store must be a directory (or not exist yet) outside the system's directories."""
        if self.protocol == "s3" and self.endpoint:
            _probe_endpoint(self.endpoint)
        if self.protocol == "file":
            self._check_local_root(Path(self.root).resolve())
        try:
            if self.protocol == "s3":
                # A fresh client: fsspec's cached one may hold other credentials.
                fresh, _ = url_to_fs(self.uri, skip_instance_cache=True, **self._options)
                self.fs = s3_sessions.use_for(fresh)
            else:
                self.fs.makedirs(self.root, exist_ok=True)
            probe = f"_probe-{uuid.uuid4().hex}"
            self.write_bytes(probe, b"ok")
            self.fs.rm_file(self.path(probe))
        except Exception as err:  # noqa: BLE001 - any transport error becomes one message
            if self.protocol == "s3" and isinstance(err, FileNotFoundError):
                # A missing bucket is never created: a mistyped one would start a new store.
                bucket = self.root.split("/")[0]
                raise StoreError(
                    f"store {self.uri}: bucket '{bucket}' does not exist; create it on purpose "
                    f"(saeflow services bucket {bucket}) or fix the store URI"
                ) from None
            hint = (
                "check AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and that the "
                'server runs (for `saeflow services`: eval "$(saeflow services env)")'
                if self.protocol == "s3"
                else "check the path exists and is writable"
            )
            raise StoreError(
                f"store {self.uri} is not usable ({type(err).__name__}): {hint}"
            ) from None

    def _check_local_root(self, root: Path) -> None:
        if system_directory(root):
            raise StoreError(
                f"store {root} is a system directory; give a folder of your own, e.g. "
                "~/saeflow-store or /var/tmp/saeflow-store"
            )
        if root.exists() and not root.is_dir():
            raise StoreError(f"store {root} is not a directory (a file is there); give a folder")

    # Paths -------------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        rel = safe_relpath(rel)
        return f"{self.root}/{rel}" if rel else self.root

    def url(self, rel: str) -> str:
        return f"{self.uri}/{safe_relpath(rel)}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def open(self, rel: str, mode: str = "rb") -> IO[Any]:
        path = self.path(rel)
        if "w" in mode and self.protocol == "file":
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        return self.fs.open(path, mode)

    def write_bytes(self, rel: str, data: bytes | memoryview) -> None:
        """Write one object atomically: a PUT on S3, write-then-rename locally."""
        path = self.path(rel)
        if self.protocol == "file":
            tmp = f"{path}{_TEMPORARY}{uuid.uuid4().hex[:8]}"
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                # A full disk must not also keep the half-written copy: it holds the space.
                Path(tmp).unlink(missing_ok=True)
                raise
        else:
            self.fs.pipe_file(path, bytes(data))  # botocore takes bytes, not views

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def listdir(self, rel: str) -> list[str]:
        path = self.path(rel)
        if not self.fs.exists(path):
            return []
        # An emptied folder's own `key/` marker (SeaweedFS keeps one) lists as the name ''.
        names = (p.rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))
        return sorted(name for name in names if name)

    def rm(self, rel: str) -> None:
        path = self.path(rel)
        if not self.fs.exists(path):
            return
        if self.protocol != "s3":
            self.fs.rm(path, recursive=True)
            return
        found = self.fs.find(path, withdirs=True, detail=True)
        self.fs.rm(path, recursive=True)
        self._drop_folder_markers(
            [p for p, i in found.items() if i["type"] == "directory"] + [path]
        )

    def _drop_folder_markers(self, folders: list[str]) -> None:
        """Delete `key/` folder entries, deepest first: some servers (SeaweedFS) keep emptied
        folders, which would still list. Deleting an absent key is a no-op on S3."""
        from fsspec.asyn import sync

        for folder in sorted(set(folders), key=len, reverse=True):
            bucket, _, key = folder.partition("/")
            if key:
                sync(self.fs.loop, self.fs._call_s3, "delete_object", Bucket=bucket, Key=f"{key}/")
        self.invalidate_cache()

    def invalidate_cache(self) -> None:
        # s3fs caches listings; another process may have written since.
        self.fs.invalidate_cache()

    # Datasets ----------------------------------------------------------------------------
    def manifest(self, dataset: str) -> dict[str, Any] | None:
        """The committed manifest of a dataset folder, or None if it is absent or unfinished."""
        self.invalidate_cache()
        rel = f"{dataset}/{MANIFEST}"
        if not self.exists(rel):
            return None
        return self.read_json(rel)

    def is_committed(self, dataset: str) -> bool:
        return self.manifest(dataset) is not None

    @contextmanager
    def writing(self, dataset: str) -> Iterator[DatasetWriter]:
        """Clear any unfinished attempt, let the caller write data, then commit the manifest.

        The manifest is written only when the block exits normally; on an exception the
        partial data stays invisible (no manifest) and is cleared by the next attempt.
        """
        self.rm(dataset)
        with self._committing(dataset) as writer:
            yield writer

    @contextmanager
    def _committing(self, dataset: str) -> Iterator[DatasetWriter]:
        writer = DatasetWriter(self, dataset)
        yield writer
        if writer.manifest is None:
            raise StoreError(f"dataset {dataset}: writer finished without a manifest")
        self.commit(dataset, writer.manifest)

    def commit(self, dataset: str, manifest: Manifest | dict[str, Any]) -> None:
        """Write the manifest (a typed one as its JSON) of a dataset whose data is in place,
        then drop its completion marks."""
        written = manifest.to_json() if isinstance(manifest, Manifest) else manifest
        written.setdefault("uri", self.url(dataset))
        self.write_json(f"{dataset}/{MANIFEST}", written)
        self.rm(f"{dataset}/{PROGRESS}")

    def clear_temporaries(self, dataset: str) -> None:
        """Remove the half-written local temporaries an interrupted writer left in `dataset`."""
        self.invalidate_cache()
        if self.protocol == "file" and self.fs.exists(self.path(dataset)):
            for leftover in self.fs.find(self.path(dataset)):
                if _TEMPORARY in leftover.rsplit("/", 1)[-1]:
                    self.fs.rm_file(leftover)

    @contextmanager
    def resuming(self, dataset: str) -> Iterator[DatasetWriter]:
        """Like `writing`, but what an interrupted attempt finished stays for the caller to skip.

        The caller marks each finished part (`DatasetWriter.mark_done`) after writing it and
        reads the marks back (`DatasetWriter.done_marks`) to resume. Only half-written local
        temporaries of the last attempt are cleared. On normal exit the manifest is committed,
        then the marks are removed.
        """
        self.clear_temporaries(dataset)
        with self._committing(dataset) as writer:
            yield writer


class DatasetWriter:
    """Handle given to code that fills one dataset folder."""

    def __init__(self, store: Store, dataset: str):
        self.store = store
        self.dataset = dataset
        self.manifest: Manifest | dict[str, Any] | None = None

    @property
    def fingerprint(self) -> str:
        """The dataset folder's name: the fingerprint that addresses it."""
        return self.dataset.rsplit("/", 1)[-1]

    def rel(self, name: str) -> str:
        return f"{self.dataset}/{name}"

    def open(self, name: str, mode: str = "wb") -> IO[Any]:
        return self.store.open(self.rel(name), mode)

    def write_bytes(self, name: str, data: bytes | memoryview) -> None:
        self.store.write_bytes(self.rel(name), data)

    def write_json(self, name: str, obj: Any) -> None:
        self.store.write_json(self.rel(name), obj)

    def mark_done(self, part: str, record: dict[str, Any]) -> None:
        """Record that `part` (e.g. `train/00003`) is written; call after its data is in place."""
        self.write_json(f"{PROGRESS}/{part}.json", record)

    def is_done(self, part: str) -> bool:
        """Whether `part` is marked done: one lookup, however many parts there are."""
        return self.store.exists(f"{self.dataset}/{PROGRESS}/{part}.json")

    def done_parts(self, group: str) -> set[str]:
        """The parts under `group` marked done (e.g. {`train/00003`}), without reading the marks."""
        names = self.store.listdir(f"{self.dataset}/{PROGRESS}/{group}")
        return {f"{group}/{n.removesuffix('.json')}" for n in names if n.endswith(".json")}

    def done_marks(self, group: str) -> dict[str, dict[str, Any]]:
        """The marks of an earlier attempt under `group` (e.g. `train`), by part name."""
        folder = f"{self.dataset}/{PROGRESS}/{group}"
        return {
            name.removesuffix(".json"): self.store.read_json(f"{folder}/{name}")
            for name in self.store.listdir(folder)
            if name.endswith(".json")
        }
