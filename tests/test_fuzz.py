"""Fuzz and property tests: whatever bytes, names or manifests come in, every input is ledgered exactly once.

The per-video chain (probe -> split -> transcode -> frames -> quality) runs in-process on Arrow batches, the
way the runner's tasks call it (`StageCall` on `pa.Table` batches, then `Assembler`), over:

* byte-level mutations (flips, overwrites with boundary integers, inserts, deletes, duplicated chunks),
  truncations at random points and corrupted headers of small valid videos in five containers/codecs;
* extreme but valid or odd inputs: 1x1 and 2x2 video, headers that claim 8K, a single frame, variable
  frame rate, rotated streams, PTS offsets, a mid-stream size change;
* hostile file names (non-UTF-8 bytes, 255-byte names, quotes, newlines, `<script>`), through
  `expand_inputs` and the chain;
* malformed manifests (hypothesis-generated JSONL/CSV/Parquet rows) through `expand_inputs`;
* one end-to-end run through the real Ray runner over a folder of fuzzed and valid files.

Each input must give one ledger row with status done|rejected|failed (a reason when not done), the chain
must never raise, and each input must finish within `PER_INPUT_LIMIT_S` (a hang fails the test; the limit is
generous because the machine is shared: the inputs take well under a second each). Hypothesis runs
derandomized (fixed examples, no example database), so CI sees the same inputs every time.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import threading
import urllib.parse
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipmill import badfiles
from clipmill.pipeline.inputs import InputError, InputItem, expand_inputs
from clipmill.pipeline.ledger import Assembler, VideoResult
from clipmill.pipeline.plan import INPUT_SCHEMA
from clipmill.pipeline.recipe import parse_recipe
from clipmill.pipeline.worker import StageCall

PER_INPUT_LIMIT_S = 60.0
STATUSES = {"done", "rejected", "failed"}

# Small clips so that a 1-2 s seed gives clips at all; transcode/frames at tiny sizes to stay fast. min_side 1
# lets even a 1x1 video (and mutated headers with tiny sizes) go through every stage instead of stopping at
# the probe.
CHAIN_RECIPE = {
    "name": "fuzz",
    "stages": [
        {"probe": {"min_side": 1}},
        {"split": {"min_s": 0.25, "max_s": 1.0, "trim_frames": 1}},
        {"transcode": {"max_side": 64, "preset": "ultrafast"}},
        {"frames": {"n": 4, "max_side": 64}},
        {"quality": {"brisque": False}},
    ],
}

FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------------
# The chain, with a wall-clock guard
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chain() -> list[StageCall]:
    """The stage calls of CHAIN_RECIPE, built from the validated recipe exactly as the runner builds them."""
    recipe = parse_recipe(CHAIN_RECIPE, "fuzz")
    return [StageCall(spec.name, spec.config.model_dump_json()) for spec in recipe.stages]


def run_with_deadline(fn, limit_s: float, what: str) -> Any:
    """Run `fn()` in a daemon thread and return its result; fail the test if it raises or outlives `limit_s`.

    A thread cannot be killed, so a hung call keeps its thread; the test still fails at once with the input.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"fuzz:{what[:40]}", daemon=True)
    worker.start()
    worker.join(limit_s)
    if worker.is_alive():
        pytest.fail(f"{what}: still running after {limit_s:.0f} s (hang)")
    if "error" in box:
        exc = box["error"]
        raise AssertionError(f"{what}: the chain raised {type(exc).__name__}: {exc}") from exc
    return box["value"]


def chain_rows(calls: list[StageCall], uri: str) -> list[dict[str, Any]]:
    """Work rows of one input after every stage of `calls` (one input block, as `build_plan` makes it)."""
    batch = pa.Table.from_pylist([{"uri": uri, "source_caption": None, "error": None}], schema=INPUT_SCHEMA)
    for call in calls:
        batch = call(batch)
    return batch.to_pylist()


