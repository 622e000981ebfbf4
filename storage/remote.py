"""Remote storage through fsspec: input videos at `s3://`, `gs://`, ... URLs, and a dataset OUT in a bucket.

Inputs: `open_input(uri)` opens a remote object as a seekable binary file (block cache, `BLOCK_SIZE` blocks) that
PyAV reads directly; nothing is downloaded whole. `file://` URLs and plain paths are local and never go through
here. Credentials come from the standard environment of each filesystem (AWS_* variables or instance roles for
`s3://`, GOOGLE_APPLICATION_CREDENTIALS for `gs://`) plus optional fsspec storage options given as a JSON object
in CLIPMILL_STORAGE_OPTIONS (e.g. `{"endpoint_url": "http://127.0.0.1:9000"}`; a key naming a protocol, such as
`{"s3": {...}, "gs": {...}}`, holds the options of that protocol only). They are never written to OUT.

A remote OUT: object stores have no atomic rename, so a run writes a local *staging* copy of the dataset with
the normal atomic machinery (storage/shards.py) and `RemoteDataset.push` publishes each commit by uploading its
data files first and its commit record LAST. As on a local disk, the record is the commit point: readers and
resumed runs trust only the files that remote records name. Published data files are deleted from the staging copy
(it keeps the records), so it needs room for about one shard; whole-dataset steps (dedup) download the shards
again. A crash mid-publish leaves at most data files that no record names; they are overwritten by the next commit of that shard number and removed by the final sync.
`RemoteDataset.pull` makes a local folder mirror the remote's committed state (records and run.json; data files
too when asked); the remote is the truth, so a local record the remote lacks (a commit that was never
published) is dropped and its videos run again. One writer per remote OUT: there is no remote lock.

This module imports nothing of clipmill but storage.shards (for the dataset layout).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from clipmill.storage.shards import (
    COMMITS,
    RUN_JSON,
    CommitRecord,
    DatasetError,
    fsync_dir,
    write_json_atomic,
)

log = logging.getLogger(__name__)

STORAGE_OPTIONS_ENV = "CLIPMILL_STORAGE_OPTIONS"
CACHE_ENV = "CLIPMILL_CACHE_DIR"
BLOCK_SIZE = 4 * 2**20  # one ranged GET per 4 MiB block; a block cache keeps the moov atom and the read position
CACHE_BLOCKS = 16
# What a driver forwards to Ray workers (only the ones set) when inputs are remote: workers on other nodes do
# not inherit the driver's environment.
FORWARD_ENV = (
    STORAGE_OPTIONS_ENV, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS",
)
_RECORD = re.compile(r"^part-\d{5,}\.json$")
_DATA = re.compile(r"^part-\d{5,}(\.r\d+)?\.parquet$")


def is_remote(uri: str | os.PathLike) -> bool:
    """True for a URL fsspec must open (`s3://`, `gs://`, `memory://`, ...); False for paths and `file://`."""
    text = os.fspath(uri)
    if "://" not in text:
        return False
    scheme = text.split("://", 1)[0].lower()
    return scheme not in ("file", "local") and bool(re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme))


def file_url_path(uri: str | os.PathLike) -> str:
    """A local path for a plain path or a `file://` URL (percent-escapes decoded); other text is returned as is."""
    text = os.fspath(uri)
    if text.startswith("file://"):
        from urllib.parse import unquote, urlparse  # noqa: PLC0415

        parsed = urlparse(text)
        if parsed.netloc in ("", "localhost"):
            return unquote(parsed.path, errors="surrogateescape")
    return text


def parse_storage_options(text: str) -> dict[str, Any]:
    """Parse storage options given as JSON text; ValueError with a one-line message when it is not an object."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"storage options are not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(data, dict):
        raise ValueError("storage options must be a JSON object, e.g. {\"endpoint_url\": \"http://host:9000\"}")
    return data


