"""Recipe loading and validation: every error names the key, the value and what is allowed."""

from __future__ import annotations

import pytest

from clipmill.pipeline.recipe import RecipeError, bundled_recipes, load_recipe, parse_recipe


def test_default_recipe_loads_and_orders_stages():
    rec = load_recipe("default")
    assert [s.name for s in rec.stages] == ["probe", "split", "transcode", "frames", "quality", "motion", "ocr",
                                            "safety", "embedding", "filter", "caption", "expand", "dedup"]
    assert rec.stage("split").config.min_s == 2.0
    assert {"default", "full"} <= set(bundled_recipes())
    # the frames stage decodes every frame set that later stages declare, once per clip
    assert {e.name for e in rec.stage("frames").config.extra_sets} == {"quality", "quality_seq", "motion", "ocr",
                                                                       "safety", "caption"}


def test_full_recipe_validates_without_loading_weights():
    rec = load_recipe("full")
    assert rec.stage("aesthetics").config.num_gpus == 1
    assert "model" in {e.name for e in rec.stage("frames").config.extra_sets}
    assert rec.stage("filter").config.min_aesthetic_score == 4.5


def _base(**split):
    return {"name": "t", "stages": [{"probe": {}}, {"split": split}]}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_base(min_s=-1), "stages[1].split.min_s"),
        (_base(detector="nope"), "allowed: default"),
        (_base(min_s=5, max_s=2), "max_s (2.0) must be >= min_s (5.0)"),
        (_base(bogus=1), "stages[1].split.bogus: unknown key"),
        ({"name": "t", "stages": [{"probe": {}}, {"warp": {}}]}, "unknown stage 'warp'; allowed: probe"),
        ({"name": "t", "stages": []}, "non-empty list"),
        ({"name": "t", "stagez": []}, "unknown key(s) ['stagez']"),
        ({"name": "t", "stages": [{"probe": {}}, {"split": {}}], "write": {"media": "some"}}, "write.media"),
        ({"name": "t", "stages": [{"probe": {}}, {"quality": {}}, {"split": {}}]}, "read decoded frames"),
        ({"name": "t", "stages": [{"probe": {}}]}, "must include the probe and split"),
        ({"name": "t", "stages": [{"probe": {}}, {"split": {}}, {"probe": {}}]}, "listed twice"),
        ({"name": "t", "stages": ["probe", "split", "transcode", "frames", "embedding", "dedup", "filter"]},
         "must come after every per-video stage"),
    ],
)
def test_bad_recipes_fail_with_a_clear_message(data, expected):
    with pytest.raises(RecipeError) as exc:
        parse_recipe(data, "r.yaml")
    assert expected in str(exc.value)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="no bundled recipe named 'nosuch'"):
        load_recipe("nosuch")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [probe, {split: {min_s: [}\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    code = tmp_path / "code.yaml"
    code.write_text("name: !!python/object/apply:os.system ['echo pwned']\nstages: [probe, split]\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(code)


def test_recipe_round_trips_to_json():
    rec = load_recipe("default")
    data = rec.to_json()
    data.pop("source")
    again = parse_recipe(data, "again")
    assert again.to_json()["stages"] == rec.to_json()["stages"]