def ledger_once(calls: list[StageCall], uri: str, limit_s: float = PER_INPUT_LIMIT_S) -> VideoResult:
    """Run the chain on `uri` under a deadline and check the ledger contract; return the video's result.

    Contract: the chain returns normally; `Assembler` completes exactly one video for the input, with that
    uri, status done|rejected|failed, a reason when not done, and clips only when done.
    """
    rows = run_with_deadline(lambda: chain_rows(calls, uri), limit_s, repr(uri))
    assert rows, f"{uri!r}: the chain returned no row"
    assert {r["uri"] for r in rows} == {uri}, f"{uri!r}: rows carry other uris"
    asm = Assembler()
    done = asm.add(rows)
    assert len(done) == 1 and not asm.incomplete, (
        f"{uri!r}: {len(done)} ledger rows, incomplete {asm.incomplete}; clip indexes "
        f"{[r.get('clip_index') for r in rows]}, n_clips {[r.get('n_clips') for r in rows]}")
    res = done[0]
    video = res.video
    assert video["uri"] == uri
    assert video["video_id"], f"{uri!r}: no video_id"
    assert video["status"] in STATUSES, video["status"]
    if video["status"] == "done":
        assert video["n_clips"] == len(res.clips)
        for clip in res.clips:
            assert clip["n_frames"] == clip["end_frame"] - clip["start_frame"] > 0, clip["clip_id"]
            assert clip["media"], f"{uri!r}: kept clip {clip['clip_id']} without media"
    else:
        assert video["reason"], f"{uri!r}: status {video['status']} without a reason"
        assert res.clips == []
    return res


# --------------------------------------------------------------------------------------------------
# Byte-level fuzzing of small valid videos
# --------------------------------------------------------------------------------------------------

# family -> (maker, file suffix). Each seed is 1-2 s at 160x96, small enough that a chain run takes ~0.1 s.
SEED_MAKERS = {
    "h264_mp4": (lambda d: badfiles.make_valid(d, name="seed.mp4", n=48, gop=12), ".mp4"),
    "vp9_webm": (lambda d: badfiles.make_vp9_webm(d, n=24, name="seed.webm"), ".webm"),
    "hevc_mkv": (lambda d: badfiles.make_hevc_mkv(d, n=24, name="seed.mkv"), ".mkv"),
    "mpeg4_avi": (lambda d: badfiles.make_mpeg4_avi(d, n=24, name="seed.avi"), ".avi"),
    "av1_mkv": (lambda d: badfiles.make_av1_mkv(d, n=24, name="seed.mkv"), ".mkv"),
}
FAMILIES = sorted(SEED_MAKERS)


@pytest.fixture(scope="session")
def seeds(tmp_path_factory) -> dict[str, tuple[bytes, str]]:
    """family -> (bytes of a valid seed video, suffix), built once per session."""
    out = {}
    for family, (make, suffix) in SEED_MAKERS.items():
        path = make(tmp_path_factory.mktemp(f"seed_{family}"))
        out[family] = (path.read_bytes(), suffix)
    return out


@pytest.fixture(scope="session")
def fuzz_dir(tmp_path_factory) -> Path:
    """A scratch folder for mutated files (one file per family, rewritten for every example)."""
    return tmp_path_factory.mktemp("fuzzed")


def test_seeds_are_valid(chain, seeds, fuzz_dir):
    """The unmutated seeds go through the whole chain with clips, so the mutations start from real video."""
    for family, (data, suffix) in seeds.items():
        path = fuzz_dir / f"clean_{family}{suffix}"
        path.write_bytes(data)
        res = ledger_once(chain, str(path))
        assert res.video["status"] == "done" and res.video["n_clips"] >= 1, (family, res.video)


