"""
The figures for data at scale (README "Data at any scale"): memory while streaming, feature extraction from
shards against the folder loader, and the demo's figures through parquet and tar shards. CPU; nothing downloaded.

    python -m tools.stream_bench memory     # peak RSS of train.py streaming 20 k vs 200 k synthetic pairs (~6 min)
    python -m tools.stream_bench extract    # images/s: shards vs the folder loader, 1 and 2 processes (~3 min)
    python -m tools.stream_bench demo       # the one-shape demo read as a folder, as parquet and as tar shards (~3 min)
    python -m tools.stream_bench all

Peak RSS is the sum over train.py and its children, sampled every 20 ms. Images/s counts the images of the set
over the whole way from files to cached features (the folder loader's index pass included, as the shards' count).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import webdataset as wds
from PIL import Image

from capkit.data.folders import load_folder
from capkit.data.images import SkipLog
from capkit.data.shapes import ensure_shapes_dataset, write_split
from capkit.hub import REPO_DIR
from tools.convert import write_parquet, write_webdataset

SHARED_PHOTOS = REPO_DIR.parent / "shared" / "flickr8k_train"
WORDS = "a the red blue green small big dog cat ball runs sits on in near grass snow water street".split()
QUIET = ["--log_with=None", "--evaluation_enabled=False", "--test_evaluation_enabled=False", "--val_ratio=0"]


def synthetic_shards(out: Path, pairs: int, per_shard: int = 1000, captions: int = 5) -> None:
    """pairs / captions tiny PNG images (a coloured block on a background) with `captions` random captions each."""
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    n_images = pairs // captions
    for s in range(0, n_images, per_shard):
        with wds.TarWriter(str(out / f"{s // per_shard:05d}.tar")) as sink:
            for i in range(s, min(s + per_shard, n_images)):
                im = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
                im.paste(tuple(rng.randrange(256) for _ in range(3)), (rng.randrange(16), rng.randrange(16), 24, 24))
                buf = io.BytesIO()
                im.save(buf, "PNG")
                caps = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) for _ in range(captions)]
                sink.write({"__key__": f"{i:09d}", "png": buf.getvalue(), "txt": "\n".join(caps)})


def peak_rss_mb(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """Run cmd; -> (peak RSS of it and its children in MB, wall seconds, exit code)."""
    t0, peak = time.time(), 0
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO_DIR, stdout=f, stderr=subprocess.STDOUT)
        proc = psutil.Process(p.pid)
        while p.poll() is None:
            try:
                peak = max(peak, sum(q.memory_info().rss for q in [proc, *proc.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.02)
    return peak / 1e6, time.time() - t0, p.returncode


def memory(args, tmp: Path) -> None:
    rows = []
    for pairs in (args.small, args.large):
        data = tmp / f"pairs_{pairs}"
        synthetic_shards(data, pairs)
        cmd = [sys.executable, "train.py", "--preset=demo", "--dataset=webdataset", f"--train_dir={data}",
               "--num_epochs=1", "--training_size_limit=None", "--batch_size=64", *QUIET,
               f"--feature_cache_dir={tmp / f'cache_{pairs}'}", f"--data_cache_dir={tmp / 'data'}",
               f"--output_dir={tmp / f'out_{pairs}'}"]
        mb, secs, code = peak_rss_mb(cmd, tmp / f"memory_{pairs}.log")
        if code:
            sys.exit(f"train.py failed on {pairs} pairs: see {tmp / f'memory_{pairs}.log'}")
        rows.append((pairs, mb, secs))
        print(f"  {pairs:>7,} pairs ({pairs // 5:,} images): peak RSS {mb:,.0f} MB, {secs:.0f} s "
              "(extraction + 1 epoch)")
    growth = rows[1][1] / rows[0][1] - 1
    print(f"memory: {args.large:,} vs {args.small:,} pairs: peak RSS {growth:+.1%} (target: at most +10%)")


EXTRACT = """
import sys, time, json
from accelerate import Accelerator
from capkit.models.captioner import CaptionerConfig
from capkit.data.features import image_features
from capkit.data.folders import load_folder
from capkit.data.images import SkipLog
from capkit.data.shard_features import extract_shard_features
from capkit.data.shards import tar_shards
from model import build_model
source, data, cache = sys.argv[1:4]
acc = Accelerator(cpu=True)
model = build_model(CaptionerConfig(encoder_name="demo/clip-tiny", encoder_pretrained=None, lm_name="demo/qwen3-tiny",
                                    lm_dtype="float32"), "cpu")
acc.wait_for_everyone()
t = time.time()  # (everything imported and loaded: the figure is the data's way from files to features)
if source == "folder":
    feats, ok = image_features(model, load_folder(data, SkipLog()).images, cache, 64, 0, SkipLog(), acc=acc)
    n = len(ok)
