"""Conversion rate of `pixelrun data convert` from Parquet: images/s per process and peak memory.

The speedrun's data (FLUX-generated sets, Midjourney) is Parquet on the Hub: one row per image, the
JPEG in a `datasets` Image struct, row groups of 100 rows (as FLUX-Reason-6M's files have them). No
such set ships here, so this writes a synthetic one of that layout: --rows rows of 1-2 MP
photo-like JPEGs (benchmarks/make_photo_folder.py's generator, quality 90) with two caption
columns, in files of 500 rows. Then it converts them (one process, --workers 0) at each
--resolution in a child process, timing the conversion alone (wall clock, and the process's CPU
time, which a busy shared machine does not inflate) and reading the child's peak RSS.

    python benchmarks/convert_parquet.py [--rows 2000] [--resolutions 512,1024] [--data /tmp/pq-bench]
                                          [--out benchmarks/results/convert-parquet-cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (width, height), 1.0-1.9 MP: FLUX's usual generation sizes and two 4:3 photos
SIZES = [
    (1024, 1024),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
    (1152, 896),
    (1536, 1024),
    (1024, 1536),
    (1600, 1200),
    (1200, 1600),
]
ROWS_PER_FILE, ROW_GROUP = 500, 100  # small files: generating them runs on every core


def pixels() -> tuple[float, float]:
    return min(w * h for w, h in SIZES) / 1e6, max(w * h for w, h in SIZES) / 1e6


def _file(args: tuple[Path, int, int, int]) -> int:
    """One Parquet file of `n` rows starting at row `start`; returns its JPEG bytes."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(HERE))
    from make_photo_folder import photo_like

    path, start, n, seed = args
    rng = np.random.default_rng([seed, start])
    images, prompts, longs = [], [], []
    for i in range(start, start + n):
        w, h = SIZES[i % len(SIZES)]
        buf = io.BytesIO()
        photo_like(rng, w, h).save(buf, "JPEG", quality=90)
        images.append({"bytes": buf.getvalue(), "path": None})
        prompts.append(f"a synthetic photo number {i}")
        longs.append(
            f"a synthetic photo-like image number {i}, {w} by {h} pixels, smooth colour fields with fine "
            f"grain, as a long descriptive caption would say in several clauses"
        )
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    meta = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()}
    table = pa.table({"image": pa.array(images, struct), "prompt": prompts, "caption_long": longs})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table.replace_schema_metadata(meta), tmp, row_group_size=ROW_GROUP)
    tmp.rename(path)
    return sum(len(x["bytes"]) for x in images)


def make_data(root: Path, rows: int, seed: int = 0) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    jobs = [
        (root / f"train-{k:05d}.parquet", start, min(ROWS_PER_FILE, rows - start), seed)
        for k, start in enumerate(range(0, rows, ROWS_PER_FILE))
    ]
    todo = [j for j in jobs if not j[0].exists()]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_file, todo))
    sizes = [j[0].stat().st_size for j in jobs]
    return {
        "files": len(jobs),
        "rows": rows,
        "bytes": sum(sizes),
        "mean_row_bytes": round(sum(sizes) / rows),
        "row_group_rows": ROW_GROUP,
        "megapixels": pixels(),
        "seconds_to_write": round(time.perf_counter() - t0, 1),
    }


_CHILD = """
import json, resource, sys, time
from pixelrun.data.convert import convert
src, out, res = sys.argv[1], sys.argv[2], int(sys.argv[3])
rss = lambda: round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # user + system seconds of this process
before = rss()  # after the imports (torch, PIL, pyarrow): what any pixelrun process holds
t0, c0 = time.perf_counter(), cpu()
index = convert(src, out, res, captions="prompt:0.7,caption_long:0.3", progress=False, workers=0)
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": cpu() - c0, "count": index["count"],
                  "read": index["read"],
                  "skipped": index["skipped"], "bytes_per_sample": index["bytes_per_sample"],
                  "buckets": len(index["buckets"]),
                  "rss_after_imports_mib": before, "peak_rss_mib": rss()}))
"""


def convert_once(data: Path, out: Path, resolution: int) -> dict:
    """The conversion in a child process (one process, --workers 0): its time and its peak RSS."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(data), str(out), str(resolution)], env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"the conversion failed:\n{done.stderr[-3000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return {
        "resolution": resolution,
        "images_per_s": round(r["read"] / r["seconds"], 1),
        # per second of CPU time: what one dedicated core gives, whatever else ran beside it
        "images_per_cpu_s": round(r["read"] / r["cpu_seconds"], 1),
        "seconds": round(r["seconds"], 1),
        "cpu_seconds": round(r["cpu_seconds"], 1),
        **{
            k: r[k]
            for k in (
                "read",
                "count",
                "skipped",
                "buckets",
                "bytes_per_sample",
                "rss_after_imports_mib",
                "peak_rss_mib",
            )
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--resolutions", default="512,1024")
    ap.add_argument(
        "--data", default="/tmp/pixelrun-parquet-bench", help="where the synthetic Parquet goes (kept between runs)"
    )
    ap.add_argument("--out", default=str(HERE / "results" / "convert-parquet-cpu"))
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from loader_shards import cpu_name

    data = Path(args.data) / f"rows{args.rows}"
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "data": make_data(data, args.rows),
        "runs": [],
    }
    print(json.dumps(report["data"]), flush=True)
    for res in map(int, args.resolutions.split(",")):
        load = os.getloadavg()[0]  # the machine may be shared: its 1-minute load beside each number
        run = {
            **convert_once(data, Path(args.data) / f"out{res}", res),
            "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2),
        }
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "convert_parquet.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'convert_parquet.json'}")


if __name__ == "__main__":
    main()