# An offset is drawn near the start (headers), near the end (MP4/AVI indexes live there) or anywhere.
_OFFSET = st.one_of(
    st.tuples(st.just("head"), st.integers(0, 511)),
    st.tuples(st.just("tail"), st.integers(1, 2048)),
    st.tuples(st.just("any"), st.integers(0, 2**31)),
)
# 32-bit values that break box sizes, counts and timestamps.
_BOUNDARY_U32 = st.sampled_from([0, 1, 7, 8, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
MUTATION = st.one_of(
    st.tuples(st.just("xor"), _OFFSET, st.integers(1, 255)),
    st.tuples(st.just("u32"), _OFFSET, _BOUNDARY_U32),
    st.tuples(st.just("insert"), _OFFSET, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), _OFFSET, st.integers(1, 1024)),
    st.tuples(st.just("repeat"), _OFFSET, st.integers(1, 1024)),
)


def _at(data: bytes | bytearray, where: tuple[str, int]) -> int:
    """The byte position an `_OFFSET` draw points at in `data` (always inside it)."""
    kind, value = where
    n = len(data)
    if kind == "head":
        return min(value, n - 1)
    if kind == "tail":
        return max(0, n - value)
    return value % n


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    """Apply mutation ops (see MUTATION) in order; never returns empty bytes."""
    buf = bytearray(data)
    for op, where, arg in ops:
        if not buf:
            break
        i = _at(buf, where)
        if op == "xor":
            buf[i] ^= arg
        elif op == "u32":
            buf[i : i + 4] = arg.to_bytes(4, "big")
        elif op == "insert":
            buf[i:i] = arg
        elif op == "delete":
            del buf[i : i + arg]
        elif op == "repeat":
            buf[i:i] = buf[i : i + arg]
    return bytes(buf) or b"\x00"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=40, **FUZZ_SETTINGS)
@given(ops=st.lists(MUTATION, min_size=1, max_size=8))
def test_mutated_bytes_are_ledgered_once(chain, seeds, fuzz_dir, family, ops):
    data, suffix = seeds[family]
    path = fuzz_dir / f"mutated_{family}{suffix}"
    path.write_bytes(mutate(data, ops))
    ledger_once(chain, str(path))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=20, **FUZZ_SETTINGS)
@given(keep=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_files_are_ledgered_once(chain, seeds, fuzz_dir, family, keep):
    data, suffix = seeds[family]
    path = fuzz_dir / f"truncated_{family}{suffix}"
    path.write_bytes(data[: int(len(data) * keep)])
    res = ledger_once(chain, str(path))
    if int(len(data) * keep) == 0:
        assert res.video["status"] == "rejected" and res.video["reason"] == "empty_file"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=20, **FUZZ_SETTINGS)
@given(n=st.one_of(st.integers(1, 64), st.integers(1, 4096)), fill=st.sampled_from(["zeros", "ones", "random"]),
       seed=st.integers(0, 2**16))
def test_corrupted_headers_are_ledgered_once(chain, seeds, fuzz_dir, family, n, fill, seed):
    data, suffix = seeds[family]
    n = min(n, len(data))
    head = {"zeros": bytes(n), "ones": b"\xff" * n,
            "random": np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()}[fill]
    path = fuzz_dir / f"header_{family}{suffix}"
    path.write_bytes(head + data[n:])
    ledger_once(chain, str(path))


# --------------------------------------------------------------------------------------------------
# Extreme and odd inputs
# --------------------------------------------------------------------------------------------------


def _vfr_wild(d: Path) -> Path:
    """H.264 in Matroska with wildly uneven frame gaps (1 ms to 2 s) at a 1 ms time base."""
    gaps = [1, 2000, 1, 40, 500, 3, 1, 1, 700]
    pts = [0]
    for i in range(23):
        pts.append(pts[-1] + gaps[i % len(gaps)])
    return badfiles.encode_video(d / "vfr_wild.mkv", badfiles.moving_frames(24), 25, pts=pts,
                                 time_base=Fraction(1, 1000))