else:
    n = sum(s.images for s in extract_shard_features(model, tar_shards(data), cache, SkipLog(), 64, 0, acc))
acc.wait_for_everyone()
if acc.is_main_process:
    print("RESULT", json.dumps({"images": n, "seconds": time.time() - t}))
"""


def extract(args, tmp: Path) -> None:
    folder = Path(args.images) if args.images else SHARED_PHOTOS
    if not folder.is_dir():
        folder = tmp / "shapes"
        write_split(folder, 600, 1)
    data = load_folder(folder, SkipLog())
    # 12 equal shards: 1, 2, 3 or 4 processes get equal shares, as the folder loader's contiguous split gives them
    write_webdataset(data.images, data.captions, str(tmp / "tars" / "part"), per_shard=-(-data.num_images // 12))
    script = tmp / "extract.py"
    script.write_text(EXTRACT)
    print(f"extract: {data.num_images} images of {folder} (as files, and as {len(list((tmp / 'tars').glob('*.tar')))} "
          f"tar shards); demo/clip-tiny, so reading and decoding dominate; median of {args.repeats}")
    for procs in (1, 2):
        launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                                       "--num_processes", "2", "--main_process_port", "29611"]
        rates = {}
        for source, where in (("folder", str(folder)), ("shards", str(tmp / "tars"))):
            runs = []
            for r in range(args.repeats):
                cache = tmp / f"cache_{source}_{procs}_{r}"  # a cold cache each time
                p = subprocess.run([*launch, str(script), source, where, str(cache)], cwd=REPO_DIR, capture_output=True,
                                   text=True, env={**os.environ, "PYTHONPATH": str(REPO_DIR)})
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
                if p.returncode or not line:
                    sys.exit(p.stdout[-2000:] + p.stderr[-2000:])
                res = json.loads(line[0][7:])
                runs.append(res["images"] / res["seconds"])
            rates[source] = statistics.median(runs)
        print(f"  {procs} process{'es' if procs > 1 else ''}: folder loader {rates['folder']:,.0f} images/s, "
              f"shards {rates['shards']:,.0f} images/s (x{rates['shards'] / rates['folder']:.2f}; target: >= x1)")


def demo(args, tmp: Path) -> None:
    root = ensure_shapes_dataset(REPO_DIR / "data" / "shapes", "all")
    for split in ("train", "val", "test"):
        d = load_folder(root / split, SkipLog())
        write_webdataset(d.images, d.captions, str(tmp / "wds" / split), per_shard=250)
        write_parquet(d.images, d.captions, str(tmp / "parquet"), split, per_shard=500)
    runs = {"folder": ["--dataset=shapes"],
            "hf (parquet)": ["--dataset=hf", f"--hf_dataset={tmp / 'parquet'}"],
            "webdataset (tar)": ["--dataset=webdataset", f"--train_dir={tmp / 'wds'}/train-{{00000..00007}}.tar",
                                 f"--val_dir={tmp / 'wds'}/val-00000.tar",
                                 f"--test_dir={tmp / 'wds'}/test-{{00000..00001}}.tar"]}
    print("demo: --preset demo (3 epochs), the same images and captions read three ways; held-out test split")
    for name, extra in runs.items():
        out = tmp / ("out_" + name.split()[0])
        p = subprocess.run([sys.executable, "train.py", "--preset=demo", *extra, f"--output_dir={out}",
                            "--log_with=None",
                            f"--feature_cache_dir={tmp / 'cache'}", f"--data_cache_dir={tmp / 'data'}"],
                           cwd=REPO_DIR, capture_output=True, text=True)
        if p.returncode:
            sys.exit(p.stdout[-2000:] + p.stderr[-2000:])
        meta = json.loads(max(out.glob("training_metadata_*-3.json")).read_text())
        t = meta["test"]
        drop = t["rouge_l"] - t["ablated"]["rouge_l"]
        ok = t["rouge_l"] >= 0.9 and drop >= 0.2
        print(f"  {name:<17} test ROUGE-L {t['rouge_l']:.4f}, CIDEr {t['cider']:.3f}, images shuffled: ROUGE-L drop "
              f"{drop:.4f} ({t['num_images']} images) -> {'met' if ok else 'NOT met'} (>= 0.9, drop >= 0.2)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.stream_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("memory", "extract", "demo", "all"))
    ap.add_argument("--small", type=int, default=20_000, help="memory: pairs in the small run")
    ap.add_argument("--large", type=int, default=200_000, help="memory: pairs in the large run")
    ap.add_argument("--images", help="extract: a folder of captioned images (default: ../shared/flickr8k_train)")
    ap.add_argument("--repeats", type=int, default=5, help="extract: runs per figure (the median is printed)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stream_bench_") as d:
        for what in (("memory", "extract", "demo") if args.what == "all" else (args.what,)):
            globals()[what](args, Path(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
