"""`clipmill report`: the HTML report of a real pipeline run, checked as text and in headless Chromium.

The dataset comes from the real pipeline (Ray, default recipe with short clips) over generated videos: one
kept-clip video with a hostile file name, one static video whose clips are all dropped, and a text file
posing as a video (a rejected input, also with a hostile name). On top, one shard is committed with the real
writer whose text columns (caption, prompts, OCR text, URI, a reject reason) carry markup, as text from any
outside source may: the page must show all of it as text and run none of it.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
import yaml

from clipmill import badfiles, synth
from clipmill.pipeline.inputs import expand_inputs
from clipmill.pipeline.recipe import load_recipe
from clipmill.pipeline.runner import run
from clipmill.storage.report import ReportConfig, ReportError, build_report, svg_histogram, write_report
from clipmill.storage.schema import CLIPS_SCHEMA, STATUS_DONE, STATUS_REJECTED
from clipmill.storage.shards import ShardWriter, committed_files, read_table

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]

HOSTILE_NAME = '<img src=x onerror="window.__pwned=1">.mp4'
HOSTILE_BROKEN = "<b onmouseover=window.__pwned=7>notes.mp4"
HOSTILE = {
    "caption": "</script><script>window.__pwned=2</script> a dog runs",
    "ocr_text": "<script>window.__pwned=3</script>",
    "prompt_short": "<img src=x onerror=window.__pwned=4> prompt",
    "prompt_long": "<iframe srcdoc='<script>parent.__pwned=5</script>'></iframe>",
    "uri": "s3://bucket/<svg onload=window.__pwned=6>.mp4",
}
HOSTILE_REASON = "<svg onload=window.__pwned=8>"


@pytest.fixture(scope="module")
def dataset(ray_session, tmp_path_factory) -> Path:
    """A dataset written by the real pipeline plus one shard of hostile text (see the module docstring)."""
    root = tmp_path_factory.mktemp("report")
    inputs = root / "in"
    inputs.mkdir()
    synth.make_case("cuts", inputs / HOSTILE_NAME, width=320, height=180)
    synth.make_case("static", inputs / "static.mp4", width=320, height=180)
    badfiles.make_text(inputs, name=HOSTILE_BROKEN)
    data = load_recipe("default").to_json()
    data.pop("source")
    for st in data["stages"]:
        if "split" in st:
            st["split"].update(min_s=1.0, max_s=3.0)
        if "transcode" in st:
            st["transcode"].update(max_side=256)
        if "filter" in st:
            st["filter"].update(min_sharpness=None)  # the default is calibrated for max_side 512
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    out = root / "ds"
    run(expand_inputs([str(inputs)]), out, load_recipe(recipe))

    clips = read_table(out, "clips")
    kept = [c for c in clips.to_pylist() if c["kept"]]
    dropped = [c for c in clips.to_pylist() if not c["kept"]]
    assert kept and dropped, "the generated inputs must give kept and dropped clips"
    bad_clip = dict(kept[0], clip_id="hostile-clip-0", video_id="hostile-video", **HOSTILE)
    bad_drop = dict(dropped[0], clip_id="hostile-clip-1", video_id="hostile-video", uri=HOSTILE["uri"],
                    reject_reasons=[HOSTILE_REASON], ocr_text=HOSTILE["ocr_text"])
    video = {"video_id": "hostile-video", "uri": HOSTILE["uri"], "status": STATUS_DONE, "duration_s": 4.0,
             "n_clips": 2, "n_kept": 1, "codec": "<i>h264</i>"}
    with ShardWriter(out) as w:
        w.commit(pa.Table.from_pylist([video]), pa.Table.from_pylist([bad_clip, bad_drop]))
    return out


@pytest.fixture(scope="module")
def report_file(dataset, tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("page") / "report.html"
    summary = write_report(dataset, path)
    assert summary.path == str(path) and summary.bytes == path.stat().st_size
    return path, path.read_text(encoding="utf-8")


@pytest.mark.slow
def test_figures_match_the_shards(dataset, report_file):
    _, page = report_file
    con = duckdb.connect()
    files = [str(p) for p in committed_files(dataset, "clips")]
    n, kept = con.execute("SELECT count(*), count(*) FILTER (WHERE kept) FROM read_parquet(?)", [files]).fetchone()
    vfiles = [str(p) for p in committed_files(dataset, "videos")]
    inputs, done = con.execute("SELECT count(*), count(*) FILTER (WHERE status = 'done') FROM read_parquet(?)",
                               [vfiles]).fetchone()
    assert inputs == 4 and done == 3  # 2 videos + 1 rejected text file + the hostile shard's video
    for key, value in (("inputs", inputs), ("readable", done), ("clips", n), ("kept", kept)):
        assert f'<div class="stat" id="funnel-{key}"><div class="big">{value:,}</div>' in page
    # every reject reason is counted and sampled
    reasons = dict(con.execute("SELECT r, count(*) FROM (SELECT unnest(reject_reasons) AS r FROM read_parquet(?)) "
                               "GROUP BY r", [files]).fetchall())
    assert "static" in reasons
    for reason, count in reasons.items():
        assert f'<span class="reason">{html.escape(reason)}</span> <span class="sub">{count:,} clips' in page
    # a histogram per score the run measured, with the recipe's thresholds drawn on it
    assert 'data-score="brightness"' in page and 'data-score="motion_score"' in page
    assert 'data-score="aesthetic_score"' not in page  # aesthetics is off in the default recipe: no values
    hist = page[page.index('data-score="brightness"'):]
    hist = hist[: hist.index("</figure>")]
    assert 'class="threshold"' in hist or "offscale" in hist
    assert ">min 16<" in hist.replace("</text>", "<") or "min 16 " in hist
    # the page is self-contained: nothing to fetch, a CSP that forbids fetching
    assert "http://" not in page and "https://" not in page
    assert "default-src &#x27;none&#x27;" in page
    # stage timings, per-stage throughput and queue depths from run.json
    assert 'aria-label="seconds per stage"' in page and ">transcode<" in page
    meta = json.loads((dataset / "run.json").read_text())
    stages = meta["runs"][0]["metrics"]["stages"]
    assert '<table class="metrics">' in page and "video s / busy s" in page
    table = page[page.index('<table class="metrics">'):]
    for name in stages:
        assert f"<tr><td>{name}</td>" in table[: table.index("</table>")], name
    assert 'aria-label="rows waiting per stage over time"' in page or len(meta["runs"][0]["metrics"]["queue"]["t_s"]) < 2


@pytest.mark.slow
def test_hostile_text_is_escaped(report_file):
    _, page = report_file
    for text in [HOSTILE_NAME, HOSTILE_BROKEN, HOSTILE_REASON, "<i>h264</i>", *HOSTILE.values()]:
        assert text not in page, text
        assert html.escape(text, quote=True) in page, text
    assert page.count("<script") == page.count("</script>")
    # only the page's own script and the (non-executable) media blobs are script elements
    assert page.count("<script>") == 1
    assert page.count("<script") - 1 == page.count('<script type="application/x-clipmill-mp4"')


@pytest.mark.slow
def test_media_cap_falls_back_to_thumbnails(dataset):
    page, summary = build_report(dataset, ReportConfig(max_media_mb=0))
    assert summary.media_embedded == 0 and summary.media_skipped >= 1
    assert ' data-media="m' not in page and '<script type="application/x-clipmill-mp4"' not in page
    assert "video not embedded (page media cap reached)" in page
    small, s2 = build_report(dataset, ReportConfig(gallery=1, per_reason=1))
    assert s2.gallery == 1 and s2.media_embedded == 1 and small.count(' data-media="m') == 1


@pytest.mark.slow
def test_report_in_headless_chromium(report_file, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (Debian package chromium); the browser test needs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the playwright package")
    path, _ = report_file
    problems: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("request", lambda r: problems.append(f"request: {r.url}")
                    if not r.url.startswith(("file:", "data:", "blob:")) else None)
            page.goto(path.as_uri(), wait_until="load")
            # plots: one histogram per score, each with bars; threshold lines drawn
            hists = page.eval_on_selector_all("svg.hist", "els => els.map(e => e.querySelectorAll('rect.bar').length)")
            assert len(hists) >= 8 and all(n > 0 for n in hists), hists
            assert page.locator("svg.hist line.threshold").count() >= 1
            # thumbnails decoded
            thumbs = page.eval_on_selector_all("img.thumb", "els => els.map(e => [e.complete, e.naturalWidth])")
            assert thumbs and all(c and w > 0 for c, w in thumbs), thumbs
            # clicking a gallery clip plays it: the video gets frames and its clock advances
            frame = page.locator("#gallery .frame[data-media]").first
            frame.scroll_into_view_if_needed()
            frame.click()
            page.wait_for_function(
                "() => { const v = document.querySelector('#gallery video'); "
                "return v && v.readyState >= 2 && v.currentTime > 0.2; }", timeout=15000)
            size = page.evaluate("() => { const v = document.querySelector('#gallery video'); "
                                 "return [v.videoWidth, v.videoHeight, v.error && v.error.message]; }")
            assert size[0] > 0 and size[1] > 0 and size[2] is None, size
            # hovering another clip plays it too
            others = page.locator("#gallery .frame[data-media]")
            if others.count() > 1:
                others.nth(1).hover()
                page.wait_for_function("() => document.querySelectorAll('#gallery video').length >= 2 && "
                                       "document.querySelectorAll('#gallery video')[1].currentTime > 0", timeout=15000)
            # hostile text: shown as text, never run
            assert page.evaluate("() => window.__pwned === undefined && parent.__pwned === undefined")
            assert page.locator("img[src='x'], iframe, svg[onload], b[onmouseover]").count() == 0
            text = page.inner_text("body")
            for t in (HOSTILE["caption"], HOSTILE["ocr_text"], HOSTILE["prompt_short"], HOSTILE_REASON):
                assert t in text, t
            assert HOSTILE_NAME in page.eval_on_selector_all(".card .src", "els => els.map(e => e.title).join('\\n')")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 50_000
            keep = os.environ.get("CLIPMILL_REPORT_SCREENSHOT")
            if keep:
                shutil.copy(shot, keep)
        finally:
            browser.close()
    assert not problems, problems


def test_histogram_svg_draws_thresholds_and_escapes():
    bins = [{"lo": i, "hi": i + 1, "kept": i, "dropped": 3} for i in range(5)]
    svg = svg_histogram(bins, [("min", 1.5), ("max", 9.0)], label="<x>", lo=0, hi=5)
    assert svg.count('class="bar kept"') == 4 and svg.count('class="bar dropped"') == 5
    assert svg.count('class="threshold"') == 1 and "offscale" in svg and "→" in svg
    assert 'aria-label="&lt;x&gt;"' in svg and "<x>" not in svg


def test_report_of_a_dataset_without_clips(tmp_path):
    out = tmp_path / "ds"
    with ShardWriter(out) as w:
        w.commit(pa.Table.from_pylist([{"video_id": "v1", "uri": "/in/a.mp4", "status": STATUS_REJECTED,
                                        "reason": "unreadable: moov atom not found"}]),
                 CLIPS_SCHEMA.empty_table())
    page, summary = build_report(out)
    assert summary.clips == 0 and summary.gallery == 0
    assert "No kept clip." in page and "No clip has a score yet." in page and "run.json records no run." in page
    assert "unreadable" in page and "/in/a.mp4" in page


def test_cli_errors_are_one_line(tmp_path):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "clipmill", "report", str(tmp_path), "-o", str(tmp_path / "r.html")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("clipmill: error: ") and "not a clipmill dataset" in r.stderr
    with pytest.raises(ReportError, match="not a directory"):
        build_report(tmp_path / "missing")


@pytest.mark.slow
def test_cli_writes_the_report(dataset, tmp_path):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    dest = tmp_path / "r.html"
    r = subprocess.run([sys.executable, "-m", "clipmill", "report", str(dataset), "-o", str(dest), "--gallery", "2"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert dest.read_text(encoding="utf-8").startswith("<!doctype html>")
    assert f"wrote {dest}" in r.stdout and "gallery 2" in r.stdout
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("run_json", [
    "[1, 2]",
    '{"recipe": [1], "runs": "x", "versions": 3}',
    '{"recipe": {"stages": "x", "name": "<b>r</b>"}, "runs": [1, {"progress": 2, "metrics": {"stages": {"a": 1}, '
    '"stage_order": 5, "queue": {"t_s": [0, "x"]}}}]}',
    '{"runs": [{"metrics": {"stages": {"a": {"busy_s": "x"}}, "stage_order": ["a"], "queue": {"t_s": [0, 1, 2], '
    '"videos_in_ray": [1, "x"], "stage_waiting_rows": {"a": 5}}}}]}',
    '{"runs": [{"argv": ["<script>window.__pwned=9</script>"], "started_at": 5, "progress": {"elapsed_s": 0, '
    '"video_seconds": "a", "stage_seconds": [1], "clip_rejects": {"<i>": {"b": 1}}}, "global_steps": {"dedup": 5}}]}',
])
def test_malformed_run_json_is_tolerated(tmp_path, run_json):
    out = tmp_path / "ds"
    with ShardWriter(out) as w:
        w.commit(pa.Table.from_pylist([{"video_id": "v1", "uri": "/in/a.mp4", "status": STATUS_REJECTED}]),
                 CLIPS_SCHEMA.empty_table())
    (out / "run.json").write_text(run_json)
    page, _ = build_report(out)
    assert page.startswith("<!doctype html>") and page.count("<script>") == 1
    assert "<b>r</b>" not in page and "<i>" not in page and "window.__pwned=9</script>" not in page