# name -> (maker, expected status or None when any ledger status is acceptable)
EXTREMES = {
    "one_pixel_ffv1": (lambda d: badfiles.make_one_pixel(d), "done"),
    "one_pixel_h264": (lambda d: badfiles.encode_video(
        d / "one_pixel.mp4", badfiles.moving_frames(12, 2, 2)[:, :1, :1], 24, pix_fmt="yuv444p"), "done"),
    "two_by_two_h264": (lambda d: badfiles.encode_video(d / "two.mp4", badfiles.moving_frames(12, 2, 2), 24), "done"),
    "claims_8k_mp4": (lambda d: badfiles.make_claimed_size_mp4(d), "done"),
    "claims_8k_mjpeg": (lambda d: badfiles.make_claimed_size_mjpeg(d), None),
    "claims_8k_y4m": (lambda d: badfiles.make_claimed_size_y4m(d), "rejected"),
    "claims_16k_mjpeg": (lambda d: badfiles.make_claimed_size_mjpeg(d, 16384, 16384, name="claims_16k.avi"), None),
    "claims_64k_mp4": (lambda d: badfiles.make_claimed_size_mp4(d, 65535, 65535, name="claims_64k.mp4"), "done"),
    "single_frame_mp4": (lambda d: badfiles.make_very_short(d, n=1, name="single.mp4"), "done"),
    "single_frame_mkv": (lambda d: badfiles.encode_video(d / "single.mkv", badfiles.moving_frames(1), 24), "done"),
    "two_frames": (lambda d: badfiles.make_very_short(d, n=2), "done"),
    "vfr": (lambda d: badfiles.make_vfr(d), "done"),
    "vfr_wild": (_vfr_wild, "done"),
    "rotated_90": (lambda d: badfiles.make_rotated(d, 90, name="r90.mp4"), "done"),
    "rotated_180": (lambda d: badfiles.make_rotated(d, 180, name="r180.mp4"), "done"),
    "rotated_270": (lambda d: badfiles.make_rotated(d, 270, name="r270.mp4"), "done"),
    "rotated_45": (lambda d: badfiles.make_rotated(d, 45, name="r45.mp4"), "done"),
    "pts_offset": (lambda d: badfiles.make_pts_offset(d), "done"),
    "pts_offset_10h": (lambda d: badfiles.make_pts_offset(d, offset_s=36000, name="pts_10h.mp4"), "done"),
    "pts_negative_mkv": (lambda d: badfiles.encode_video(
        d / "neg.mkv", badfiles.moving_frames(24), 24, pts=list(range(-12, 12))), "done"),
    "size_change_mkv": (lambda d: badfiles.make_size_change(d), "done"),
    "size_change_raw_h264": (lambda d: badfiles.make_size_change(d, name="size_change.h264"), None),
    "latin1_metadata_webm": (lambda d: badfiles.make_latin1_metadata(d), "done"),
    "unknown_codec_tag_mp4": (lambda d: badfiles.make_unknown_codec_tag(d), "rejected"),
    "odd_size": (lambda d: badfiles.make_odd_size(d), "done"),
    "garbage_payload": (lambda d: badfiles.make_garbage_payload(d), None),
    "truncated_faststart": (lambda d: badfiles.make_truncated_faststart(d), "rejected"),
    "audio_only": (lambda d: badfiles.make_audio_only(d), "rejected"),
}


@pytest.mark.parametrize("name", sorted(EXTREMES))
def test_extreme_inputs_are_ledgered_once(chain, tmp_path, name):
    make, expected = EXTREMES[name]
    path = make(tmp_path)
    res = ledger_once(chain, str(path))
    if expected is not None:
        assert res.video["status"] == expected, res.video
    if name.startswith("claims_8k_mp4"):  # the container lies; the decoded size wins
        assert (res.video["width"], res.video["height"]) == (160, 96)
    if name.startswith("one_pixel") and res.clips:
        assert (res.clips[0]["width"], res.clips[0]["height"]) == (2, 2)  # yuv420p needs 2x2 at least
    if name in ("rotated_90", "rotated_270"):  # turned upright: 160x96 coded, portrait clips
        assert res.clips and res.clips[0]["height"] > res.clips[0]["width"]


# --------------------------------------------------------------------------------------------------
# Hostile file names, through expand_inputs and the chain
# --------------------------------------------------------------------------------------------------

NAME_MAX = 255  # bytes, on every Linux filesystem we run on

HOSTILE_NAMES: list[bytes] = [
    b"caf\xe9 latin-1.mp4",  # not UTF-8
    b"\xff\xfe\x80 raw bytes.mkv",  # not UTF-8 at all
    b"a" * (NAME_MAX - 4) + b".mp4",  # exactly NAME_MAX bytes
    "\u00e9".encode() * ((NAME_MAX - 4) // 2) + b".mp4",  # NAME_MAX-1 bytes of 2-byte UTF-8
    b"with space, 'single' \"double\" quotes.mp4",
    b"new\nline\tand\rcontrol.mp4",
    b"<script>alert(1)<\\script>.mp4",
    b"glob [a]*?{b,c} chars.mp4",
    b"%20percent%2Fescaped%00.mp4",
    b"50%25 caf\xe9 %E9.mp4",  # not UTF-8, and percent signs that must survive percent-encoding
    b"-leading-dash.mp4",
    b"file:not-a-url.mp4",
    b"emoji \xf0\x9f\x8e\xac.MP4",
]


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory) -> dict[bytes, Path]:
    """A folder holding one small valid video (distinct content) under each of HOSTILE_NAMES."""
    d = tmp_path_factory.mktemp("names")
    made = {}
    for i, raw in enumerate(HOSTILE_NAMES):
        src = badfiles.encode_video(d / f"_src{i}.mp4", badfiles.moving_frames(12, 64, 48, seed=i), 24)
        target = os.path.join(os.fsencode(d), raw)
        os.rename(os.fsencode(src), target)
        made[raw] = Path(os.fsdecode(target))
    return made


