"""Input expansion: files, directories, globs, manifests, de-duplication, refusals."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipmill.pipeline.inputs import InputError, expand_inputs


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "sub").mkdir()
    for p in ("a/x.mp4", "a/sub/y.MKV", "a/notes.txt", "a/.hidden.mp4", "z.webm"):
        (tmp_path / p).write_bytes(b"")
    return tmp_path


def test_dir_glob_file_and_dedup(tree):
    items = expand_inputs([str(tree / "a"), str(tree / "*.webm"), str(tree / "a" / "x.mp4"), str(tree / "a/notes.txt")])
    names = [i.uri.split("/")[-1] for i in items]
    assert names == ["x.mp4", "y.MKV", "z.webm", "notes.txt"]


def test_missing_file_is_still_an_input(tree):
    items = expand_inputs([str(tree / "nope.mp4")])
    assert [i.uri for i in items] == [str(tree / "nope.mp4")]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifests_with_captions_and_relative_uris(tree, fmt):
    rows = [{"uri": "a/x.mp4", "caption": "a dog"}, {"uri": str(tree / "z.webm"), "caption": ""},
            {"uri": "", "caption": "no uri"}]
    path = tree / f"m.{fmt}"
    if fmt == "csv":
        path.write_text("uri,caption\n" + "\n".join(f"{r['uri']},{r['caption']}" for r in rows) + "\n")
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    items = expand_inputs([str(path)])
    assert [(i.uri, i.source_caption) for i in items] == [(str(tree / "a/x.mp4"), "a dog"), (str(tree / "z.webm"), None)]


def test_manifest_without_uri_column_and_remote_urls_are_refused(tree):
    (tree / "m.csv").write_text("path\nx.mp4\n")
    with pytest.raises(InputError, match="no 'uri' column"):
        expand_inputs([str(tree / "m.csv")])
    with pytest.raises(InputError, match="unsupported URL scheme"):
        expand_inputs(["nosuch://bucket/x.mp4"])
