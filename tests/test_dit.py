"""The DiT model, objective, masks, buckets and batch sampler (fast; no dataset needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipmill.dit import toy
from clipmill.dit.data import (
    BucketBatchSampler,
    Clip,
    DataError,
    bucket_shapes,
    decode_mp4,
    fit_frames,
    parse_text_spec,
    plan_buckets,
)
from clipmill.dit.model import DiT, apply_rope, flow_loss, preset, random_frame_masks, rope_3d, sample_flow


def _tiny(**kw):
    return DiT(preset("tiny", width=48, depth=2, heads=2, text_dim=16, **kw))


def test_velocity_has_the_input_shape_at_any_size_and_bad_sizes_fail():
    torch.manual_seed(0)
    model = _tiny()
    text, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    for shape in [(8, 32, 32), (4, 16, 48), (2, 12, 8), (10, 24, 20)]:
        x = torch.randn(2, 3, *shape)
        assert model(x, torch.rand(2), text, mask).shape == x.shape
    with pytest.raises(ValueError, match="multiples of the patch"):
        model(torch.randn(1, 3, 3, 32, 32), torch.rand(1), text[:1], mask[:1])
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_all_text_dropped_still_attends_to_the_null_token():
    torch.manual_seed(0)
    model = _tiny()
    for p in model.parameters():  # break the zero init so the output depends on the input
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(1, 3, 4, 16, 16), torch.rand(1)
    out = model(x, t, torch.randn(1, 3, 16), torch.zeros(1, 3, dtype=torch.bool))
    assert torch.isfinite(out).all()
    with_text = model(x, t, torch.randn(1, 3, 16), torch.ones(1, 3, dtype=torch.bool))
    assert not torch.allclose(out, with_text)


def test_place_embedding_lets_the_model_put_structure_into_a_uniform_input():
    """From pure noise a model must still know the left edge from the right one (RoPE alone is relative).

    With a spatially uniform input every patch has the same features; without the place embedding attention
    averages identical values and every patch gets the same velocity, with it the velocity varies by place.
    """
    text, mask = torch.randn(1, 3, 16), torch.ones(1, 3, dtype=torch.bool)
    x = torch.full((1, 3, 4, 16, 16), 0.3)
    spread = {}
    for octaves in (0, 4):
        torch.manual_seed(0)
        model = _tiny(abs_pos=octaves)
        for p in model.parameters():  # break the zero init so the output depends on the input
            torch.nn.init.normal_(p, std=0.05)
        out = model(x, torch.full((1,), 1.0), text, mask)
        same_offset = out[:, :, 0::2, 0::4, 0::4]  # one value per patch (patch (2, 4, 4)), same place inside it
        spread[octaves] = float(same_offset.std(dim=(2, 3, 4)).max())
    assert spread[0] < 1e-4 and spread[4] > 1e-2
    # the features name the place as a fraction of the grid: the same at any size for the same place
    place = DiT(preset("tiny", width=48, depth=2, heads=2, text_dim=16)).place
    small, large = place.features((1, 2, 2)), place.features((1, 6, 6))
    assert small.shape == (4, 24) and large.shape == (36, 24)
    assert torch.allclose(small[0], large[1 * 6 + 1], atol=1e-6)  # centre (0.25, 0.25) of both grids
    with pytest.raises(ValueError, match="abs_pos"):
        preset("tiny", abs_pos=-1)


def test_rope_is_identity_at_the_origin_and_keeps_norms():
    cos, sin = rope_3d((2, 3, 4), 24, 10000.0)
    assert cos.shape == (24, 12)
    x = torch.randn(1, 2, 24, 24)
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y[:, :, 0], x[:, :, 0])  # position (0, 0, 0)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    # attention scores depend only on the offset: shifting both positions by one frame keeps q.k
    q = apply_rope(torch.randn(24).expand(1, 1, 24, 24), cos, sin)[0, 0]  # the same query at every position
    k = apply_rope(torch.randn(24).expand(1, 1, 24, 24), cos, sin)[0, 0]
    # positions 0 = (0,0,0), 1 = (0,0,1), 12 = (1,0,0), 13 = (1,0,1): (0 -> 1) and (12 -> 13) have the same offset
    assert torch.allclose(q[0] @ k[1], q[12] @ k[13], atol=1e-4)
    assert not torch.allclose(q[0] @ k[1], q[0] @ k[13], atol=1e-3)


def test_random_frame_masks_cover_the_conditioning_modes():
    masks = random_frame_masks(400, 8, 1.0, torch.Generator().manual_seed(1))
    rows = {tuple(int(v) for v in m) for m in masks}
    assert (1, 0, 0, 0, 0, 0, 0, 0) in rows  # image-to-video
    assert (1, 0, 0, 0, 0, 0, 0, 1) in rows  # infill
    assert any(r[0] == 1 and r[-1] == 0 and sum(r) > 1 for r in rows)  # extend forward (a prefix)
    assert any(r[0] == 0 and r[-1] == 1 for r in rows)  # extend backward (a suffix)
    assert all(0 < sum(r) < 8 for r in rows)
    assert random_frame_masks(50, 8, 0.0).sum() == 0


def test_loss_falls_on_a_fixed_batch_of_real_decoded_video(tmp_path):
    from clipmill.synth import write_video

    videos = []
    for i, (color, direction) in enumerate([("red", "left"), ("blue", "down")]):
        path = tmp_path / f"{i}.mp4"
        write_video(path, toy.render(color, direction, size=32, frames=8), 8)
        videos.append(decode_mp4(path.read_bytes()))
    x0 = torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    torch.manual_seed(0)
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    text, mask = torch.randn(2, 4, 16), torch.ones(2, 4, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    t, noise = torch.rand(2, generator=gen), torch.randn(x0.shape, generator=gen)
    fm = torch.tensor([[1.0] + [0.0] * 7, [0.0] * 8])

    def loss():
        return flow_loss(model, x0, text, mask, fm, t, noise)

    first = loss().item()
    for _ in range(25):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert loss().item() < 0.7 * first, (first, loss().item())


def test_sampler_keeps_given_frames_and_returns_the_shape():
    torch.manual_seed(0)
    model = _tiny().eval()
    noise = torch.randn(1, 3, 4, 16, 16)
    cond = torch.rand(1, 3, 4, 16, 16)
    fm = torch.tensor([[1.0, 0, 0, 1.0]])
    text, mask = torch.randn(1, 2, 16), torch.ones(1, 2, dtype=torch.bool)
    out = sample_flow(model, noise, text, mask, torch.zeros_like(mask), steps=3, cfg=2.0, cond=cond, frame_mask=fm)
    assert out.shape == noise.shape
    assert torch.equal(out[:, :, 0], cond[:, :, 0]) and torch.equal(out[:, :, 3], cond[:, :, 3])
    assert not torch.equal(out[:, :, 1], cond[:, :, 1])


# ------------------------------------------------------------------------------------------ data
def _clip(i, w, h, n):
    return Clip(f"c{i:03d}", b"", w, h, n, 8.0, {"caption": f"clip {i}"})


def test_buckets_follow_native_aspect_and_length():
    shapes = bucket_shapes(32, 4)
    assert all(h % 4 == 0 and w % 4 == 0 for h, w in shapes)
    assert all(abs(h * w - 1024) / 1024 < 0.3 for h, w in shapes)
    clips = [_clip(0, 1920, 1080, 100), _clip(1, 1080, 1920, 100), _clip(2, 640, 640, 5), _clip(3, 640, 480, 1)]
    buckets, counts = plan_buckets(clips, size=32, frames=8, multiple=4, t_multiple=2)
    (f0, h0, w0), (f1, h1, w1), (f2, h2, w2) = buckets[:3]
    assert w0 > h0 and h1 > w1 and h2 == w2
    assert abs(w0 / h0 - 16 / 9) < 0.3 and (f0, f1) == (8, 8)
    assert f2 == 4  # 5 frames: the half-length bucket
    assert buckets[3] is None  # 1 frame < the shortest bucket (2 frames: one temporal patch)
    assert sum(counts.values()) == 3


def test_batch_sampler_invariants_ranks_and_resume():
    rng = np.random.default_rng(0)
    buckets = [tuple(rng.choice([(8, 32, 32), (8, 24, 40), (4, 32, 32)])) for _ in range(37)] + [None]
    s = BucketBatchSampler(buckets, 4, seed=3)
    for epoch in range(3):
        batches = s.epoch_batches(epoch)
        seen = [i for b in batches for i in b]
        assert len(seen) == len(set(seen)) == 37  # every clip once, the unbucketed one never
        assert all(len({buckets[i] for i in b}) == 1 and 1 <= len(b) <= 4 for b in batches)
    assert s.epoch_batches(0) != s.epoch_batches(1)
    r0, r1 = (BucketBatchSampler(buckets, 4, seed=3, rank=r, world_size=2).epoch_batches(0) for r in (0, 1))
    assert len(r0) == len(r1) and not {i for b in r0 for i in b} & {i for b in r1 for i in b}
    straight = BucketBatchSampler(buckets, 4, seed=3)
    it = iter(straight)
    expected = [next(it) for _ in range(25)]
    first = BucketBatchSampler(buckets, 4, seed=3)
    it = iter(first)
    got = [next(it) for _ in range(11)]
    resumed = BucketBatchSampler(buckets, 4, seed=3)
    resumed.load_state(first.state())
    it = iter(resumed)
    got += [next(it) for _ in range(14)]
    assert got == expected
    with pytest.raises(DataError, match="no clip fits"):
        BucketBatchSampler([None, None], 2)


def test_fit_frames_and_text_spec():
    video = np.zeros((3, 90, 160, 3), np.uint8)
    video[:, :, 70:90] = 255  # a bright vertical bar in the middle survives the centre crop
    out = fit_frames(video, 32, 40)
    assert out.shape == (3, 32, 40, 3) and out[:, :, 20].mean() > 200
    assert parse_text_spec("prompt_long:3,caption:1") == [("prompt_long", 0.75), ("caption", 0.25)]
    with pytest.raises(DataError, match="unknown"):
        parse_text_spec("title")
    with pytest.raises(DataError, match="positive"):
        parse_text_spec("caption:-1")