def _uri_bytes(uri: str) -> bytes:
    """The file-system bytes of a path or `file://` URL (percent-escapes decoded), to compare with real names."""
    if uri.startswith("file://"):
        return urllib.parse.unquote_to_bytes(uri[len("file://"):])
    return os.fsencode(uri)


def test_hostile_names_through_expand_inputs_and_the_chain(chain, hostile_dir):
    folder = next(iter(hostile_dir.values())).parent
    items = expand_inputs([str(folder)])
    assert len(items) == len(HOSTILE_NAMES) == len({i.uri for i in items})
    assert {_uri_bytes(i.uri) for i in items} == {os.fsencode(p) for p in hostile_dir.values()}
    for item in items:
        res = ledger_once(chain, item.uri)
        assert res.video["status"] == "done", res.video
        item.uri.encode("utf-8")  # storable as Arrow/Parquet text
    # the uris read back from a manifest (as a resumed or scripted run would) name the same inputs
    manifest = folder.parent / f"{folder.name}_manifest.jsonl"
    manifest.write_text("".join(json.dumps({"uri": i.uri}) + "\n" for i in items), encoding="utf-8")
    assert [i.uri for i in expand_inputs([str(manifest)])] == [i.uri for i in items]
    # given one by one (a name with glob characters is a file, not a pattern, when it exists)
    for raw, path in hostile_dir.items():
        one = expand_inputs([str(path)])
        assert len(one) == 1, raw
        assert one[0].uri in {i.uri for i in items}, raw


def test_manifest_uri_with_nul_or_missing_file_is_ledgered(chain, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"uri": u}) for u in ("nul\u0000byte.mp4", "missing.mp4")) + "\n")
    items = expand_inputs([str(manifest)])
    assert len(items) == 2
    for item in items:
        res = ledger_once(chain, item.uri)  # checks the video_id too: it was NULL for the NUL byte
        assert res.video["status"] == "rejected", res.video


# --------------------------------------------------------------------------------------------------
# Malformed manifests
# --------------------------------------------------------------------------------------------------

_URI_POOL = ["a.mp4", "b.mkv", "sub/c.webm", "a.mp4", "./a.mp4", "d e 'f'.mp4", "\u00e9t\u00e9.mp4",
             "<script>.mp4", "x,y.mp4", 'q"uote.mp4']
# One manifest row: a valid uri, or a row problem (no uri key, empty, null, wrong type), with extra columns.
_ROW = st.fixed_dictionaries(
    {"uri": st.one_of(st.sampled_from(_URI_POOL), st.just(""), st.none(), st.integers(-5, 10**12),
                      st.floats(allow_nan=True), st.booleans(), st.lists(st.just("a.mp4"), max_size=2),
                      st.just("<absent>"))},
    optional={"caption": st.one_of(st.none(), st.text(max_size=20), st.integers()),
              "extra": st.one_of(st.text(max_size=10), st.integers())},
)
_JUNK_LINE = st.sampled_from(["{broken", "[1, 2]", "5", '"just a string"', "null", "{\"uri\": }", "\ufeff{}",
                              "{\"uri\": \"a.mp4\"", "true"])


def _row_uri(row: dict) -> Any:
    """The uri value of a generated row, or a marker that the key is absent."""
    return row.get("uri", "<absent>")


