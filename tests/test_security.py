"""Security defaults: no code from model files or recipes, no secrets in datasets, nothing written outside OUT."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from clipmill.pipeline.inputs import expand_inputs
from clipmill.pipeline.recipe import load_recipe
from clipmill.pipeline.runner import run
from clipmill.stages.aesthetics import read_state_dict
from clipmill.stages.iqa import Brisque, brisque_model_dir
from clipmill.storage.shards import read_table

REPO = Path(__file__).resolve().parents[1]


class _Boom:
    """Unpickling this would run a command (it must never be unpickled)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_tampered_brisque_model_file_cannot_run_code(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(brisque_model_dir(), model)
    marker = tmp_path / "pwned"
    (model / "normalize.pickle").write_bytes(pickle.dumps({"min_": [0.0], "max_": _Boom(marker)}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        Brisque(model)
    assert not marker.exists()


def test_torch_weights_are_loaded_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "head.pth"
    torch.save({"layers.0.weight": torch.zeros(2, 2), "x": _Boom(marker)}, bad)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported"):
        read_state_dict(bad, "head_weights")
    assert not marker.exists()


def test_secrets_in_the_environment_never_reach_the_dataset(ray_session, tmp_path, monkeypatch):
    secret = "sk-clipmill-test-3f9c1e7a"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("CLIPMILL_API_KEY", secret)
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(REPO / "samples" / "carphone_pristine.mp4", src / "clip.mp4")
    out = tmp_path / "ds"
    run(expand_inputs([str(src)]), out, load_recipe("default"), argv=["run", str(src), "-o", str(out)])
    assert read_table(out, "videos").num_rows == 1
    for p in out.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p


def test_hostile_uris_stay_inputs_and_nothing_is_written_outside_out(ray_session, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(REPO / "samples" / "carphone_pristine.mp4", src / "<script>alert(1)<script>.mp4")
    manifest = src / "m.jsonl"
    manifest.write_text('{"uri": "../../../../etc/passwd"}\n{"uri": "<script>alert(1)<script>.mp4"}\n')
    out = tmp_path / "work" / "ds"
    before = {p for p in tmp_path.rglob("*")}
    run(expand_inputs([str(manifest)]), out, load_recipe("default"))
    videos = {Path(v["uri"]).name: v for v in read_table(out, "videos").to_pylist()}
    assert videos["passwd"]["status"] == "rejected"
    assert videos["<script>alert(1)<script>.mp4"]["status"] == "done"
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(out in p.parents or p == out or p == out.parent for p in created), sorted(map(str, created))
