"""SQL layer: views over committed shards only, the read-only lockdown, output formats, error messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from clipmill.storage.query import (
    QueryError,
    QueryRefused,
    connect,
    format_table,
    result_text,
    run_query,
    write_result,
)
from clipmill.storage.schema import CLIP_COLUMNS, CLIPS_SCHEMA, VIDEO_COLUMNS, VIDEOS_SCHEMA
from clipmill.storage.shards import ShardWriter


def _videos(*rows: dict) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=VIDEOS_SCHEMA)


def _clips(*rows: dict) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=CLIPS_SCHEMA)


def _clip(cid: str, vid: str, **kw) -> dict:
    row = {"clip_id": cid, "video_id": vid, "duration_s": 2.0, "kept": True, "reject_reasons": [],
           "media": b"\x00\x01\x02\x03", "width": 64, "height": 36, "aspect_bucket": "16:9"}
    row.update(kw)
    return row


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Two committed shards (v1 with 2 clips, v2 with 1), plus an uncommitted temporary and a stray file."""
    out = tmp_path / "ds"
    with ShardWriter(out) as w:
        w.commit(_videos({"video_id": "v1", "uri": "a.mp4", "status": "done", "duration_s": 10.0}),
                 _clips(_clip("c1", "v1"), _clip("c2", "v1", kept=False, reject_reasons=["dark"], media=None)))
        w.commit(_videos({"video_id": "v2", "uri": "b.mp4", "status": "done", "duration_s": 5.0}),
                 _clips(_clip("c3", "v2", caption="a cat")))
    # Files that are NOT in any commit record: a half-written shard and a stray complete-looking one.
    ghost = _clips(_clip("ghost", "vx"))
    pq.write_table(ghost, out / "clips" / ".part-00009.parquet.tmp")
    pq.write_table(ghost, out / "clips" / "part-00042.parquet")
    pq.write_table(_videos({"video_id": "vx", "uri": "x.mp4", "status": "done"}), out / "videos" / "part-00042.parquet")
    return out


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_views_see_only_committed_shards(dataset: Path) -> None:
    ids = run_query(dataset, "SELECT clip_id FROM clips ORDER BY clip_id")["clip_id"].to_pylist()
    assert ids == ["c1", "c2", "c3"]  # union over both shards, ghost invisible
    vids = run_query(dataset, "SELECT video_id FROM videos ORDER BY 1")["video_id"].to_pylist()
    assert vids == ["v1", "v2"]
    joined = run_query(dataset, "SELECT v.uri, count(*) AS n FROM clips c JOIN videos v USING (video_id) "
                                "GROUP BY ALL ORDER BY 1")
    assert joined.to_pylist() == [{"uri": "a.mp4", "n": 2}, {"uri": "b.mp4", "n": 1}]


def test_views_have_full_schema_columns_and_types(dataset: Path) -> None:
    clips = run_query(dataset, "SELECT * FROM clips")
    videos = run_query(dataset, "SELECT * FROM videos")
    assert tuple(clips.column_names) == CLIP_COLUMNS
    assert tuple(videos.column_names) == VIDEO_COLUMNS
    for field in CLIPS_SCHEMA:
        assert clips.schema.field(field.name).type == field.type, field.name
    assert videos.schema.field("committed_at").type == pa.timestamp("us", tz="UTC")
    assert clips.filter(pa.compute.equal(clips["clip_id"], "c1"))["media"].to_pylist() == [b"\x00\x01\x02\x03"]