def _expected_uris(rows: list[dict], base: Path, as_text: bool) -> list[str]:
    """Distinct valid uris of `rows` resolved against `base`, in first-seen order (the expand_inputs contract).

    With `as_text` (CSV) every cell is a string, so a number is a (strange but valid) relative path.
    """
    out: list[str] = []
    for row in rows:
        uri = _row_uri(row)
        if uri == "<absent>" or uri is None:
            continue
        if as_text:
            uri = _csv_cell(uri)
        if not isinstance(uri, str) or not uri:
            continue
        path = os.path.abspath(base / uri)
        if path not in out:
            out.append(path)
    return out


def _csv_cell(value: Any) -> str:
    """How a Python value reads back from a CSV cell (None is an empty cell, anything else its str())."""
    return "" if value is None else str(value)


def _check_manifest(path: Path, expected: list[str], any_uri_key: bool) -> None:
    """expand_inputs on `path` returns exactly `expected`, or InputError when no row had a uri at all."""
    try:
        items = expand_inputs([str(path)])
    except InputError as exc:
        assert not any_uri_key, f"InputError although rows had uris: {exc}"
        return
    assert [i.uri for i in items] == expected


@settings(max_examples=40, **FUZZ_SETTINGS)
@given(rows=st.lists(st.one_of(_ROW, _JUNK_LINE), max_size=12), bom=st.booleans())
def test_jsonl_manifests(tmp_path_factory, rows, bom):
    d = tmp_path_factory.mktemp("jsonl")
    lines = []
    for row in rows:
        if isinstance(row, str):
            lines.append(row)
        else:
            data = {k: v for k, v in row.items() if not (k == "uri" and v == "<absent>")}
            lines.append(json.dumps(data))
    path = d / "m.jsonl"
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    dicts = [r for r in rows if isinstance(r, dict)]
    expected = _expected_uris(dicts, d, as_text=False)
    any_uri_key = any(_row_uri(r) != "<absent>" for r in dicts)
    _check_manifest(path, expected, any_uri_key)


@settings(max_examples=40, **FUZZ_SETTINGS)
@given(rows=st.lists(_ROW, max_size=12), bom=st.booleans(), uri_col=st.booleans(), crlf=st.booleans())
def test_csv_manifests(tmp_path_factory, rows, bom, uri_col, crlf):
    d = tmp_path_factory.mktemp("csv")
    buf = io.StringIO()
    header = ["uri" if uri_col else "path", "caption", "extra"]
    writer = csv.writer(buf, lineterminator="\r\n" if crlf else "\n")
    writer.writerow(header)
    for row in rows:
        uri = _row_uri(row)
        writer.writerow(["" if uri == "<absent>" else _csv_cell(uri), _csv_cell(row.get("caption")),
                         _csv_cell(row.get("extra"))])
    path = d / "m.csv"
    path.write_text(("\ufeff" if bom else "") + buf.getvalue(), encoding="utf-8", newline="")
    if not uri_col:  # a file-level problem; a header alone (no row) may also read as an empty manifest
        _check_manifest(path, [], any_uri_key=False)
        if rows:
            with pytest.raises(InputError, match="no 'uri' column"):
                expand_inputs([str(path)])
        return
    _check_manifest(path, _expected_uris(rows, d, as_text=True), any_uri_key=True)


@settings(max_examples=20, **FUZZ_SETTINGS)
@given(uris=st.lists(st.one_of(st.sampled_from(_URI_POOL), st.just(""), st.none()), max_size=10),
       int_uris=st.booleans())
def test_parquet_manifests(tmp_path_factory, uris, int_uris):
    d = tmp_path_factory.mktemp("parquet")
    path = d / "m.parquet"
    if int_uris:  # a uri column of the wrong type: every row is skipped
        table = pa.table({"uri": pa.array(list(range(len(uris))), pa.int64()), "extra": [1.5] * len(uris)})
        expected: list[str] = []
    else:
        table = pa.table({"uri": pa.array(uris, pa.string()), "extra": list(range(len(uris)))})
        expected = _expected_uris([{"uri": u} for u in uris], d, as_text=False)
    pq.write_table(table, path)
    _check_manifest(path, expected, any_uri_key=True)


