"""Invisible watermark of generated video: bit accuracy after re-encoding and resizing, PSNR, cost per frame.

Real frames (the shared bigbuckbunny/bikes/counter videos decoded with PyAV, 24 frames each) and one generated
toy clip (moving shapes, 128x128) go through `write_generated_video` (NSFW check, watermark, H.264 crf 16,
C2PA signing with a generated test certificate). Then, on the frames decoded from the written file:

* written:        the file as written (read by `check_generated`, expected payload from its manifest)
* crf35:          re-encoded with libx264 crf 35 (no manifest any more)
* 300k:           re-encoded with libx264 at 300 kbit/s
* half:           0.5x resize (area, rounded down to even sizes for H.264), kept in memory, read at the small
                  size ("naive") and after scaling back 2x by pixel replication (what `check_generated` tries when the tag is not found)
* half_crf23:     0.5x resize then H.264 crf 23 at the small size, read through `check_generated`
* unmarked:       the original video through `check_generated` (false-positive check; every scale tried)

Bit accuracy = fraction of the 48 payload bits read correctly (majority over every 4x4 block of every frame);
detected = at least 14 of the 16 tag bits; crc = the 8-bit checksum matches. PSNR of watermarked vs original
frames (RGB, before encoding). Reference measured in the same run: PyAV decode and libx264 encode (crf 16) per
frame of the same frames, so embed/decode costs print as ratios. Prints a table; the last line is one JSON
object; writes bench/results/watermark.json.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
TESTDATA = HERE.parents[1] / "shared" / "testdata"
N_FRAMES = 24
SOURCES = (("bigbuckbunny.mp4", (512, 288)), ("bikes.mp4", (640, 272)), ("counter.mp4", (480, 270)))


def decode(path: Path | io.BytesIO, n: int | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    scale = {} if size is None else {"width": size[0], "height": size[1]}
    out = []
    with av.open(path) as c:
        for i, f in enumerate(c.decode(video=0)):
            if n is not None and i >= n:
                break
            out.append(f.to_ndarray(format="rgb24", **scale))
    return np.stack(out)


def encode(frames: np.ndarray, path: Path, **opts: str) -> None:
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=25)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        if "bit_rate" in opts:
            s.bit_rate = int(opts.pop("bit_rate"))
        s.options = opts
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def toy_frames(n: int = N_FRAMES, side: int = 128) -> np.ndarray:
    out = []
    for t in range(n):
        f = np.full((side, side, 3), (30, 30, 60), np.uint8)
        cv2.circle(f, (16 + 4 * t, side // 2), 14, (220, 40, 40), -1)
        cv2.rectangle(f, (side - 40, 10 + 3 * t), (side - 10, 40 + 3 * t), (40, 200, 90), -1)
        out.append(f)
    return np.stack(out)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def run_one(name: str, frames: np.ndarray, work: Path, signer, original: Path | None) -> dict:
    from clipmill.dit import mark

    h, w = frames.shape[1:3]
    expected = mark.watermark_payload(0x5A5A5A)
    # reference costs on the same frames: libx264 encode and PyAV decode
    t = time.perf_counter()
    encode(frames, work / "ref.mp4", crf="16")
    enc_ms = (time.perf_counter() - t) * 1000 / len(frames)
    t = time.perf_counter()
    decode(work / "ref.mp4")
    dec_ms = (time.perf_counter() - t) * 1000 / len(frames)
    t = time.perf_counter()
    marked = mark.embed_watermark(frames, expected)
    embed_ms = (time.perf_counter() - t) * 1000 / len(frames)
    t = time.perf_counter()
    mark.decode_watermark(marked, expected)
    read_ms = (time.perf_counter() - t) * 1000 / len(frames)

    gen = work / f"{name}.mp4"
    t = time.perf_counter()
    info = mark.write_generated_video(frames, 25, gen, prompt=f"benchmark {name}", model="bench", signer=signer,
                                      video_id=0x5A5A5A)
    write_s = time.perf_counter() - t
    written = decode(gen)
    acc = {}

    def reading(tag: str, fr: np.ndarray, scaled: tuple[int, int] | None = None) -> None:
        if scaled:
            fr = np.stack([cv2.resize(f, scaled, interpolation=cv2.INTER_NEAREST) for f in fr])
        r = mark.decode_watermark(fr, expected)
        acc[tag] = {"bit_accuracy": round(r["bit_accuracy"], 4), "detected": r["detected"], "crc": r["crc_ok"]}

    def via_check(tag: str, path: Path) -> None:
        r = mark.check_generated(path)["watermark"]
        acc[tag].update(check_detected=r["detected"], check_crc=r["crc_ok"], check_scaled_to=r["scaled_to"])

    reading("written", written)
    via_check("written", gen)
    encode(written, work / "crf35.mp4", crf="35")
    reading("crf35", decode(work / "crf35.mp4"))
    via_check("crf35", work / "crf35.mp4")
    encode(written, work / "300k.mp4", bit_rate="300000")
    reading("300k", decode(work / "300k.mp4"))
    via_check("300k", work / "300k.mp4")
    half = np.stack([cv2.resize(f, (w // 4 * 2, h // 4 * 2), interpolation=cv2.INTER_AREA) for f in written])
    reading("half_naive", half)
    reading("half", half, (w, h))
    encode(half, work / "half.mp4", crf="23")
    reading("half_crf23", decode(work / "half.mp4"), (w, h))
    via_check("half_crf23", work / "half.mp4")
    out = {"size": [w, h], "frames": len(frames), "psnr_db": round(psnr(marked, frames), 2),
           "embed_ms_per_frame": round(embed_ms, 1), "read_ms_per_frame": round(read_ms, 1),
           "x264_encode_ms_per_frame": round(enc_ms, 1), "pyav_decode_ms_per_frame": round(dec_ms, 1),
           "embed_vs_encode": round(embed_ms / enc_ms, 2), "read_vs_decode": round(read_ms / dec_ms, 2),
           "write_generated_video_s": round(write_s, 2), "nsfw_score": round(info["nsfw_score"], 3),
           "bytes": gen.stat().st_size, "accuracy": acc}
    if original is not None:
        r = mark.check_generated(original)["watermark"]
        out["unmarked_detected"] = r["detected"]
        out["unmarked_tag_bit_accuracy"] = r["tag_bit_accuracy"]
    return out


def main() -> None:
    from clipmill.dit import mark

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="clipmill-wm-") as tmp:
        work = Path(tmp)
        certs = mark.make_test_certificates(work / "certs")
        signer = mark.SignerConfig(certs.cert_chain, certs.private_key)
        inputs = [(name.removesuffix(".mp4"), decode(TESTDATA / name, N_FRAMES, size), TESTDATA / name)
                  for name, size in SOURCES if (TESTDATA / name).is_file()]
        inputs.append(("toy128", toy_frames(), None))
        for name, frames, original in inputs:
            d = work / name
            d.mkdir()
            print(f"{name}: {frames.shape[2]}x{frames.shape[1]}, {len(frames)} frames ...", flush=True)
            results[name] = run_one(name, frames, d, signer, original)
    conds = ("written", "crf35", "300k", "half_naive", "half", "half_crf23")
    print(f"\n{'video':14s} {'size':>9s} {'PSNR':>6s} " + " ".join(f"{c:>10s}" for c in conds)
          + "  embed ms (x enc)  read ms (x dec)")
    for name, r in results.items():
        accs = " ".join(f"{r['accuracy'][c]['bit_accuracy']:>10.3f}" for c in conds)
        print(f"{name:14s} {r['size'][0]:>4d}x{r['size'][1]:<4d} {r['psnr_db']:>6.1f} {accs}  "
              f"{r['embed_ms_per_frame']:>6.1f} ({r['embed_vs_encode']:.2f}x)  "
              f"{r['read_ms_per_frame']:>6.1f} ({r['read_vs_decode']:.2f}x)")
    summary = {c: round(float(np.mean([r["accuracy"][c]["bit_accuracy"] for r in results.values()])), 4)
               for c in conds}
    figures = {"bench": "watermark", "method": f"{mark.WATERMARK_METHOD} strength {mark.WATERMARK_SCALE}",
               "payload_bits": mark.PAYLOAD_BITS, "mean_bit_accuracy": summary,
               "false_positives": sum(bool(r.get("unmarked_detected")) for r in results.values()),
               "cpu_count": os.cpu_count(), "videos": results}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    tmp_path = out / "watermark.json.tmp"
    tmp_path.write_text(json.dumps(figures, indent=1, sort_keys=True))
    os.replace(tmp_path, out / "watermark.json")
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
