"""Global near-duplicate marking: planted copies found, no false merges, best member by quality, shards
rewritten atomically (new file, replaced commit record, old file gone), idempotent reruns, crash safety."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipmill.storage import dedup
from clipmill.storage.dedup import LSHPlan, dedup_dataset, find_duplicates, iter_array_batches, plan_lsh
from clipmill.storage.schema import CLIPS_SCHEMA, VIDEOS_SCHEMA
from clipmill.storage.shards import DatasetError, ShardWriter, read_commits, read_table


class SimulatedCrash(BaseException):
    """Raised by a patched step to stop dedup as a kill would (not an Exception, so nothing catches it)."""


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _at_cosine(rng: np.random.Generator, x: np.ndarray, c: float) -> np.ndarray:
    """A unit vector at exactly cosine `c` from unit vector x."""
    z = rng.standard_normal(x.shape).astype(np.float64)
    z -= (z @ x) * x
    z /= np.linalg.norm(z)
    return (c * x + np.sqrt(1 - c * c) * z).astype(np.float32)


def _noisy_copy(rng: np.random.Generator, x: np.ndarray, sigma: float) -> np.ndarray:
    y = x + sigma * rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(x.shape[-1])
    return y / np.linalg.norm(y, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------
# find_duplicates on arrays
# ---------------------------------------------------------------------------------------------------------

def test_every_planted_copy_found_and_no_random_vectors_merged():
    rng = np.random.default_rng(0)
    base = _unit(rng, 4000, 64)
    src = rng.choice(len(base), 200, replace=False)
    copies = _noisy_copy(rng, base[src], rng.uniform(0.02, 0.25, (200, 1)).astype(np.float32))
    assert ((base[src] * copies).sum(1) > 0.96).all()
    x = np.vstack([base, copies])
    res = find_duplicates(iter_array_batches(x, 777), threshold=0.95)
    copy_idx = len(base) + np.arange(200)
    assert (res.labels[copy_idx] == res.labels[src]).all()  # every planted pair is one group
    groups = res.groups()
    assert len(groups) == 200 and all(len(g) == 2 for g in groups)  # and nothing else was merged
    assert res.n_duplicates == 200 and res.n_groups == 200
    assert (res.labels[src] == np.minimum(src, copy_idx)).all()  # label = smallest index of the group


def test_threshold_is_inclusive_and_respected():
    rng = np.random.default_rng(1)
    a = _unit(rng, 3, 32)
    near = np.stack([_at_cosine(rng, a[0], 0.97), _at_cosine(rng, a[1], 0.93), _at_cosine(rng, a[2], 0.951)])
    res = find_duplicates([a, near], threshold=0.95)
    assert res.labels[3] == 0 and res.labels[5] == 2
    assert res.labels[4] == 4  # 0.93 < 0.95: not a duplicate
    assert find_duplicates([a, near], threshold=0.90).labels[4] == 1


def test_groups_are_transitive_and_result_is_deterministic():
    rng = np.random.default_rng(2)
    a = _unit(rng, 1, 48)[0]
    b = _at_cosine(rng, a, 0.96)
    # c close to b but further from a: a chain a~b~c
    c = _noisy_copy(rng, b, 0.25)
    x = np.vstack([_unit(rng, 500, 48), a, b, c])
    r1 = find_duplicates([x], threshold=0.95, seed=7)
    r2 = find_duplicates(iter_array_batches(x, 64), threshold=0.95, seed=7)
    assert np.array_equal(r1.labels, r2.labels)
    assert r1.labels[500] == r1.labels[501] == r1.labels[502] == 500


def test_unusable_rows_are_never_duplicates():
    x = np.zeros((4, 8), np.float32)
    x[0, 0] = x[1, 0] = 2.0  # identical directions (normalised here)
    x[3, 1] = np.nan
    res = find_duplicates([x])
    assert res.labels.tolist() == [0, 0, 2, 3]


def test_huge_bucket_is_tiled_and_exact():
    rng = np.random.default_rng(3)
    v = _unit(rng, 1, 16)
    x = np.vstack([_noisy_copy(rng, np.repeat(v, 300, axis=0), 0.01), _unit(rng, 300, 16)])
    res = find_duplicates([x], threshold=0.95, block_size=40, plan=LSHPlan(bands=2, bits=4))
    assert res.largest_bucket > 40  # went through the tiled path
    assert (res.labels[:300] == 0).all()
    brute = x @ x.T
    iu = np.triu_indices(len(x), 1)
    linked = brute[iu] >= 0.95
    assert (res.labels[iu[0][linked]] == res.labels[iu[1][linked]]).all()


def test_plan_reaches_recall_and_bad_arguments_raise():
    for n in (10, 1000, 1_000_000):
        p = plan_lsh(n, 0.95)
        assert p.recall_at(0.95) >= 0.99 and p.recall_at(0.99) > p.recall_at(0.95)
    with pytest.raises(ValueError, match="threshold"):
        find_duplicates([np.ones((2, 2))], threshold=1.5)
    with pytest.raises(ValueError, match="2-D"):
        find_duplicates([np.ones(3)])
    with pytest.raises(ValueError, match="bits"):
        LSHPlan(bands=1, bits=40)


# ---------------------------------------------------------------------------------------------------------
# dedup_dataset on a real dataset written with ShardWriter
# ---------------------------------------------------------------------------------------------------------

MODEL = "perceptual-v1"


def _clip(vid: str, i: int, emb: np.ndarray | None, **kw) -> dict:
    row = {"clip_id": f"{vid}-{i}", "video_id": vid, "media": b"mp4", "kept": True, "width": 640,
           "height": 360, "brisque": 40.0, "sharpness": 100.0, "duration_s": 4.0,
           "embedding": None if emb is None else emb.tolist(), "embedding_model": MODEL}
    row.update(kw)
    return row


def _commit(w: ShardWriter, shard_videos: dict[str, list[dict]]) -> None:
    videos = pa.Table.from_pylist([{"video_id": v, "uri": f"/in/{v}.mp4", "status": "done",
                                    "n_clips": len(c)} for v, c in shard_videos.items()], schema=VIDEOS_SCHEMA)
    clips = pa.Table.from_pylist([c for cs in shard_videos.values() for c in cs], schema=CLIPS_SCHEMA)
    w.commit(videos, clips)


@pytest.fixture
def dataset(tmp_path):
    """Three shards, five videos. Planted groups (clip_id -> expected duplicate_of):

    group A (across shards and videos): a0 best (kept, 1280x720, brisque 20); a1 same size but brisque 50;
        a2 bigger but not kept; a3 kept, small.
    group B: b0 and b1 identical in every quality column -> the smaller clip_id (v1-1) is best.
    other model: x0 has exactly A's vector but another embedding_model -> never compared with A.
    """
    rng = np.random.default_rng(11)
    va, vb, *rand = _unit(rng, 12, 64)
    out = tmp_path / "out"
    with ShardWriter(out) as w:
        _commit(w, {"v0": [_clip("v0", 0, va, width=1280, height=720, brisque=20.0),
                           _clip("v0", 1, rand[0]), _clip("v0", 2, None)],
                    "v1": [_clip("v1", 0, rand[1]), _clip("v1", 1, vb)]})
        _commit(w, {"v2": [_clip("v2", 0, _noisy_copy(rng, va, 0.1), width=1280, height=720, brisque=50.0),
                           _clip("v2", 1, _noisy_copy(rng, va, 0.1), width=1920, height=1080, kept=False),
                           _clip("v2", 2, rand[2])]})
        _commit(w, {"v3": [_clip("v3", 0, _noisy_copy(rng, va, 0.1), brisque=10.0), _clip("v3", 1, vb.copy()),
                           _clip("v3", 2, rand[3])],
                    "v4": [_clip("v4", 0, va, embedding_model="clip-vit-b32"), _clip("v4", 1, rand[4])]})
    # v1-1 and v3-1 tie on quality: the smaller clip_id (v1-1) wins
    expected = {"v2-0": "v0-0", "v2-1": "v0-0", "v3-0": "v0-0", "v3-1": "v1-1"}
    return out, expected


def _dup_map(out) -> dict[str, str]:
    t = read_table(out, "clips", columns=["clip_id", "duplicate_of"]).to_pylist()
    return {r["clip_id"]: r["duplicate_of"] for r in t if r["duplicate_of"] is not None}


def _check_records(out) -> None:
    for rec in read_commits(out):
        for sf in rec.files.values():
            data = (out / sf.path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == sf.sha256 and len(data) == sf.bytes
            assert pq.read_metadata(out / sf.path).num_rows == sf.rows


def _clip_files(out) -> list[str]:
    return sorted(p.name for p in (out / "clips").iterdir())


def test_dataset_duplicates_marked_across_shards_and_videos(dataset):
    out, expected = dataset
    before = {r.shard: r.files["clips"].path for r in read_commits(out)}
    report = dedup_dataset(out, threshold=0.95)
    assert _dup_map(out) == expected
    assert (report.clips, report.with_embedding, report.groups, report.duplicates) == (13, 12, 2, 4)
    assert report.models == {MODEL: 11, "clip-vit-b32": 1}
    assert report.shards_rewritten == 2 and report.shards == 3  # shard 0 holds only best members
    after = {r.shard: r.files["clips"].path for r in read_commits(out)}
    assert after == {s: p if s == "part-00000" else p.replace(".parquet", ".r1.parquet") for s, p in before.items()}
    _check_records(out)
    assert _clip_files(out) == ["part-00000.parquet", "part-00001.r1.parquet", "part-00002.r1.parquet"]
    assert not (out / dedup.TMP_DIR).exists()
    # the rest of each row survives the rewrite
    t = read_table(out, "clips", columns=["clip_id", "media", "kept"])
    assert t.num_rows == 13 and set(t["media"].to_pylist()) == {b"mp4"}
    assert pq.read_schema(out / after["part-00000"]).metadata[b"clipmill.schema_version"]
    assert json.loads(json.dumps(report.to_json()))["duplicates"] == 4


def test_rerun_is_idempotent(dataset):
    out, expected = dataset
    dedup_dataset(out)
    records = [r.to_json() for r in read_commits(out)]
    files = _clip_files(out)
    report = dedup_dataset(out)
    assert report.shards_rewritten == 0 and report.duplicates == 4
    assert [r.to_json() for r in read_commits(out)] == records and _clip_files(out) == files
    assert _dup_map(out) == expected


def test_a_better_copy_added_later_becomes_the_best(dataset):
    out, _ = dataset
    dedup_dataset(out)
    va = np.asarray(read_table(out, "clips", columns=["clip_id", "embedding"]).to_pylist()[0]["embedding"])
    with ShardWriter(out) as w:
        _commit(w, {"v5": [_clip("v5", 0, va, width=3840, height=2160)]})
    report = dedup_dataset(out)
    dups = _dup_map(out)
    assert {k for k, v in dups.items() if v == "v5-0"} == {"v0-0", "v2-0", "v2-1", "v3-0"}
    assert report.shards_rewritten == 3  # shards 0..2 change, the new shard holds only the best member
    files = _clip_files(out)
    assert files == ["part-00000.r1.parquet", "part-00001.r2.parquet", "part-00002.r2.parquet", "part-00003.parquet"]
    _check_records(out)


def test_crash_before_the_record_switch_keeps_the_old_version(dataset, monkeypatch):
    out, expected = dataset
    records = [r.to_json() for r in read_commits(out)]

    def crash(*a, **k):
        raise SimulatedCrash("killed before the commit record was replaced")

    monkeypatch.setattr(dedup, "write_json_atomic", crash)
    with pytest.raises(SimulatedCrash):
        dedup_dataset(out)
    monkeypatch.undo()
    assert "part-00001.r1.parquet" in _clip_files(out)  # the new file was written ...
    assert [r.to_json() for r in read_commits(out)] == records  # ... but the dataset is the old one
    assert read_table(out, "clips").num_rows == 13 and _dup_map(out) == {}
    _check_records(out)
    report = dedup_dataset(out)  # the next run removes the leftover and finishes the job
    assert report.leftovers_removed == 1 and _dup_map(out) == expected
    assert _clip_files(out) == ["part-00000.parquet", "part-00001.r1.parquet", "part-00002.r1.parquet"]
    _check_records(out)


def test_crash_after_the_record_switch_keeps_the_new_version(dataset, monkeypatch):
    out, expected = dataset

    def crash(path):
        raise SimulatedCrash(f"killed before {path} was deleted")

    monkeypatch.setattr(dedup, "_delete_replaced", crash)
    with pytest.raises(SimulatedCrash):
        dedup_dataset(out)
    monkeypatch.undo()
    assert {"part-00001.parquet", "part-00001.r1.parquet"} <= set(_clip_files(out))
    assert read_commits(out)[1].files["clips"].path == "clips/part-00001.r1.parquet"
    _check_records(out)
    assert read_table(out, "clips").num_rows == 13  # the old file is not read twice
    report = dedup_dataset(out)
    assert report.leftovers_removed == 1 and _dup_map(out) == expected
    assert "part-00001.parquet" not in _clip_files(out)


def test_refuses_while_a_run_writes_and_outside_a_dataset(dataset, tmp_path):
    out, _ = dataset
    with ShardWriter(out), pytest.raises(DatasetError, match="another clipmill run"):
        dedup_dataset(out)
    with pytest.raises(DatasetError, match="not a clipmill dataset"):
        dedup_dataset(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