def test_empty_dataset_has_typed_empty_views(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    with ShardWriter(out):
        pass
    for name, schema in (("clips", CLIPS_SCHEMA), ("videos", VIDEOS_SCHEMA)):
        t = run_query(out, f"SELECT * FROM {name}")
        assert t.num_rows == 0
        assert t.column_names == schema.names
        for field in schema:
            if pa.types.is_timestamp(field.type):  # DuckDB timestamps are microseconds
                assert t.schema.field(field.name).type == pa.timestamp("us", tz="UTC")
            else:
                assert t.schema.field(field.name).type == field.type, field.name
    assert run_query(out, "SELECT count(*) AS n, sum(duration_s) AS s FROM clips").to_pylist() == [{"n": 0, "s": None}]


def test_columns_missing_from_an_older_shard_read_as_typed_null(dataset: Path) -> None:
    old = dataset / "clips" / "part-00000.parquet"
    t = pq.read_table(old)
    pq.write_table(t.drop_columns(["caption", "brightness", "reject_reasons"]), old)  # an "older" shard
    got = run_query(dataset, "SELECT clip_id, caption, brightness, reject_reasons FROM clips ORDER BY clip_id")
    assert got["caption"].to_pylist() == [None, None, "a cat"]
    assert got["reject_reasons"].to_pylist() == [None, None, []]
    assert got.schema.field("brightness").type == pa.float32()
    assert got.schema.field("reject_reasons").type == pa.list_(pa.string())
    # absent from every shard
    for p in (dataset / "clips" / "part-00000.parquet", dataset / "clips" / "part-00001.parquet"):
        pq.write_table(pq.read_table(p).drop_columns(["prompt_long"]), p)
    got = run_query(dataset, "SELECT prompt_long FROM clips")
    assert got["prompt_long"].to_pylist() == [None] * 3
    assert got.schema.field("prompt_long").type == pa.string()


def test_connect_on_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QueryError, match="not a directory"):
        connect(tmp_path / "nope")


READS = [
    "DESCRIBE clips",
    "SHOW TABLES",
    "SUMMARIZE SELECT duration_s FROM clips",
    "FROM clips SELECT clip_id",
    "WITH k AS (SELECT * FROM clips WHERE kept) SELECT count(*) FROM k",
    "EXPLAIN SELECT * FROM clips",
    "EXPLAIN ANALYZE SELECT count(*) FROM clips",
    "PRAGMA table_info('clips')",
    "PRAGMA show_tables",
    "-- a comment\nSELECT 1 AS one",
    "SELECT 1 AS a; SELECT 2 AS b",
    "PIVOT (SELECT aspect_bucket, kept FROM clips) ON kept IN (true, false) USING count(*)",
    "SELECT * FROM query($$SELECT count(*) FROM clips$$)",
]


@pytest.mark.parametrize("sql", READS)
def test_read_statements_run(dataset: Path, sql: str) -> None:
    assert run_query(dataset, sql).num_columns >= 1


def _escapes(out: Path, tmp: Path) -> list[str]:
    return [
        f"COPY (SELECT 1) TO '{out}/x.csv'",
        f"COPY clips TO '{tmp}/x.parquet'",
        f"COPY (SELECT 1 AS a) TO '{out}/clips/part-00000.parquet' (USE_TMP_FILE false)",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM read_blob('/etc/passwd')",
        "SELECT * FROM glob('/etc/*')",
        f"SELECT * FROM glob('{out}/clips/*')",
        f"SELECT * FROM read_parquet('{out}/clips/part-00042.parquet')",
        f"SELECT * FROM read_parquet('{out}/clips/.part-00009.parquet.tmp')",
        f"ATTACH '{tmp}/x.db'",
        "ATTACH ':memory:' AS m",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "SET lock_configuration = false",
        "RESET enable_external_access",
        "RESET allowed_paths",
        "SET VARIABLE x = 1",
        "CREATE TABLE t (a INTEGER)",
        "CREATE OR REPLACE VIEW clips AS SELECT 1",
        "INSERT INTO clips VALUES (1)",
        "UPDATE clips SET kept = true",
        "DELETE FROM clips",
        "DROP VIEW clips",
        "ALTER VIEW clips RENAME TO c2",
        "PRAGMA enable_profiling",
        f"PRAGMA profiling_output = '{tmp}/prof.txt'",
        "PRAGMA threads = 1",
        f"EXPORT DATABASE '{tmp}/export'",
        f"SELECT 1; COPY (SELECT 1) TO '{tmp}/multi.csv'",
        f"SELECT 1; COPY (SELECT 1) TO '{out}/multi.csv'",
        f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}/explain.csv'",
        "CALL pragma_table_info('clips')",
        "CHECKPOINT",
        "BEGIN TRANSACTION",
        "CREATE SECRET (TYPE s3)",
        f"SELECT * FROM query($$COPY (SELECT 1) TO '{tmp}/q.csv'$$)",
        "SELECT * FROM query($$DROP VIEW clips$$)",
        "PIVOT (SELECT aspect_bucket, kept FROM clips) ON kept",
        "SELECT * FROM read_parquet('https://example.com/x.parquet')",
    ]