@pytest.mark.parametrize("name,content", [
    ("empty.csv", b""),
    ("empty.jsonl", b""),
    ("blank.jsonl", b"\n\n  \n"),
    ("header_only.csv", b"uri,caption\n"),
    ("bom_header_only.csv", b"\xef\xbb\xbfuri\n"),
    ("only_junk.jsonl", b"5\n[1, 2]\n"),
    ("only_number.jsonl", b"5\n"),
    ("only_list.jsonl", b"[\"uri\"]\n"),
    ("only_null.jsonl", b"null\n"),
    ("latin1.csv", b"uri\ncaf\xe9.mp4\n"),
    ("latin1.jsonl", b"{\"uri\": \"ok.mp4\"}\n{\"uri\": \"caf\xe9.mp4\"}\n"),
    ("empty.parquet", b""),
    ("garbage.parquet", b"PAR1 not really"),
    ("nul.csv", b"uri\na\x00b.mp4\n"),
    ("huge_field.csv", b"uri\n\"" + b"x" * 200_000 + b"\n"),
])
def test_file_level_manifest_problems_raise_input_error_only(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    try:
        items = expand_inputs([str(path)])
    except InputError:
        return
    assert len({i.uri for i in items}) == len(items)
    assert all(isinstance(i, InputItem) and os.path.isabs(i.uri) for i in items)


# --------------------------------------------------------------------------------------------------
# End to end through the Ray runner
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_runner_ledgers_every_fuzzed_input_once(ray_session, seeds, tmp_path):
    """~20 fuzzed and valid files in one folder through `run`: it returns, and each is in `videos` once."""
    from clipmill.pipeline.recipe import load_recipe  # noqa: PLC0415
    from clipmill.pipeline.runner import run  # noqa: PLC0415
    from clipmill.storage.shards import read_table  # noqa: PLC0415

    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(7)
    for family, (data, suffix) in seeds.items():
        (d / f"valid_{family}{suffix}").write_bytes(data)
        cut = int(len(data) * rng.uniform(0.05, 0.95))
        (d / f"truncated_{family}{suffix}").write_bytes(data[:cut])
        ops = [("xor", ("any", int(rng.integers(0, 2**31))), int(rng.integers(1, 256))) for _ in range(6)]
        ops.append(("u32", ("tail", int(rng.integers(1, 2048))), 0xFFFFFFFF))
        (d / f"mutated_{family}{suffix}").write_bytes(mutate(data, ops))
    badfiles.make_empty(d)
    badfiles.make_claimed_size_y4m(d)
    badfiles.make_unknown_codec_tag(d)  # probe once raised on it: a NULL video_id that broke the shard commit
    badfiles.make_latin1_metadata(d)  # split once failed on it
    raw_name = os.path.join(os.fsencode(d), b"caf\xe9 <script>.mp4")
    with open(raw_name, "wb") as f:
        f.write(mutate(seeds["h264_mp4"][0], [("xor", ("head", 40), 0x55)]))
    shutil.copy(d / "valid_h264_mp4.mp4", d / "copy of valid.mp4")  # same bytes: duplicate_content

    recipe = {"name": "fuzz-e2e", "stages": CHAIN_RECIPE["stages"] + [{"filter": {"min_sharpness": None}}],
              "write": {"shard_videos": 4}}
    recipe_path = tmp_path / "fuzz.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    items = expand_inputs([str(d)])
    assert len(items) >= 15
    out = tmp_path / "ds"
    stats = run(items, out, load_recipe(recipe_path))
    assert stats.total == len(items)
    videos = read_table(out, "videos").to_pylist()
    uris = [v["uri"] for v in videos]
    assert sorted(uris) == sorted(i.uri for i in items), "every input ledgered, and only the inputs"
    assert len(set(uris)) == len(uris), "no input ledgered twice"
    for v in videos:
        assert v["status"] in STATUSES
        assert v["status"] == "done" or v["reason"], v
    by_name = {os.path.basename(v["uri"]): v for v in videos}
    for family, (_, suffix) in seeds.items():
        valid = by_name[f"valid_{family}{suffix}"]
        assert valid["status"] == "done" or valid["reason"].startswith("duplicate_content"), valid
    copies = [by_name["valid_h264_mp4.mp4"], by_name["copy of valid.mp4"]]
    assert sorted(v["status"] for v in copies) == ["done", "rejected"]