def storage_options(protocol: str) -> dict[str, Any]:
    """fsspec options for `protocol` from CLIPMILL_STORAGE_OPTIONS (empty when unset)."""
    raw = os.environ.get(STORAGE_OPTIONS_ENV)
    if not raw:
        return {}
    data = parse_storage_options(raw)
    own = data.get(protocol)
    if isinstance(own, dict):
        return dict(own)
    import fsspec  # noqa: PLC0415

    protocols = set(fsspec.available_protocols())
    return {k: v for k, v in data.items() if not (k in protocols and isinstance(v, dict))}


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL; ValueError when its scheme is unknown or not installed."""
    import fsspec  # noqa: PLC0415

    protocol = url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url, **storage_options(protocol))
    except ImportError as exc:
        raise ValueError(f"{protocol}:// needs an extra package ({exc}); e.g. pip install s3fs / gcsfs") from None
    except ValueError as exc:
        raise ValueError(f"unsupported URL scheme {protocol!r}: {exc}") from None


def normalize(url: str) -> str:
    """The canonical form of a remote URL (what inputs expansion and the ledger store)."""
    fs, path = filesystem(url)
    return fs.unstrip_protocol(path)


def open_input(uri: str) -> BinaryIO:
    """Open a remote object for reading (seekable, block-cached). FileNotFoundError when it does not exist,
    IsADirectoryError for a prefix/directory, ValueError for an unknown scheme."""
    fs, path = filesystem(uri)
    info = fs.info(path)
    if info.get("type") == "directory":
        raise IsADirectoryError(uri)
    return fs.open(path, "rb", block_size=BLOCK_SIZE, cache_type="blockcache",
                   cache_options={"maxblocks": CACHE_BLOCKS})


@contextlib.contextmanager
def opened(uri: str) -> Iterator[BinaryIO]:
    """`open_input` as a context manager that closes the file."""
    f = open_input(uri)
    try:
        yield f
    finally:
        f.close()


def size_of(f: BinaryIO) -> int:
    """Size in bytes of an open fsspec file."""
    size = getattr(f, "size", None)
    if size is None:
        f.seek(0, 2)
        size = f.tell()
    return int(size)


def cache_root() -> Path:
    """Where local copies of remote datasets live: $CLIPMILL_CACHE_DIR, else $XDG_CACHE_HOME/clipmill."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipmill"


def forwarded_env() -> dict[str, str]:
    """The storage-related environment variables that are set (sent to Ray workers for remote inputs)."""
    return {k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}


