"""Filter thresholds -> kept / reject_reasons; NULL scores never reject."""

from __future__ import annotations

import pyarrow as pa

from clipmill.stages.filter import Filter, FilterConfig, reject_reasons

GOOD = {"brightness": 120.0, "contrast": 40.0, "sharpness": 300.0, "black_fraction": 0.0, "static": False,
        "brisque": 20.0, "blockiness": 1.0, "exposure": 0.01, "slideshow": False, "motion_score": 0.05,
        "text_area": 0.0, "nsfw_score": 0.01, "aesthetic_score": 6.0, "clip_duration_s": 4.0}
STRICT = FilterConfig(min_sharpness=150, max_brisque=50, max_blockiness=2, max_exposure=0.2, reject_slideshow=True,
                      min_motion_score=0.01, max_motion_score=1.0, max_text_area=0.05, max_nsfw_score=0.5,
                      min_aesthetic_score=4.5, min_duration_s=2)


def test_good_clip_passes_every_threshold():
    assert reject_reasons(GOOD, STRICT) == []


def test_each_failed_threshold_is_one_reason():
    bad = dict(GOOD, brightness=5.0, sharpness=90.0, black_fraction=0.9, static=True, brisque=70.0,
               blockiness=3.0, exposure=0.5, slideshow=True, motion_score=0.001, text_area=0.2, nsfw_score=0.9,
               aesthetic_score=3.0, clip_duration_s=1.0)
    assert reject_reasons(bad, STRICT) == [
        "brightness<16", "sharpness<150", "black_fraction>0.5", "static", "brisque>50", "blockiness>2",
        "exposure>0.2", "slideshow", "motion_score<0.01", "text_area>0.05", "nsfw_score>0.5",
        "aesthetic_score<4.5", "duration_s<2"]


def test_missing_scores_never_reject():
    assert reject_reasons({"clip_duration_s": 4.0}, STRICT) == []


def test_stage_writes_kept_and_reasons():
    batch = pa.Table.from_pylist([dict(GOOD, clip_index=0, error=None), dict(GOOD, clip_index=1, text_area=0.3,
                                                                               error=None)])
    out = Filter(STRICT)(batch).to_pylist()
    assert [r["kept"] for r in out] == [True, False]
    assert out[1]["reject_reasons"] == ["text_area>0.05"]
