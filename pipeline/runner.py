"""The runner: a recipe becomes a Ray Data plan; finished videos are committed to shards as they stream in.

    inputs -> from_items (one block per video) -> map_batches(stage) for each recipe stage
           -> driver: Assembler groups rows per video -> ShardWriter commits shards atomically

Locally `ray.init()` starts an embedded single-node Ray limited by the recipe's runtime section; with
`address` (or RAY_ADDRESS) the same plan runs on a cluster. CPU stages run as tasks that Ray fuses into
one task per video; stages that hold a model get an actor pool. Decoded frames never leave the workers:
only ledger rows and clip rows (with the clip's MP4 bytes) come back to the driver, which is the only
writer of OUT. This is the only module of clipmill that imports Ray.

Resume: inputs whose URI is already in a commit record are skipped; a video whose content id is already
committed under another URI is ledgered `rejected` (duplicate_content) so no clip_id is written twice.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

import clipmill
from clipmill.pipeline.inputs import InputItem
from clipmill.pipeline.ledger import Assembler, VideoResult
from clipmill.pipeline.plan import INPUT_SCHEMA
from clipmill.pipeline.recipe import Recipe
from clipmill.pipeline.registry import stage_class
from clipmill.pipeline.worker import StageCall, drop_transient, fault_for
from clipmill.storage import ids
from clipmill.storage.schema import (
    CLIPS_SCHEMA,
    SCHEMA_VERSION,
    STATUS_FAILED,
    STATUS_REJECTED,
    VIDEOS_SCHEMA,
)
from clipmill.storage.shards import (
    RUN_JSON,
    ShardWriter,
    committed_keys,
    iter_commit_counts,
    read_commits,
    read_run_json,
    write_json_atomic,
)

log = logging.getLogger(__name__)

COMMIT_EVERY_S = 30.0


class RunError(RuntimeError):
    """The run stopped part-way for a reason outside any one input (e.g. the Ray cluster went away)."""


class RunInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run; finished videos were committed first."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class _GracefulStop:
    """Turns SIGINT/SIGTERM into RunInterrupted in the driver, but never in the middle of a commit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._in_commit = False

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if not self._in_commit:
            raise RunInterrupted(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._in_commit = True
        try:
            yield
        finally:
            self._in_commit = False
        if self.signum is not None:
            raise RunInterrupted(self.signum)


@dataclass
class RunStats:
    """Live counters of a run (what progress shows and the summary prints)."""

    total: int = 0
    skipped: int = 0
    videos: int = 0
    video_seconds: float = 0.0
    clips: int = 0
    kept: int = 0
    shards: int = 0
    status: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    clip_rejects: Counter = field(default_factory=Counter)
    stage_seconds: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    elapsed_s: float = 0.0

    def add(self, res: VideoResult) -> None:
        v = res.video
        self.videos += 1
        self.status[v["status"]] += 1
        if v["status"] != "done":
            self.reasons[_reason_key(v.get("reason"))] += 1
        self.video_seconds += float(v.get("duration_s") or 0.0)
        self.clips += len(res.clips)
        self.kept += sum(1 for c in res.clips if c["kept"])
        for c in res.clips:
            self.clip_rejects.update(c["reject_reasons"])
        self.stage_seconds.update(res.stage_seconds)

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": self.total, "skipped_already_committed": self.skipped, "videos": self.videos,
            "video_seconds": round(self.video_seconds, 3), "clips": self.clips, "kept": self.kept,
            "shards": self.shards, "status": dict(self.status), "video_reasons": dict(self.reasons),
            "clip_rejects": dict(self.clip_rejects), "elapsed_s": round(self.elapsed_s, 3),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
        }


def _reason_key(reason: str | None) -> str:
    """Group reasons for counting: the part before the first ':' (e.g. 'unreadable: moov atom...')."""
    if not reason:
        return "unknown"
    return reason.split(":", 1)[0].strip()