def test_every_escape_attempt_is_refused_and_creates_no_file(dataset: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    before = _files(tmp_path)
    shard = (dataset / "clips" / "part-00000.parquet").read_bytes()
    for sql in _escapes(dataset, outside):
        with pytest.raises(QueryError) as info:
            run_query(dataset, sql)
        msg = str(info.value)
        assert "allow-external" in msg or "Permission" in msg or "single SELECT" in msg, (sql, msg)
        # the views are intact and nothing was written anywhere
        assert run_query(dataset, "SELECT count(*) AS n FROM clips").to_pylist() == [{"n": 3}], sql
        assert _files(tmp_path) == before, sql
    assert (dataset / "clips" / "part-00000.parquet").read_bytes() == shard


def test_refusal_names_statement_type_and_the_switch(dataset: Path) -> None:
    with pytest.raises(QueryRefused, match=r"refused COPY statement.*--allow-external"):
        run_query(dataset, f"COPY (SELECT 1) TO '{dataset}/x.csv'")
    with pytest.raises(QueryRefused, match="refused DROP"):
        run_query(dataset, "SELECT 1; DROP VIEW clips")


def test_duckdb_lock_alone_refuses_external_reads_and_setting_changes(dataset: Path) -> None:
    """Layer 1 (DuckDB configuration) without the statement guard, on the bare connection."""
    con = connect(dataset)
    try:
        for sql in ("SELECT * FROM read_csv('/etc/passwd')", "SELECT * FROM glob('/etc/*')",
                    "SET enable_external_access = true", "RESET lock_configuration", "INSTALL httpfs",
                    f"SELECT * FROM read_parquet('{dataset}/clips/part-00042.parquet')"):
            with pytest.raises(duckdb.Error):
                con.execute(sql)
        assert con.execute("SELECT count(*) FROM clips").fetchone() == (3,)
    finally:
        con.close()


def test_allow_external_reads_other_files_and_runs_any_statement(dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "labels.csv"
    other.write_text("clip_id,label\nc1,cat\nc3,dog\n")
    got = run_query(dataset, f"SELECT c.clip_id, l.label FROM clips c JOIN read_csv('{other}') l USING (clip_id) "
                             "ORDER BY 1", allow_external=True)
    assert got.to_pylist() == [{"clip_id": "c1", "label": "cat"}, {"clip_id": "c3", "label": "dog"}]
    target = tmp_path / "copy.csv"
    run_query(dataset, f"COPY (SELECT clip_id FROM clips) TO '{target}'", allow_external=True)
    assert target.read_text().split() == ["clip_id", "c1", "c2", "c3"]
    with pytest.raises(QueryError):  # still a guarded error path for bad SQL
        run_query(dataset, "SELEC 1", allow_external=True)


def test_errors_carry_duckdb_message_and_a_hint(dataset: Path) -> None:
    with pytest.raises(QueryError) as info:
        run_query(dataset, "SELECT no_such_column FROM clips")
    msg = str(info.value)
    assert "no_such_column" in msg and "clips(clip_id" in msg and "videos(video_id" in msg
    with pytest.raises(QueryError, match="syntax error"):
        run_query(dataset, "SELEC * FROM clips")
    with pytest.raises(QueryError, match="(?i)table with name nope"):
        run_query(dataset, "SELECT * FROM nope")
    with pytest.raises(QueryError, match="no SQL statement"):
        run_query(dataset, "  ")


# ------------------------------------------------------------------ output


def _result(dataset: Path) -> pa.Table:
    return run_query(dataset, "SELECT clip_id, duration_s, kept, reject_reasons, media, caption, width "
                              "FROM clips ORDER BY clip_id")


def test_csv_round_trip(dataset: Path, tmp_path: Path) -> None:
    t = _result(dataset)
    path = tmp_path / "r.csv"
    write_result(t, "csv", path)
    back = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    assert back["clip_id"].to_pylist() == ["c1", "c2", "c3"]
    assert back["duration_s"].to_pylist() == [2.0, 2.0, 2.0]
    assert back["kept"].to_pylist() == [True, False, True]
    assert back["width"].to_pylist() == [64, 64, 64]
    assert back["media"].to_pylist() == ["<4 bytes>", None, "<4 bytes>"]
    assert [json.loads(x) for x in back["reject_reasons"].to_pylist()] == [[], ["dark"], []]
    assert back["caption"].to_pylist() == [None, None, "a cat"]


def test_json_lines_round_trip(dataset: Path, tmp_path: Path) -> None:
    t = _result(dataset)
    path = tmp_path / "r.jsonl"
    write_result(t, "json", path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    expected = t.to_pylist()
    for row in expected:
        row["media"] = None if row["media"] is None else f"<{len(row['media'])} bytes>"
    assert rows == expected
    assert result_text(t, "json") == path.read_text()


def test_parquet_round_trip_keeps_bytes_and_types(dataset: Path, tmp_path: Path) -> None:
    t = run_query(dataset, "SELECT * FROM clips ORDER BY clip_id")
    path = tmp_path / "r.parquet"
    write_result(t, "parquet", path)
    assert pq.read_table(path).equals(t)
    with pytest.raises(QueryError, match="output path"):
        write_result(t, "parquet")


def test_unknown_format_is_refused(dataset: Path) -> None:
    with pytest.raises(QueryError, match="unknown output format"):
        write_result(_result(dataset), "xml")


def test_table_format_is_aligned_and_summarises_bytes_and_lists(capsys: pytest.CaptureFixture[str]) -> None:
    t = pa.table({
        "name": ["a", "bbbbbb"],
        "n": pa.array([1, 12345], pa.int64()),
        "blob": pa.array([b"x" * 1000, None], pa.binary()),
        "items": pa.array([list(range(20)), []], pa.list_(pa.int64())),
        "text": ["y" * 500, "short"],
    })
    write_result(t, "table")
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split(" | ")[0].strip() == "name"
    assert "<1000 bytes>" in text and "NULL" in text
    assert "+12" in text  # 20 items, 8 shown
    assert "y" * 500 not in text and "…" in text
    assert len({line.index("|") for line in lines[:1] + lines[2:4]}) == 1  # columns aligned
    assert lines[-1] == "(2 rows)"
    assert format_table(t, max_rows=1).splitlines()[-1] == "(2 rows, 1 shown)"


def test_stdout_csv(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_result(run_query(dataset, "SELECT clip_id FROM clips ORDER BY 1"), "csv")
    assert capsys.readouterr().out.split() == ["clip_id", "c1", "c2", "c3"]


def test_shard_committed_later_needs_a_new_connection(dataset: Path) -> None:
    """A connection reads the shards committed when it was opened; run_query opens a fresh one each call."""
    con = connect(dataset)
    try:
        with ShardWriter(dataset) as w:  # the writer's recovery also deletes the stray files
            w.commit(_videos({"video_id": "v3", "uri": "c.mp4", "status": "done"}), _clips(_clip("c4", "v3")))
        assert con.execute("SELECT count(*) FROM clips").fetchone() == (3,)
    finally:
        con.close()
    assert run_query(dataset, "SELECT count(*) AS n FROM clips").to_pylist() == [{"n": 4}]


def test_copy_of_dataset_elsewhere_is_queryable(dataset: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(dataset, moved)
    assert run_query(moved, "SELECT count(*) AS n FROM clips").to_pylist() == [{"n": 3}]
