"""Loader throughput at 512 px: images/s per CPU core, decode and resize included, so users can size
their data machines (the recipe needs about 400 images/s per GPU at 512 px with TREAD).

Steps, all timed and written to OUT/loader.json with the settings:
  1. a folder of photo-sized JPEGs (benchmarks/make_photo_folder.py; 1.5-3 MP, ~340 KB each),
  2. `pixelrun data convert` into bucketed shards at --store-resolution (resized once),
  3. the shard loader (`data.source=shards`) at 512 px with 0, 1 and 2 decode threads,
  4. for comparison, the image-folder loader on the original photos (a full-size decode per image).

    python benchmarks/loader_shards.py [--n 192] [--seconds 20] [--out benchmarks/results/loader-cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def folder_throughput(root: str, resolution: int, batch_size: int, workers: int, seconds: float) -> float:
    """The same measurement as `measure_throughput`, on the image-folder source."""
    from pixelrun.data.buckets import aspect_buckets
    from pixelrun.data.folder import FolderBatchSource, ImageFolder

    source = FolderBatchSource(ImageFolder(root), batch_size, aspect_buckets(resolution, 32), workers=workers)
    next(source)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(next(source).captions)
    return n / (time.perf_counter() - t0)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    from pixelrun.data.shards import measure_throughput

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=192, help="photos to generate")
    ap.add_argument("--resolution", type=int, default=512, help="training resolution")
    ap.add_argument("--store-resolution", type=int, default=512, help="resolution the shards are stored at")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--out", default=str(HERE / "results" / "loader-cpu"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # the loader's own threads are what is measured
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        photos, shards = Path(tmp) / "photos", Path(tmp) / "shards"
        subprocess.run([sys.executable, str(HERE / "make_photo_folder.py"), str(photos), "--n", str(args.n)], check=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pixelrun", "data", "convert", "--src", str(photos), "--out", str(shards),
                        "--resolution", str(args.store_resolution), "--shard-size", "64"], check=True)
        convert_s = time.perf_counter() - t0
        spec = str(shards)  # a folder of .tar files is a shard spec
        shard_rates = {w: measure_throughput(spec, args.resolution, args.batch_size, w, args.seconds) for w in (0, 1, 2)}
        folder_rates = {w: folder_throughput(str(photos), args.resolution, args.batch_size, w, args.seconds)
                        for w in (0, 2)}
        photo_kb = sum(p.stat().st_size for p in photos.glob("*.jpg")) / args.n / 1024
        shard_kb = sum(p.stat().st_size for p in shards.glob("*.tar")) / args.n / 1024
    report = {
        "command": "python benchmarks/loader_shards.py " + " ".join(sys.argv[1:]),
        "cpu": f"{cpu_name()} x {cores} cores", "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "photo_kb_mean": photo_kb, "shard_kb_per_sample": shard_kb,
        "convert_seconds": convert_s, "convert_images_per_s": args.n / convert_s,
        "shards_images_per_s_by_decode_threads": shard_rates,
        "shards_images_per_s_per_core": shard_rates[0],  # one thread = one core
        "folder_images_per_s_by_decode_threads": folder_rates,
        "folder_images_per_s_per_core": folder_rates[0],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
