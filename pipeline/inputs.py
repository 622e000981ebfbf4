"""Expand what the user gave on the command line into input items (uri + optional source caption).

An INPUT is a file, a directory (searched recursively for video files), a glob pattern, or a manifest
(.csv, .jsonl or .parquet with a `uri` column and an optional `caption` column; relative URIs are
resolved against the manifest's folder). A file given by name is always an input, whatever its
extension: if it is not a video, the probe stage rejects it with a reason. The same URI given twice is
one input.

Remote URLs (`s3://bucket/key.mp4`, `gs://...`, any fsspec protocol) work the same way through fsspec: an object,
a prefix (`s3://bucket/raw/`, listed recursively for video files), a glob (`s3://bucket/raw/*.mp4`) or a manifest
stored remotely (its relative URIs resolve against the manifest's prefix). Credentials and options come from the
environment (see storage/remote.py). A missing object is not an error here: the probe stage ledgers it
`not_found`. Remote URIs are kept as canonical URLs (`s3://bucket/raw/a.mp4`).

A URI is a plain absolute path, except for a path whose bytes are not UTF-8 (ledgers store text): that one
becomes a `file://` URL with those bytes percent-encoded (`file:///v/caf%E9.mp4`). `file://` URLs given as
inputs or in manifests are percent-decoded. Manifest rows without a usable uri (missing, empty, not a
string, a line that is not JSON) are skipped with a warning; a manifest that cannot be read at all, or
none of whose rows has a `uri`, raises InputError. A UTF-8 byte-order mark at the start is ignored.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from clipmill.storage import remote

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".wmv", ".flv", ".mpg", ".mpeg", ".ts", ".m2ts",
    ".mts", ".3gp", ".ogv", ".mxf", ".vob", ".divx", ".asf", ".y4m", ".gif",
})
MANIFEST_EXTENSIONS = frozenset({".csv", ".jsonl", ".parquet"})


class InputError(ValueError):
    """Inputs that cannot be read at all (bad manifest, unsupported URL scheme, nothing found)."""


@dataclass(frozen=True)
class InputItem:
    """One input video: where it is and the caption that came with it (if any)."""

    uri: str
    source_caption: str | None = None


def _file_url_path(uri: str) -> str:
    """The path of a `file://` URL, percent-escapes decoded (a non-UTF-8 byte comes back as itself)."""
    return unquote(uri[len("file://"):], errors="surrogateescape")


def _storable(uri: str) -> str:
    """`uri` itself when it is valid UTF-8; else (a file name with undecodable bytes, held in surrogate
    escapes) a `file://` URL with its bytes percent-encoded, which the stages turn back into the same path.
    Ledger and shards store uris as UTF-8 text, so such a path cannot travel as it is.
    """
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:
        return "file://" + quote(os.fsencode(uri))
    return uri


def _norm(uri: str, base: Path | None = None) -> str:
    if uri.startswith("file://"):
        uri = _file_url_path(uri)
    if "://" in uri:
        return _remote_url(uri)
    p = Path(uri).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p
    return os.path.abspath(p)


def _remote_url(uri: str) -> str:
    """The canonical form of a remote URL; InputError when its scheme is unknown or needs a missing package."""
    try:
        return remote.normalize(uri)
    except ValueError as exc:
        raise InputError(f"{uri}: {exc}") from None


def _read_manifest_rows(path: Path | str, opener: Any) -> list[dict]:
    suffix = Path(str(path)).suffix.lower()
    rows: list[dict]
    try:
        if suffix == ".csv":
            with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
                rows = list(csv.DictReader(f))  # -sig: a BOM (Excel) is not data
        elif suffix == ".jsonl":
            rows = []
            with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            log.warning("%s line %d: not JSON (%s); row skipped", path, n, exc.msg)
        else:
            import pyarrow.parquet as pq  # noqa: PLC0415

            with opener(path, "rb") as f:
                rows = pq.read_table(f).to_pylist()
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise InputError(f"cannot read manifest {path}: {exc}") from exc
    return rows


def _from_manifest(path: Path | str, fs: Any = None) -> list[InputItem]:
    """Items of a manifest: a local file, or (given its fsspec filesystem `fs`) a remote object."""
    rows = _read_manifest_rows(path, open if fs is None else fs.open)
    if rows and not any(isinstance(r, dict) and "uri" in r for r in rows):
        columns = sorted({str(k) for r in rows if isinstance(r, dict) for k in r})
        raise InputError(f"manifest {path} has no 'uri' column (columns: {columns}); each row needs a \"uri\"")
    items = []
    for n, r in enumerate(rows, 1):
        uri = r.get("uri") if isinstance(r, dict) else None
        if not uri or not isinstance(uri, str):
            log.warning("%s row %d: no uri; row skipped", path, n)
            continue
        cap = r.get("caption")
        if fs is not None and "://" not in uri and not os.path.isabs(uri):  # relative to the manifest's prefix
            uri = fs.unstrip_protocol(posixpath.normpath(posixpath.join(posixpath.dirname(str(path)), uri)))
        base = None if fs is not None else Path(path).parent
        items.append(InputItem(_norm(uri, base), str(cap) if cap not in (None, "") else None))
    return items


def _from_dir(path: Path) -> list[InputItem]:
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if Path(name).suffix.lower() in VIDEO_EXTENSIONS and not name.startswith("."):
                found.append(InputItem(os.path.abspath(os.path.join(root, name))))
    if not found:
        log.warning("%s: no video files found (extensions: %s)", path, " ".join(sorted(VIDEO_EXTENSIONS)))
    return found


def _from_remote(spec: str) -> list[InputItem]:
    """Items named by a remote spec: an object, a prefix (listed recursively), a glob, or a manifest."""
    try:
        fs, path = remote.filesystem(spec)
    except ValueError as exc:
        raise InputError(f"{spec}: {exc}") from None
    suffix = posixpath.splitext(path)[1].lower()
    try:
        if glob.has_magic(path):
            found = fs.glob(path, detail=True)
            items = [InputItem(fs.unstrip_protocol(p)) for p, info in sorted(found.items())
                     if info.get("type") == "file" and not posixpath.basename(p).startswith(".")]
            if not items:
                log.warning("%s matched no object", spec)
            return items
        if suffix in MANIFEST_EXTENSIONS and fs.isfile(path):
            return _from_manifest(path, fs)
        if fs.isdir(path):
            found = fs.find(path, detail=True)
            items = [InputItem(fs.unstrip_protocol(p)) for p, info in sorted(found.items())
                     if info.get("type") == "file" and posixpath.splitext(p)[1].lower() in VIDEO_EXTENSIONS
                     and not posixpath.basename(p).startswith(".")]
            if not items:
                log.warning("%s: no video objects found (extensions: %s)", spec, " ".join(sorted(VIDEO_EXTENSIONS)))
            return items
    except Exception as exc:  # noqa: BLE001 - OSError, botocore's NoCredentialsError, ...: one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot list {spec}: {type(exc).__name__}: {first[:200]}; check the URL, credentials "
                         f"(AWS_* / {remote.STORAGE_OPTIONS_ENV}) and network") from None
    return [InputItem(fs.unstrip_protocol(path))]  # an object (a missing one is ledgered not_found)


def expand_inputs(specs: list[str]) -> list[InputItem]:
    """All input items named by `specs`, de-duplicated by URI, in the order given."""
    items: list[InputItem] = []
    for spec in specs:
        if remote.is_remote(spec):
            items += _from_remote(spec)
            continue
        if "://" in spec and not spec.startswith("file://"):
            _norm(spec)  # raises InputError with the message
        local = _file_url_path(spec) if spec.startswith("file://") else spec
        p = Path(local).expanduser()
        if p.is_dir():
            items += _from_dir(p)
        elif p.is_file() and p.suffix.lower() in MANIFEST_EXTENSIONS:
            items += _from_manifest(p)
        elif p.exists() or not glob.has_magic(local):
            items.append(InputItem(_norm(local)))  # a missing file is ledgered as rejected: not_found
        else:
            matches = sorted(glob.glob(local, recursive=True))
            if not matches:
                log.warning("%s matched no file", spec)
            for m in matches:
                if os.path.isfile(m):
                    items.append(InputItem(_norm(m)))
    seen: dict[str, InputItem] = {}
    for it in (InputItem(_storable(i.uri), i.source_caption) for i in items):
        if it.uri not in seen:
            seen[it.uri] = it
        elif it.source_caption and not seen[it.uri].source_caption:
            seen[it.uri] = it
    if len(seen) < len(items):
        log.info("%d duplicate input(s) ignored", len(items) - len(seen))
    return list(seen.values())
