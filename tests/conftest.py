"""Shared fixtures: one local Ray for the whole session, the shared real test videos, ERROR logs fail tests."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO.parent / "shared" / "testdata"
SAMPLES = REPO / "samples"


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The shared real videos with ground truth (../shared/testdata); skips with the reason when absent."""
    if not (TESTDATA / "truth.json").exists():
        pytest.skip(f"shared test videos not found at {TESTDATA} (they live beside the repository, in shared/)")
    return TESTDATA


@pytest.fixture(scope="session")
def ray_session():
    """One embedded local Ray for the whole test session (2 CPUs, small object store); yields its address."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def small_recipe_path(tmp_path_factory) -> Path:
    """The default recipe without the OCR/NSFW/motion models (faster), 1-3 s clips at 128 px, one video per shard."""
    import yaml

    from clipmill.pipeline.recipe import load_recipe

    data = load_recipe("default").to_json()
    data.pop("source")
    data["stages"] = [st for st in data["stages"] if next(iter(st)) not in ("ocr", "safety", "motion")]
    for st in data["stages"]:
        if "split" in st:
            st["split"].update(min_s=1.0, max_s=3.0)
        if "transcode" in st:
            st["transcode"].update(max_side=128)
        if "filter" in st:
            st["filter"].update(min_sharpness=None, max_motion_score=None, max_text_area=None, max_nsfw_score=None)
    data["write"]["shard_videos"] = 1
    p = tmp_path_factory.mktemp("recipe") / "small.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


CAPTIONS = {"wide.mp4": "a wide test scene", "tall.mp4": "a tall test scene", "square.mp4": "a still square"}


@pytest.fixture(scope="session")
def captioned_dataset(ray_session, tmp_path_factory) -> dict:
    """The real pipeline over three generated videos (16:9, 9:16, a static 1:1 whose clips are rejected and keep
    no media), from a CSV manifest with captions (`CAPTIONS`), one video per shard. Tests must not write to it.
    Returns out, items, recipe (path), clips (clip_id -> row), captions."""
    import csv

    import yaml

    from clipmill import synth
    from clipmill.pipeline.inputs import expand_inputs
    from clipmill.pipeline.recipe import load_recipe
    from clipmill.pipeline.runner import run
    from clipmill.storage.shards import read_table

    root = tmp_path_factory.mktemp("captioned")
    vids = root / "in"
    vids.mkdir()
    synth.make_case("cuts", vids / "wide.mp4", width=320, height=180)
    synth.make_case("cuts", vids / "tall.mp4", width=180, height=320, seed=7)
    synth.make_case("static", vids / "square.mp4", width=240, height=240)
    manifest = root / "inputs.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "caption"])
        for name, cap in CAPTIONS.items():
            w.writerow([str(vids / name), cap])
    recipe = {"name": "captioned-test", "stages": [
        {"probe": {}}, {"split": {"min_s": 1.0, "max_s": 3.0}}, {"transcode": {"max_side": 256}},
        {"frames": {"n": 8, "max_side": 128}}, {"quality": {}}, {"filter": {"min_sharpness": None}}],
        "write": {"media": "kept", "shard_videos": 1}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    items = expand_inputs([str(manifest)])
    out = root / "ds"
    run(items, out, load_recipe(root / "recipe.yaml"))
    clips = {r["clip_id"]: r for r in read_table(out, "clips").to_pylist()}
    return {"out": out, "items": items, "recipe": root / "recipe.yaml", "clips": clips, "captions": CAPTIONS}


@pytest.fixture(autouse=True)
def _fail_on_error_logs(caplog):
    """A test that logs at ERROR (from clipmill code) fails: errors must be handled, not just logged."""
    yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR and r.name.startswith("clipmill")]
    if errors:
        pytest.fail("ERROR logged: " + "; ".join(r.getMessage() for r in errors))


@pytest.fixture
def clipmill_env() -> dict[str, str]:
    """Environment for running the CLI in a subprocess (no inherited RAY_ADDRESS)."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env