def init_ray(address: str | None, recipe: Recipe) -> bool:
    """Connect to `address` (or RAY_ADDRESS) or start an embedded local Ray; True if we started it."""
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunError(
                f"cannot join the Ray cluster at {address}: {first}. Check the address (ray status on the head "
                f"node); a cluster with token authentication also needs RAY_AUTH_MODE=token (and its token in "
                f"RAY_AUTH_TOKEN or the default token file) in this shell"
            ) from exc
    else:
        rt = recipe.runtime
        store = rt.object_store_mb * 2**20 if rt.object_store_mb else 2 * 2**30
        # address="local": always a new embedded Ray, even when `ray start` left a cluster on this machine
        # (use --address/RAY_ADDRESS to join one).
        ray.init(address="local", num_cpus=rt.num_cpus or os.cpu_count(), object_store_memory=store,
                 include_dashboard=False, **kwargs)
    return True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast with RunError when a plain host:port Ray address does not accept TCP connections
    (ray.init would otherwise retry silently for minutes). Other forms (auto, ray://...) are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit() or not host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RunError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start it (ray start --head) or "
            f"check --address / RAY_ADDRESS"
        ) from None


def build_plan(items: list[InputItem], recipe: Recipe) -> Any:
    """The Ray Dataset that runs every stage of `recipe` over `items` (lazy; nothing runs yet)."""
    import ray  # noqa: PLC0415

    ctx = ray.data.DataContext.get_current()
    if not log.isEnabledFor(logging.INFO):  # Ray Data's plan/progress chatter only with -v
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx.enable_progress_bars = False
    ctx.max_errored_blocks = -1  # a block lost after retries is ledgered `failed` by the driver, not fatal
    # One block per video, typed with INPUT_SCHEMA (so an all-NULL column is still a string column).
    blocks = [pa.Table.from_pylist([{"uri": it.uri, "source_caption": it.source_caption, "error": None}],
                                   schema=INPUT_SCHEMA) for it in items]
    ds = ray.data.from_arrow(blocks)
    # Retries cover crashed workers (OOM, SIGKILL); exceptions are already per-row data. Ray Data's own
    # default is to retry forever, which would hang a run on an input that always kills its worker.
    # (Passed as plain remote args: deprecated in Ray 2.60 with no named replacement yet; ray is pinned <2.64.)
    remote_args = {"max_retries": recipe.runtime.max_task_retries, "retry_exceptions": False}
    for spec in recipe.stages:
        cls = stage_class(spec.name)
        if cls.level == "global":
            continue  # runs after the last commit (run_global_stages)
        call = StageCall(spec.name, spec.config.model_dump_json(), fault_for(spec.name),
                         recipe.runtime.video_timeout_s)
        # A model stage's config may ask for GPUs and actor counts (e.g. aesthetics: num_gpus: 1). On GPUs a
        # model stage gets an actor pool; on CPU it runs inside the fused per-video task, and its model is
        # loaded once per worker process (StageCall's per-process cache), so CPU actors cannot starve tasks.
        num_gpus = getattr(spec.config, "num_gpus", None) or cls.num_gpus
        if cls.uses_model and num_gpus:
            actors = getattr(spec.config, "actors", None) or 1
            ds = ds.map_batches(
                _ActorStage, fn_constructor_args=(call,),
                batch_size=getattr(spec.config, "batch_size", None) or cls.batch_size, batch_format="pyarrow",
                num_cpus=cls.num_cpus, num_gpus=num_gpus or None, concurrency=(1, actors),
            )
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ds = ds.map_batches(call, batch_size=None, batch_format="pyarrow", num_cpus=cls.num_cpus,
                                    **remote_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return ds.map_batches(drop_transient, batch_size=None, batch_format="pyarrow", **remote_args)


class _ActorStage:
    """Actor wrapper for model stages: the stage (and its model) is built once per actor."""

    def __init__(self, call: StageCall) -> None:
        self.call = call

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.call(batch)


@dataclass
class _Pending:
    results: list[VideoResult] = field(default_factory=list)
    media_bytes: int = 0
    since: float = field(default_factory=time.monotonic)


def _lost_video(uri: str, why: str) -> VideoResult:
    try:
        vid = ids.video_id_from_path(uri)
    except OSError:
        vid = "uri-" + hashlib.blake2b(uri.encode(), digest_size=8).hexdigest()
    return VideoResult({"video_id": vid, "uri": uri, "status": STATUS_FAILED, "reason": why, "n_clips": 0,
                        "n_kept": 0, "committed_at": dt.datetime.now(dt.timezone.utc)}, [])


def run(
    items: list[InputItem],
    out: str | os.PathLike,
    recipe: Recipe,
    *,
    address: str | None = None,
    limit: int | None = None,
    on_progress: Callable[[RunStats], None] | None = None,
    argv: list[str] | None = None,
) -> RunStats:
    """Run `recipe` over `items` into dataset OUT, resuming what is already committed there.

    Raises DatasetError (from storage) when OUT cannot be used; bad inputs never raise.
    """
    out = Path(out)
    stats = RunStats()
    with ShardWriter(out) as writer:
        done_uris, done_vids = committed_keys(out)
        todo = [it for it in items if it.uri not in done_uris]
        stats.skipped = len(items) - len(todo)
        if limit is not None:
            todo = todo[: max(0, limit)]
        stats.total = len(todo)
        meta = _start_run_json(out, recipe, argv, len(items), stats.skipped)
        if todo:
            _stream_with_ray(todo, recipe, writer, out, meta, stats, done_vids, on_progress, address)
        stats.elapsed_s = time.monotonic() - stats.started
        _finish_run_json(out, meta, stats)
    run_global_stages(out, recipe)
    return stats


def _stream_with_ray(todo: list[InputItem], recipe: Recipe, writer: ShardWriter, out: Path, meta: dict[str, Any],
                     stats: RunStats, done_vids: set[str], on_progress: Callable[[RunStats], None] | None,
                     address: str | None) -> None:
    # ray.init and ray.shutdown install (or reset) SIGINT/SIGTERM handlers of their own; keep the caller's,
    # so that a signal at any time stops the run the same way.
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    started_ray = init_ray(address, recipe)
    _restore_handlers(saved)
    import ray  # noqa: PLC0415

    try:
        _stream(todo, recipe, writer, out, meta, stats, done_vids, on_progress)
    except ray.exceptions.RayError as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise RunError(
            f"the Ray cluster failed mid-run ({type(exc).__name__}: {first}); {stats.shards} shard(s) committed "
            f"this run are kept; run the same command again to resume"
        ) from exc
    finally:
        if started_ray:
            ray.shutdown()
        _restore_handlers(saved)


def _restore_handlers(saved: dict[int, Any]) -> None:
    for sig, handler in saved.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


def run_global_stages(out: Path, recipe: Recipe) -> dict[str, Any]:
    """Run the recipe's whole-dataset steps (e.g. dedup) after the run; their reports go into run.json."""
    reports: dict[str, Any] = {}
    for spec in recipe.stages:
        cls = stage_class(spec.name)
        if cls.level != "global":
            continue
        t0 = time.monotonic()
        report = cls(spec.config).run_global(str(out))  # type: ignore[attr-defined]
        reports[spec.name] = dict(report, seconds=round(time.monotonic() - t0, 3))
        log.info("%s: %s", spec.name, reports[spec.name])
    if reports:
        with ShardWriter(out):  # the lock, so run.json is not rewritten under another writer
            meta = read_run_json(out) or {}
            meta.setdefault("runs", [{}])[-1]["global_steps"] = reports
            write_json_atomic(out / RUN_JSON, meta)
    return reports


def _stream(todo: list[InputItem], recipe: Recipe, writer: ShardWriter, out: Path, meta: dict[str, Any],
            stats: RunStats, done_vids: set[str], on_progress: Callable[[RunStats], None] | None) -> None:
    ds = build_plan(todo, recipe)
    asm = Assembler(media=recipe.write.media, thumbnails=recipe.write.thumbnails)
    pending = _Pending()
    seen_vids: dict[str, str] = {}
    seen_uris: set[str] = set()
    limit_bytes = int(recipe.write.shard_mb * 2**20)

    def flush() -> None:
        if not pending.results:
            return
        videos = [r.video for r in pending.results]
        clips = [c for r in pending.results for c in r.clips]
        with stop.deferred():  # a signal during a commit waits until the commit is complete
            writer.commit(pa.Table.from_pylist(videos, schema=VIDEOS_SCHEMA),
                          pa.Table.from_pylist(clips, schema=CLIPS_SCHEMA))
        stats.shards += 1
        for r in pending.results:
            stats.add(r)
        pending.results.clear()
        pending.media_bytes = 0
        pending.since = time.monotonic()
        stats.elapsed_s = time.monotonic() - stats.started
        _update_run_json(out, meta, stats)

    def accept(res: VideoResult) -> None:
        vid, uri = res.video["video_id"], res.video["uri"]
        seen_uris.add(uri)
        other = seen_vids.get(vid) or (vid if vid in done_vids else None)
        if other is not None:
            res.video.update(status=STATUS_REJECTED, reason=f"duplicate_content: same bytes as {other}",
                             n_clips=0, n_kept=0)
            res.clips = []
        else:
            seen_vids[vid] = uri
        pending.results.append(res)
        pending.media_bytes += res.media_bytes
        if (len(pending.results) >= recipe.write.shard_videos or pending.media_bytes >= limit_bytes
                or time.monotonic() - pending.since >= COMMIT_EVERY_S):
            flush()

    stop = _GracefulStop()
    with stop.installed():  # from the first batch to the last commit, a signal stops the run cleanly
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
                for res in asm.add(batch.to_pylist()):
                    accept(res)
                if on_progress:
                    on_progress(_live_view(stats, pending))
            for uri in asm.incomplete:
                log.warning("%s: some clip rows were lost (worker failure); ledgered as failed", uri)
            for it in todo:
                if it.uri not in seen_uris:
                    log.warning("%s: no result came back (worker crashed after retries); ledgered as failed",
                                it.uri)
                    accept(_lost_video(it.uri, "worker_lost: the task processing this video failed after retries"))
            flush()
        except RunInterrupted:
            stop.signum = None
            flush()  # videos that finished before the signal are committed; the rest are re-run on resume
            stats.elapsed_s = time.monotonic() - stats.started
            _update_run_json(out, meta, stats)
            raise
    if on_progress:
        on_progress(stats)


def _live_view(stats: RunStats, pending: _Pending) -> RunStats:
    view = RunStats(total=stats.total, skipped=stats.skipped, videos=stats.videos,
                    video_seconds=stats.video_seconds, clips=stats.clips, kept=stats.kept, shards=stats.shards,
                    status=Counter(stats.status), reasons=Counter(stats.reasons),
                    clip_rejects=Counter(stats.clip_rejects), stage_seconds=Counter(stats.stage_seconds),
                    started=stats.started)
    for r in pending.results:
        view.add(r)
    view.elapsed_s = time.monotonic() - stats.started
    return view


def _versions() -> dict[str, str]:
    import av  # noqa: PLC0415
    import duckdb  # noqa: PLC0415
    import ray  # noqa: PLC0415

    return {"clipmill": clipmill.__version__, "python": sys.version.split()[0], "ray": ray.__version__,
            "pyarrow": pa.__version__, "av": av.__version__, "duckdb": duckdb.__version__}


def _start_run_json(out: Path, recipe: Recipe, argv: list[str] | None, n_inputs: int, skipped: int) -> dict:
    meta = read_run_json(out) or {"schema_version": SCHEMA_VERSION, "created_at": _now(), "runs": []}
    meta["schema_version"] = SCHEMA_VERSION
    meta["recipe"] = recipe.to_json()
    meta["versions"] = _versions()
    meta["runs"].append({"started_at": _now(), "argv": argv or [], "inputs": n_inputs,
                         "skipped_already_committed": skipped, "finished_at": None})
    _update_run_json(out, meta, None)
    return meta


def _update_run_json(out: Path, meta: dict[str, Any], stats: RunStats | None) -> None:
    meta["updated_at"] = _now()
    meta["counts"] = iter_commit_counts(read_commits(out))
    if stats is not None:
        meta["runs"][-1]["progress"] = stats.to_json()
    try:
        write_json_atomic(out / RUN_JSON, meta)
    except OSError as exc:  # run.json is a summary; the commit records are the truth
        log.warning("could not update %s: %s", out / RUN_JSON, exc)


def _finish_run_json(out: Path, meta: dict[str, Any], stats: RunStats) -> None:
    meta["runs"][-1]["finished_at"] = _now()
    _update_run_json(out, meta, stats)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
