"""Driver-kill benchmark: kill `clipmill run` at random points, rerun until complete, compare with a clean run.

Each of `--runs` runs starts a fresh OUT and injects `--kills` random driver faults in a row, each one a
`clipmill run` subprocess that is killed by either

  * a commit crash point, CLIPMILL_CRASH_AT="<before_record|after_record|mid_rename>:<N>" (random step,
    random N in 0..2: the driver SIGKILLs itself at that step of its N-th commit), or
  * SIGKILL from outside at a random time (0.5-10 s after start),

then reruns the same command until it exits 0 (at most 5 times). The final dataset is compared with a clean,
uninterrupted run made in the same invocation: `lost` counts clean-run clips missing, `duplicates` clip_ids
or inputs that occur twice, `mismatched` clips whose stored media bytes (media_sha256) differ. A second clean
run gives the baseline for `mismatched`: libx264 (via PyAV) is not byte-reproducible on every run, so
`clean_vs_clean_mismatched` says how many clips differ between two runs with no fault at all.

Ray: this process starts ONE local Ray (2 CPUs, like the tests' session fixture) and every `clipmill run`
joins it with --address. The faults are in the driver, not the cluster, so the cluster may outlive them
(Ray cleans up a dead driver's job), and starting Ray once saves several seconds per invocation on 2 cores
(~4 invocations per run). The environment of the subprocesses is taken after ray.init(), which turns on
token auth for the cluster it starts by setting RAY_AUTH_MODE; a client joining with --address needs it too.

The recipe is the default one cut down to probe, split, transcode, frames, quality and filter, with short
clips and one video per shard (8 commits per run): the faults are in the runner and the commit path.
Prints a table, writes bench/results/faults.json, and prints one JSON object as the LAST line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

from clipmill import badfiles, synth
from clipmill.pipeline.recipe import load_recipe
from clipmill.storage.shards import CRASH_ENV, read_table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
CLI = [sys.executable, "-m", "clipmill"]
STEPS = ("before_record", "after_record", "mid_rename")
LIGHT_STAGES = ("probe", "split", "transcode", "frames", "quality", "filter")
TIMEOUT_S = 300


def make_corpus(d: Path) -> Path:
    """8 inputs: 3 generated shot videos, 2 real samples, an empty file, a truncated MP4 and a text file."""
    corpus = d / "corpus"
    corpus.mkdir(parents=True)
    for case in ("cuts", "dissolve", "flash"):
        synth.make_case(case, corpus / f"{case}.mp4", width=320, height=180)
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        shutil.copyfile(REPO / "samples" / name, corpus / name)
    scratch = d / "bad"
    for made in (badfiles.make_empty(scratch), badfiles.make_truncated(scratch), badfiles.make_text(scratch)):
        shutil.copyfile(made, corpus / made.name)
    return corpus


def make_recipe(path: Path) -> Path:
    """The light recipe (see the module docstring) as YAML at `path`."""
    data = load_recipe("default").to_json()
    data.pop("source")
    data["stages"] = [st for st in data["stages"] if next(iter(st)) in LIGHT_STAGES]
    for st in data["stages"]:
        if "split" in st:
            st["split"].update(min_s=1.0, max_s=3.0)
        if "transcode" in st:
            st["transcode"].update(max_side=256)
        if "filter" in st:
            st["filter"] = {k: v for k, v in st["filter"].items()
                            if not k.startswith(("min_motion", "max_motion", "max_text", "max_nsfw"))}
            st["filter"]["min_sharpness"] = None
    data["write"]["shard_videos"] = 1
    path.write_text(yaml.safe_dump(data))
    return path


def dataset(out: Path) -> dict:
    """uris (one per ledger row), clip_ids (one per clip row) and clip_id -> media_sha256 of OUT."""
    videos = read_table(out, "videos", ["uri"])["uri"].to_pylist()
    clips = read_table(out, "clips", ["clip_id", "media_sha256"]).to_pylist()
    return {"uris": videos, "clip_ids": [c["clip_id"] for c in clips],
            "media": {c["clip_id"]: c["media_sha256"] for c in clips},
            "temps": [str(p) for p in out.rglob(".*.tmp")]}


def run_clean(args: list[str], env: dict[str, str]) -> float:
    """One uninterrupted run; its wall seconds. Raises when it does not exit 0."""
    t0 = time.monotonic()
    res = subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if res.returncode != 0:
        raise RuntimeError(f"clean run failed ({res.returncode}): {res.stderr[-2000:]}")
    return time.monotonic() - t0


def inject(args: list[str], env: dict[str, str], rng: random.Random) -> dict:
    """One random driver fault; returns what was injected and whether it landed (the driver died of SIGKILL)."""
    if rng.random() < 0.6:
        spec = f"{rng.choice(STEPS)}:{rng.randint(0, 2)}"
        res = subprocess.run(CLI + args, env=dict(env, **{CRASH_ENV: spec}), capture_output=True, text=True,
                             timeout=TIMEOUT_S)
        return {"fault": f"CRASH_AT={spec}", "returncode": res.returncode,
                "landed": res.returncode == -signal.SIGKILL}
    at = rng.uniform(0.5, 10.0)
    proc = subprocess.Popen(CLI + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=at)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return {"fault": f"SIGKILL@{at:.1f}s", "returncode": proc.returncode,
            "landed": proc.returncode == -signal.SIGKILL}


def compare(got: dict, clean: dict) -> dict:
    """lost / duplicates / mismatched of a final dataset against the clean one."""
    dup_clips = sum(n - 1 for n in Counter(got["clip_ids"]).values())
    dup_inputs = sum(n - 1 for n in Counter(got["uris"]).values())
    return {
        "ledgered": len(got["uris"]),
        "missing_inputs": len(set(clean["uris"]) - set(got["uris"])),
        "lost": len(set(clean["clip_ids"]) - set(got["clip_ids"])),
        "extra": len(set(got["clip_ids"]) - set(clean["clip_ids"])),
        "duplicates": dup_clips + dup_inputs,
        "mismatched": sum(1 for c, h in got["media"].items() if c in clean["media"] and clean["media"][c] != h),
        "temps": len(got["temps"]),
    }


def main() -> None:
    """Parse options, run the clean references and the fault runs, print the table and the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="fault runs (each: fresh OUT, --kills faults, reruns)")
    ap.add_argument("--kills", type=int, default=3, help="random driver faults injected per run")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock; printed)")
    ap.add_argument("--out", type=Path, default=RESULTS / "faults.json")
    opts = ap.parse_args()
    seed = opts.seed if opts.seed is not None else time.time_ns() % 2**31
    rng = random.Random(seed)
    t_start = time.monotonic()

    import ray  # noqa: PLC0415

    ray.init(num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    address = ray.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", CRASH_ENV, "CLIPMILL_FAULT_INJECT")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="clipmill-faults-") as tmp:
        tmpd = Path(tmp)
        corpus = make_corpus(tmpd)
        recipe = make_recipe(tmpd / "faults.yaml")
        n_inputs = len(list(corpus.iterdir()))

        def args(out: Path) -> list[str]:
            return ["run", str(corpus), "-o", str(out), "--recipe", str(recipe), "--address", address]

        clean_s = run_clean(args(tmpd / "clean"), env)
        clean = dataset(tmpd / "clean")
        run_clean(args(tmpd / "clean2"), env)
        clean2 = dataset(tmpd / "clean2")
        baseline = compare(clean2, clean)
        finals = [clean, clean2]
        print(f"clean run: {n_inputs} inputs, {len(clean['clip_ids'])} clips, {clean_s:.1f} s; a second clean run "
              f"differs in media bytes of {baseline['mismatched']} clip(s)", flush=True)
        for i in range(opts.runs):
            out = tmpd / f"run{i}"
            faults = [inject(args(out), env, rng) for _ in range(opts.kills)]
            reruns, rc = 0, None
            while rc != 0 and reruns < 5:
                reruns += 1
                rc = subprocess.run(CLI + args(out), env=env, capture_output=True, text=True,
                                    timeout=TIMEOUT_S).returncode
            final = dataset(out)
            finals.append(final)
            row = {"run": i, "faults": faults, "reruns": reruns, "completed": rc == 0, **compare(final, clean)}
            rows.append(row)
            print(f"run {i}: " + ", ".join(f"{f['fault']}{'' if f['landed'] else ' (finished first)'}"
                                          for f in faults), flush=True)
    ray.shutdown()
    # clips whose media bytes are not the same in every dataset of this invocation (clean ones included)
    hashes: dict[str, set] = {}
    for d in finals:
        for c, h in d["media"].items():
            hashes.setdefault(c, set()).add(h)
    variants = sorted(c for c, hs in hashes.items() if len(hs) > 1)

    print(f"\n{'run':>3} {'faults':>6} {'reruns':>6} {'ledgered':>8} {'lost':>4} {'dup':>4} {'mismatch':>8} "
          f"{'temps':>5}  kill points")
    for r in rows:
        landed = [f["fault"] for f in r["faults"] if f["landed"]]
        print(f"{r['run']:>3} {len(landed):>6} {r['reruns']:>6} {r['ledgered']:>8} {r['lost']:>4} "
              f"{r['duplicates']:>4} {r['mismatched']:>8} {r['temps']:>5}  {' '.join(landed)}")
    summary = {
        "bench": "faults", "seed": seed, "runs": opts.runs,
        "faults": sum(f["landed"] for r in rows for f in r["faults"]),
        "faults_attempted": sum(len(r["faults"]) for r in rows),
        "inputs": n_inputs * opts.runs,
        "ledgered": sum(r["ledgered"] for r in rows),
        "lost": sum(r["lost"] for r in rows),
        "duplicates": sum(r["duplicates"] for r in rows),
        "mismatched": sum(r["mismatched"] for r in rows),
        "extra_clips": sum(r["extra"] for r in rows),
        "missing_inputs": sum(r["missing_inputs"] for r in rows),
        "temps_left": sum(r["temps"] for r in rows),
        "incomplete": sum(not r["completed"] for r in rows),
        "clips_per_run": len(clean["clip_ids"]),
        "clean_vs_clean_mismatched": baseline["mismatched"],
        "clips_with_media_variants": len(variants),
        "clean_run_s": round(clean_s, 2),
        "seconds": round(time.monotonic() - t_start, 1),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = opts.out.with_name(opts.out.name + ".tmp")
    tmp_out.write_text(json.dumps({"summary": summary, "runs": rows, "media_variant_clip_ids": variants}, indent=1) + "\n")
    os.replace(tmp_out, opts.out)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
