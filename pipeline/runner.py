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

Remote OUT (`s3://...`, any fsspec URL): the run writes a local staging copy with the same atomic machinery and
publishes every commit to the remote, data files first and the commit record last (storage/remote.py).

Metrics: every stage call is metered inside the worker (rows in/out, busy seconds, source seconds, node); the
driver aggregates them into `runs[-1].metrics` of run.json: per-stage totals and throughput, and queue depths over
time (videos inside Ray, videos awaiting commit, and per stage the rows waiting for it and running in it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
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

import numpy as np
import pyarrow as pa

import clipmill
from clipmill.pipeline.inputs import InputItem
from clipmill.pipeline.ledger import Assembler, VideoResult
from clipmill.pipeline.plan import INPUT_SCHEMA
from clipmill.pipeline.recipe import Recipe
from clipmill.pipeline.registry import stage_class
from clipmill.pipeline.worker import StageCall, drop_transient, fault_for
from clipmill.storage import ids, remote
from clipmill.storage.schema import (
    CLIPS_SCHEMA,
    SCHEMA_VERSION,
    STATUS_FAILED,
    STATUS_REJECTED,
    VIDEOS_SCHEMA,
)
from clipmill.storage.shards import (
    RUN_JSON,
    CommitRecord,
    ShardWriter,
    check_compatible,
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
        _enable_token_auth()
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:  # noqa: BLE001 - ConnectionError, AuthenticationError, ...: one line for the user
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


def _ray_token_available() -> bool:
    """True when this shell has a Ray auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    return os.path.isfile(path)


def _enable_token_auth() -> None:
    """Join clusters that use token authentication (what `ray start --head` sets up since Ray 2.59): when
    RAY_AUTH_MODE is unset and a token is available, use it. A token-mode driver also joins clusters that run
    without authentication (checked with Ray 2.60); RAY_AUTH_MODE set by the user is left as it is."""
    if os.environ.get("RAY_AUTH_MODE") or not _ray_token_available():
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray caches its config at import: refresh it, as ray.init does when it turns token mode on locally
        from ray._raylet import Config  # noqa: PLC0415

        Config.initialize("")
    except (ImportError, AttributeError):  # another Ray layout: the variable still reaches child processes
        log.debug("could not refresh Ray's config after setting RAY_AUTH_MODE=token")


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
    ctx.enable_progress_bars = ray_progress_bars()
    if ctx.enable_progress_bars:
        ctx.use_ray_tqdm = False  # plain tqdm on this process's stderr (Ray's own tqdm goes through worker logs)
    ctx.max_errored_blocks = -1  # a block lost after retries is ledgered `failed` by the driver, not fatal
    # One block per video, typed with INPUT_SCHEMA (so an all-NULL column is still a string column).
    blocks = [pa.Table.from_pylist([{"uri": it.uri, "source_caption": it.source_caption, "error": None}],
                                   schema=INPUT_SCHEMA) for it in items]
    ds = ray.data.from_arrow(blocks)
    # Retries cover crashed workers (OOM, SIGKILL); exceptions are already per-row data. Ray Data's own
    # default is to retry forever, which would hang a run on an input that always kills its worker.
    # (Passed as plain remote args: deprecated in Ray 2.60 with no named replacement yet; ray is pinned <2.64.)
    remote_args: dict[str, Any] = {"max_retries": recipe.runtime.max_task_retries, "retry_exceptions": False}
    env = remote.forwarded_env() if any(remote.is_remote(it.uri) for it in items) else {}
    extra: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}  # workers on other nodes need them
    for spec in recipe.stages:
        cls = stage_class(spec.name)
        if cls.level == "global":
            continue  # runs after the last commit (run_global_stages)
        call = Metered(StageCall(spec.name, spec.config.model_dump_json(), fault_for(spec.name),
                                 recipe.runtime.video_timeout_s))
        # A model stage's config may ask for GPUs and actor counts (e.g. aesthetics: num_gpus: 1). On GPUs a
        # model stage gets an actor pool; on CPU it runs inside the fused per-video task, and its model is
        # loaded once per worker process (StageCall's per-process cache), so CPU actors cannot starve tasks.
        num_gpus = getattr(spec.config, "num_gpus", None) or cls.num_gpus
        if cls.uses_model and num_gpus:
            actors = getattr(spec.config, "actors", None) or 1
            ds = ds.map_batches(
                _ActorStage, fn_constructor_args=(call,),
                batch_size=getattr(spec.config, "batch_size", None) or cls.batch_size, batch_format="pyarrow",
                num_cpus=cls.num_cpus, num_gpus=num_gpus or None, concurrency=(1, actors), **extra,
            )
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ds = ds.map_batches(call, batch_size=None, batch_format="pyarrow", num_cpus=cls.num_cpus,
                                    **remote_args, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return ds.map_batches(drop_transient, batch_size=None, batch_format="pyarrow", **remote_args, **extra)


RAY_PROGRESS_ENV = "CLIPMILL_RAY_PROGRESS"


def ray_progress_bars() -> bool:
    """Whether Ray Data shows its per-operator progress bars: CLIPMILL_RAY_PROGRESS=1/0 decides; by default
    they show with -v when stderr is a terminal (clipmill's own bar is the default view)."""
    flag = os.environ.get(RAY_PROGRESS_ENV)
    if flag is not None:
        return flag.strip().lower() not in ("", "0", "false", "no", "off")
    return log.isEnabledFor(logging.INFO) and sys.stderr.isatty()


METRICS_COLUMN = "_metrics"  # JSON list of per-call meter entries, on the first row of each output batch
_NODE_ID: list[str] = []


def _node_id() -> str:
    if not _NODE_ID:
        try:
            import ray  # noqa: PLC0415

            _NODE_ID.append(ray.get_runtime_context().get_node_id()[:12])
        except Exception:  # noqa: BLE001 - outside Ray (a test calling the stage directly)
            _NODE_ID.append(socket.gethostname())
    return _NODE_ID[0]


def _source_seconds(t: pa.Table) -> float:
    """Seconds of source video that the rows of `t` stand for: a clip row its span, a video row its duration."""
    cols = [c for c in ("clip_index", "start_s", "end_s", "duration_s") if c in t.column_names]
    total = 0.0
    for r in t.select(cols).to_pylist():
        ci, a, b = r.get("clip_index"), r.get("start_s"), r.get("end_s")
        if ci is not None and ci >= 0 and a is not None and b is not None:
            total += float(b) - float(a)
        elif r.get("duration_s"):
            total += float(r["duration_s"])
    return total


@dataclass(frozen=True)
class Metered:
    """A stage call that meters itself: rows in/out, busy seconds, source seconds and node of every batch.

    The entries of earlier stages travel with the batch (column `_metrics`, on its first row), so they reach
    the driver with the rows; a batch that comes out empty loses them (its rows are gone anyway).
    """

    call: Callable[[pa.Table], pa.Table]

    @property
    def name(self) -> str:
        return getattr(self.call, "name", "stage")

    def __call__(self, batch: pa.Table) -> pa.Table:
        prior: list[dict[str, Any]] = []
        if METRICS_COLUMN in batch.column_names:
            for text in batch[METRICS_COLUMN].to_pylist():
                if text:
                    prior.extend(json.loads(text))
            batch = batch.drop_columns([METRICS_COLUMN])
        t0 = time.perf_counter()
        out = self.call(batch)
        busy = time.perf_counter() - t0
        entry = {"stage": self.name, "rows_in": batch.num_rows, "rows_out": out.num_rows, "busy_s": busy,
                 "video_s": _source_seconds(out), "node": _node_id(), "t": time.time()}
        if METRICS_COLUMN in out.column_names:
            out = out.drop_columns([METRICS_COLUMN])
        col = [json.dumps(prior + [entry])] + [None] * (out.num_rows - 1) if out.num_rows else []
        return out.append_column(METRICS_COLUMN, pa.array(col, pa.string()))


class _ActorStage:
    """Actor wrapper for model stages: the stage (and its model) is built once per actor."""

    def __init__(self, call: Metered) -> None:
        self.call = call

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.call(batch)


@dataclass
class _StageMeter:
    rows_in: int = 0
    rows_out: int = 0
    busy_s: float = 0.0
    video_s: float = 0.0
    batches: int = 0
    nodes: Counter = field(default_factory=Counter)


class RunMetrics:
    """Per-stage throughput and queue depths of one run, from the meter entries the workers send back.

    Queue depths are counted in 1 s bins from the entries' times (worker clocks): for stage k, rows *waiting*
    = rows that left stage k-1 (all inputs, for the first stage) minus rows that entered stage k; rows
    *running* = entered minus left. The driver adds videos *in Ray* (given to Ray Data, not back yet) and
    videos *awaiting commit* (back, not yet in a committed shard). Series are downsampled (peak per window) to
    at most `MAX_POINTS` points; means are over all bins.
    """

    MAX_POINTS = 120

    def __init__(self, stages: list[str], total: int) -> None:
        self.t0 = time.time()
        self.total = total
        self.order = list(stages)
        self.stages = {name: _StageMeter() for name in stages}
        self._ev: dict[str, dict[str, Counter]] = {
            name: {"started": Counter(), "ended_in": Counter(), "ended_out": Counter()} for name in stages}
        self._received: Counter = Counter()
        self._committed: Counter = Counter()

    def _bin(self, t: float) -> int:
        return max(0, int(t - self.t0))

    def add_entries(self, entries: list[dict[str, Any]]) -> None:
        for e in entries:
            name = e.get("stage")
            if name not in self.stages:
                continue
            m = self.stages[name]
            m.rows_in += int(e["rows_in"])
            m.rows_out += int(e["rows_out"])
            m.busy_s += float(e["busy_s"])
            m.video_s += float(e["video_s"])
            m.batches += 1
            m.nodes[str(e["node"])] += int(e["rows_in"])
            ev = self._ev[name]
            ev["started"][self._bin(float(e["t"]) - float(e["busy_s"]))] += int(e["rows_in"])
            ev["ended_in"][self._bin(float(e["t"]))] += int(e["rows_in"])
            ev["ended_out"][self._bin(float(e["t"]))] += int(e["rows_out"])

    def received(self, n: int = 1) -> None:
        self._received[self._bin(time.time())] += n

    def committed(self, n: int) -> None:
        self._committed[self._bin(time.time())] += n

    def _cum(self, c: Counter, n: int) -> np.ndarray:
        arr = np.zeros(n, dtype=np.float64)
        for k, v in c.items():
            arr[min(k, n - 1)] += v
        return np.cumsum(arr)

    @staticmethod
    def _before(cum: np.ndarray) -> np.ndarray:
        """Cumulative counts at the start of each bin (cum is at the end)."""
        return np.concatenate([[0.0], cum[:-1]])

    def _series(self, x: np.ndarray, step: int) -> list[float]:
        return [float(x[i:i + step].max()) for i in range(0, len(x), step)]

    def to_json(self, elapsed_s: float) -> dict[str, Any]:
        n = max(1, int(time.time() - self.t0) + 1)
        step = max(1, -(-n // self.MAX_POINTS))
        received = self._cum(self._received, n)
        # peaks within each bin: counts only rise between the events that lower them, so a bin's peak of videos
        # in Ray is before its first receipt, and of videos awaiting commit after its receipts, before its commits
        in_ray = self.total - self._before(received)
        awaiting = received - self._before(self._cum(self._committed, n))
        queue: dict[str, Any] = {"bin_s": 1, "step_s": step, "t_s": list(range(0, n, step)),
                                 "videos_in_ray": self._series(in_ray, step),
                                 "videos_awaiting_commit": self._series(awaiting, step),
                                 "stage_waiting_rows": {}, "stage_running_rows": {}}
        stages: dict[str, Any] = {}
        arrived = np.full(n, float(self.total))
        for name in self.order:
            m, ev = self.stages[name], self._ev[name]
            started = self._cum(ev["started"], n)
            waiting = np.maximum(arrived - started, 0)
            running = np.maximum(started - self._cum(ev["ended_in"], n), 0)
            arrived = self._cum(ev["ended_out"], n)
            queue["stage_waiting_rows"][name] = self._series(waiting, step)
            queue["stage_running_rows"][name] = self._series(running, step)
            stages[name] = {
                "rows_in": m.rows_in, "rows_out": m.rows_out, "batches": m.batches, "busy_s": round(m.busy_s, 3),
                "rows_per_busy_s": round(m.rows_in / m.busy_s, 3) if m.busy_s else None,
                "video_s": round(m.video_s, 3),
                "video_s_per_busy_s": round(m.video_s / m.busy_s, 3) if m.busy_s else None,
                "video_s_per_wall_s": round(m.video_s / elapsed_s, 3) if elapsed_s > 0 else None,
                "waiting_rows_max": float(waiting.max()), "waiting_rows_mean": round(float(waiting.mean()), 3),
                "running_rows_max": float(running.max()), "running_rows_mean": round(float(running.mean()), 3),
                "nodes": dict(m.nodes),
            }
        nodes: Counter = Counter()
        for m in self.stages.values():
            nodes.update(m.nodes)
        return {
            "stage_order": list(self.order), "stages": stages, "queue": queue, "nodes": dict(nodes),
            "videos_in_ray_max": float(in_ray.max()), "videos_in_ray_mean": round(float(in_ray.mean()), 3),
            "videos_awaiting_commit_max": float(awaiting.max()),
            "videos_awaiting_commit_mean": round(float(awaiting.mean()), 3),
        }


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


@dataclass
class _Target:
    """Where a run writes: the local dataset folder (OUT itself, or the staging copy of a remote OUT), the remote
    it publishes to, and the run's metrics."""

    local: Path
    remote: remote.RemoteDataset | None = None
    metrics: RunMetrics | None = None

    def published(self, record: CommitRecord) -> None:
        if self.remote is not None:
            self.remote.publish_commit(self.local, record.shard, drop_local=True)

    def run_json_written(self, strict: bool = False) -> None:
        if self.remote is not None:
            self.remote.push_run_json(self.local, strict=strict)


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

    OUT is a local folder or a remote fsspec URL (`s3://bucket/ds`); a remote OUT is written through a local
    staging copy under the cache folder (storage/remote.py) and every commit is published as it happens.
    Raises DatasetError (from storage) when OUT cannot be used; bad inputs never raise.
    """
    target = _Target(Path(remote.file_url_path(out)))
    if remote.is_remote(os.fspath(out)):
        target.remote = remote.RemoteDataset(os.fspath(out))
        target.local = target.remote.local_dir("staging")
    local = target.local
    stats = RunStats()
    with ShardWriter(local) as writer:
        if target.remote is not None:
            target.remote.pull(local, data=False)  # the remote is the truth: records and run.json
            check_compatible(local)
            writer.recover()
            target.remote.push(local, prune=True)  # removes data files an interrupted publish left unnamed
        done_uris, done_vids = committed_keys(local)
        todo = [it for it in items if it.uri not in done_uris]
        stats.skipped = len(items) - len(todo)
        if limit is not None:
            todo = todo[: max(0, limit)]
        stats.total = len(todo)
        meta = _start_run_json(target, recipe, argv, len(items), stats.skipped)
        if todo:
            _stream_with_ray(todo, recipe, writer, target, meta, stats, done_vids, on_progress, address)
        stats.elapsed_s = time.monotonic() - stats.started
        _finish_run_json(target, meta, stats)
    if target.remote is not None and any(stage_class(s.name).level == "global" for s in recipe.stages):
        with ShardWriter(local):
            target.remote.fetch_data(local)  # whole-dataset steps read every shard
    run_global_stages(local, recipe)
    if target.remote is not None:
        with ShardWriter(local):
            target.remote.push(local, prune=True)
            target.remote.drop_local_data(local)
            target.run_json_written()
    return stats


def _stream_with_ray(todo: list[InputItem], recipe: Recipe, writer: ShardWriter, target: _Target,
                     meta: dict[str, Any], stats: RunStats, done_vids: set[str],
                     on_progress: Callable[[RunStats], None] | None, address: str | None) -> None:
    # ray.init and ray.shutdown install (or reset) SIGINT/SIGTERM handlers of their own; keep the caller's,
    # so that a signal at any time stops the run the same way.
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    started_ray = init_ray(address, recipe)
    _restore_handlers(saved)
    import ray  # noqa: PLC0415

    try:
        _stream(todo, recipe, writer, target, meta, stats, done_vids, on_progress)
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


def _stream(todo: list[InputItem], recipe: Recipe, writer: ShardWriter, target: _Target, meta: dict[str, Any],
            stats: RunStats, done_vids: set[str], on_progress: Callable[[RunStats], None] | None) -> None:
    ds = build_plan(todo, recipe)
    metrics = target.metrics = RunMetrics(
        [s.name for s in recipe.stages if stage_class(s.name).level != "global"], len(todo))
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
            record = writer.commit(pa.Table.from_pylist(videos, schema=VIDEOS_SCHEMA),
                                   pa.Table.from_pylist(clips, schema=CLIPS_SCHEMA))
            target.published(record)  # remote OUT: data files, then the record
        stats.shards += 1
        metrics.committed(len(pending.results))
        for r in pending.results:
            stats.add(r)
        pending.results.clear()
        pending.media_bytes = 0
        pending.since = time.monotonic()
        stats.elapsed_s = time.monotonic() - stats.started
        _update_run_json(target, meta, stats)

    def accept(res: VideoResult) -> None:
        vid, uri = res.video["video_id"], res.video["uri"]
        seen_uris.add(uri)
        metrics.received()
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
                rows = batch.to_pylist()
                for r in rows:
                    if r.get(METRICS_COLUMN):
                        metrics.add_entries(json.loads(r[METRICS_COLUMN]))
                for res in asm.add(rows):
                    accept(res)
                if on_progress:
                    on_progress(_live_view(stats, pending))
            if asm.duplicate_rows:
                log.warning("%d rows of videos already received came back again (a retried task) and were ignored",
                            asm.duplicate_rows)
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
            _update_run_json(target, meta, stats)
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


_SECRET_OPTIONS = ("--storage-options",)


def redact_argv(argv: list[str]) -> list[str]:
    """argv with the values of options that may hold credentials (--storage-options) replaced by '<redacted>'."""
    out: list[str] = []
    hide = False
    for a in argv:
        if hide:
            out.append("<redacted>")
            hide = False
        elif a in _SECRET_OPTIONS:
            out.append(a)
            hide = True
        elif a.startswith(tuple(f"{o}=" for o in _SECRET_OPTIONS)):
            out.append(a.split("=", 1)[0] + "=<redacted>")
        else:
            out.append(a)
    return out


def _start_run_json(target: _Target, recipe: Recipe, argv: list[str] | None, n_inputs: int, skipped: int) -> dict:
    out = target.local
    meta = read_run_json(out) or {"schema_version": SCHEMA_VERSION, "created_at": _now(), "runs": []}
    meta["schema_version"] = SCHEMA_VERSION
    meta["recipe"] = recipe.to_json()
    meta["versions"] = _versions()
    meta["runs"].append({"started_at": _now(), "argv": redact_argv(argv or []), "inputs": n_inputs,
                         "skipped_already_committed": skipped, "finished_at": None})
    _update_run_json(target, meta, None, strict=True)
    return meta


def _update_run_json(target: _Target, meta: dict[str, Any], stats: RunStats | None, *, strict: bool = False) -> None:
    out = target.local
    meta["updated_at"] = _now()
    meta["counts"] = iter_commit_counts(read_commits(out))
    if stats is not None:
        meta["runs"][-1]["progress"] = stats.to_json()
        if target.metrics is not None:
            meta["runs"][-1]["metrics"] = target.metrics.to_json(stats.elapsed_s)
    try:
        write_json_atomic(out / RUN_JSON, meta)
    except OSError as exc:  # run.json is a summary; the commit records are the truth
        log.warning("could not update %s: %s", out / RUN_JSON, exc)
        return
    target.run_json_written(strict=strict)  # strict at the start: an unwritable remote fails before any work


def _finish_run_json(target: _Target, meta: dict[str, Any], stats: RunStats) -> None:
    meta["runs"][-1]["finished_at"] = _now()
    _update_run_json(target, meta, stats)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