class RemoteDataset:
    """A dataset OUT at a remote URL, mirrored to and from a local folder (see the module docstring).

    It does not lock the remote (one writer at a time), and it does not let DuckDB read the bucket directly:
    readers work on a local copy made by `local_copy`.
    """

    def __init__(self, url: str) -> None:
        try:
            self.fs, root = filesystem(url)
        except ValueError as exc:
            raise DatasetError(f"{url}: {exc}") from None
        self.url = url.rstrip("/")
        self.root = root.rstrip("/")
        self._records: dict[str, bytes] = {}  # record name -> its bytes, as the remote holds them
        self._files: dict[str, int] = {}  # data files named by remote records -> size
        self.has_run_json = False

    def _path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def local_dir(self, kind: str) -> Path:
        """The local folder of this remote dataset for `kind` ("staging" for runs, "read" for readers)."""
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or str(storage_options(self.url.split("://")[0])
                                                             .get("endpoint_url") or "")
        key = hashlib.blake2b(f"{self.url}|{endpoint}".encode(), digest_size=6).hexdigest()
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", self.url)[-80:].strip("_")
        return cache_root() / kind / f"{name}-{key}"

    def _guard(self, what: str, exc: Exception) -> DatasetError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return DatasetError(f"cannot {what} {self.url}: {type(exc).__name__}: {first[:200]}; check the URL, "
                            f"credentials (AWS_* / {STORAGE_OPTIONS_ENV}) and network")

    def remote_records(self) -> dict[str, bytes]:
        """Name -> bytes of every commit record on the remote (empty for a new dataset)."""
        try:
            self.fs.invalidate_cache()
            try:
                names = self.fs.ls(self._path(COMMITS), detail=False)
            except FileNotFoundError:
                return {}
            out = {}
            for n in sorted(names):
                base = posixpath.basename(n.rstrip("/"))
                if _RECORD.match(base):
                    out[base] = self.fs.cat_file(n)
            return out
        except Exception as exc:  # noqa: BLE001 - OSError, botocore/gcsfs errors: one line
            raise self._guard("list", exc) from exc

    def pull(self, local: Path, *, data: bool, fresh: bool = False) -> int:
        """Make `local` mirror the remote's committed state; returns the number of remote records.

        Always copies commit records and run.json; with `data`, also every data file the records name (re-using
        local files of the right size unless `fresh`) and removes local data files no record names. Local records
        the remote lacks are dropped with their files. Raises DatasetError when the remote cannot be read.
        """
        remote = self.remote_records()
        local = Path(local)
        for sub in ("videos", "clips", COMMITS):
            (local / sub).mkdir(parents=True, exist_ok=True)
        try:
            try:
                run_json = self.fs.cat_file(self._path(RUN_JSON))
            except FileNotFoundError:
                run_json = None
            if run_json is not None:
                write_json_atomic(local / RUN_JSON, json.loads(run_json))
            else:
                (local / RUN_JSON).unlink(missing_ok=True)
            self.has_run_json = run_json is not None
            for p in sorted((local / COMMITS).glob("part-*.json")):
                if p.name not in remote:
                    rec = CommitRecord.from_json(json.loads(p.read_bytes()))
                    p.unlink()
                    for sf in rec.files.values():
                        (local / sf.path).unlink(missing_ok=True)
                    log.info("%s: commit %s was never published to %s; its videos run again", local, p.name,
                             self.url)
            referenced: set[str] = set()
            for name, raw in remote.items():
                rec = CommitRecord.from_json(json.loads(raw))
                for sf in rec.files.values():
                    referenced.add(sf.path)
                    target = local / sf.path
                    if data and (fresh or not target.exists() or target.stat().st_size != sf.bytes):
                        tmp = target.with_name(f".{target.name}.dl")
                        self.fs.get_file(self._path(sf.path), str(tmp))
                        os.replace(tmp, target)
                path = local / COMMITS / name
                if not path.exists() or path.read_bytes() != raw:
                    tmp = path.with_name(f".{name}.tmp")
                    tmp.write_bytes(raw)
                    os.replace(tmp, path)
            if data:
                for sub in ("videos", "clips"):
                    for p in (local / sub).iterdir():
                        if _DATA.match(p.name) and f"{sub}/{p.name}" not in referenced:
                            p.unlink()
            fsync_dir(local / COMMITS)
        except Exception as exc:  # noqa: BLE001 - OSError, botocore/gcsfs errors: one line
            raise self._guard("download", exc) from exc
        self._records = dict(remote)
        self._files = {sf.path: sf.bytes for raw in remote.values()
                       for sf in CommitRecord.from_json(json.loads(raw)).files.values()}
        return len(remote)

    def fetch_data(self, local: Path) -> int:
        """Download the data files that local records name but `local` lacks (e.g. before a whole-dataset
        step on a staging copy made without data). Returns how many were downloaded."""
        n = 0
        try:
            for p in sorted((Path(local) / COMMITS).glob("part-*.json")):
                for sf in CommitRecord.from_json(json.loads(p.read_bytes())).files.values():
                    target = Path(local) / sf.path
                    if not target.exists():
                        tmp = target.with_name(f".{target.name}.dl")
                        self.fs.get_file(self._path(sf.path), str(tmp))
                        os.replace(tmp, target)
                        n += 1
        except Exception as exc:  # noqa: BLE001 - OSError, botocore/gcsfs errors: one line
            raise self._guard("download", exc) from exc
        return n

    def push(self, local: Path, *, prune: bool = False) -> int:
        """Publish `local`'s committed state: for every local record that differs from the remote's, upload its
        data files, then the record (the commit point); then delete remote records that `local` no longer has and
        data files that no record names. `prune` also lists the remote folders and deletes unnamed part files
        left by an interrupted publish. Returns the number of records uploaded."""
        local = Path(local)
        sent = 0
        try:
            current: dict[str, bytes] = {p.name: p.read_bytes() for p in sorted((local / COMMITS).glob("part-*.json"))}
            named: dict[str, int] = {}
            for name, raw in current.items():
                rec = CommitRecord.from_json(json.loads(raw))
                for sf in rec.files.values():
                    named[sf.path] = sf.bytes
                if self._records.get(name) == raw:
                    continue
                for sf in rec.files.values():
                    if self._files.get(sf.path) != sf.bytes:
                        src = local / sf.path
                        if not src.exists():
                            src = src.with_name(f".{src.name}.tmp")  # a commit being rolled forward
                        self.fs.put_file(str(src), self._path(sf.path))
                        self._files[sf.path] = sf.bytes
                self.fs.pipe_file(self._path(f"{COMMITS}/{name}"), raw)  # the commit point on the remote
                self._records[name] = raw
                sent += 1
            for name in sorted(set(self._records) - set(current)):
                self.fs.rm_file(self._path(f"{COMMITS}/{name}"))
                del self._records[name]
            for rel in sorted(set(self._files) - set(named)):
                self._rm_quiet(rel)
                del self._files[rel]
            if prune:
                for sub in ("videos", "clips"):
                    try:
                        names = self.fs.ls(self._path(sub), detail=False)
                    except FileNotFoundError:
                        continue
                    for n in names:
                        base = posixpath.basename(n.rstrip("/"))
                        if _DATA.match(base) and f"{sub}/{base}" not in named:
                            self._rm_quiet(f"{sub}/{base}")
        except Exception as exc:  # noqa: BLE001 - OSError, botocore/gcsfs errors: one line
            raise self._guard("publish to", exc) from exc
        return sent

    def publish_commit(self, local: Path, shard: str, *, drop_local: bool = False) -> None:
        """Publish one new local commit: its data files first, then its record (the commit point). With
        `drop_local` the local data files are deleted once published (the staging copy keeps only records)."""
        name = f"{shard}.json"
        try:
            raw = (Path(local) / COMMITS / name).read_bytes()
            files = CommitRecord.from_json(json.loads(raw)).files.values()
            for sf in files:
                src = Path(local) / sf.path
                if not src.exists():
                    src = src.with_name(f".{src.name}.tmp")  # renamed after the record; same bytes
                self.fs.put_file(str(src), self._path(sf.path))
                self._files[sf.path] = sf.bytes
            self.fs.pipe_file(self._path(f"{COMMITS}/{name}"), raw)
        except Exception as exc:  # noqa: BLE001 - OSError, botocore/gcsfs errors: one line
            raise self._guard("publish to", exc) from exc
        self._records[name] = raw
        if drop_local:
            for sf in files:
                (Path(local) / sf.path).unlink(missing_ok=True)

    def drop_local_data(self, local: Path) -> None:
        """Delete the local data files of records the remote holds unchanged (what a staging copy can forget:
        `fetch_data` brings them back when a whole-dataset step needs them)."""
        for p in sorted((Path(local) / COMMITS).glob("part-*.json")):
            raw = p.read_bytes()
            if self._records.get(p.name) == raw:
                for sf in CommitRecord.from_json(json.loads(raw)).files.values():
                    (Path(local) / sf.path).unlink(missing_ok=True)

    def _rm_quiet(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(rel))

    def push_run_json(self, local: Path, *, strict: bool = False) -> None:
        """Upload run.json. A failure is logged (run.json is a summary; the records are the truth), or raised as
        DatasetError with `strict` (the first upload of a run: an unwritable remote fails before any work)."""
        p = Path(local) / RUN_JSON
        if not p.exists():
            return
        try:
            self.fs.pipe_file(self._path(RUN_JSON), p.read_bytes())
        except Exception as exc:  # noqa: BLE001 - OSError, botocore/gcsfs errors: one line
            if strict:
                raise self._guard("write to", exc) from exc
            log.warning("could not upload %s to %s: %s", RUN_JSON, self.url, exc)


def local_copy(url: str, *, fresh: bool = False) -> Path:
    """A local folder holding the committed state of the remote dataset `url` (records, data files, run.json),
    refreshed from the remote; for read-only tools (sql, stats, verify). DatasetError when `url` holds no
    clipmill dataset or cannot be read."""
    ds = RemoteDataset(url)
    local = ds.local_dir("read")
    n = ds.pull(local, data=True, fresh=fresh)
    if n == 0 and not ds.has_run_json:
        raise DatasetError(f"{url} is not a clipmill dataset (no {COMMITS}/ or {RUN_JSON}); give the OUT of a "
                           f"`clipmill run`")
    return local
