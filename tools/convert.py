"""
A folder of captioned images (any layout the folder loader reads) -> WebDataset tar shards or parquet files,
the two formats dataset="webdataset" and dataset="hf" stream from.

    python -m tools.convert my_photos/ shards/train --to webdataset --per_shard 1000   # shards/train-00000.tar ...
    python -m tools.convert my_photos/ parquet/ --to parquet --split train     # parquet/train-00000-of-00003.parquet
    python train.py --dataset=webdataset --train_dir='shards/train-{00000..00002}.tar' --test_dir=...
    python train.py --dataset=hf --hf_dataset=parquet/

A sample is the image's own bytes (never re-encoded) and all its captions: a .txt member with one caption per
line in a tar; an `image` column (🤗 Image feature) and a `captions` list column in parquet. Files the folder
loader skips are skipped here too, and counted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import datasets
import webdataset as wds

from capkit.data.folders import load_folder
from capkit.data.images import SkipLog
from capkit.errors import run_cli


def write_webdataset(images, captions, prefix: str, per_shard: int) -> list[str]:
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    out = []
    for start in range(0, len(images), per_shard):
        path = f"{prefix}-{start // per_shard:05d}.tar"
        with wds.TarWriter(path) as sink:
            for i in range(start, min(start + per_shard, len(images))):
                suffix = images[i].suffix.lower().lstrip(".") or "jpg"
                sink.write({"__key__": f"{i:09d}", suffix: images[i].read_bytes(), "txt": "\n".join(captions[i])})
        out.append(path)
    return out


def write_parquet(images, captions, out_dir: str, split: str, per_shard: int) -> list[str]:
    datasets.disable_progress_bars()
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))})
    n = -(-len(images) // per_shard)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n):  # datasets names a folder's splits by these file names (train-00000-of-00003.parquet)
        idx = range(k * per_shard, min((k + 1) * per_shard, len(images)))
        part = datasets.Dataset.from_dict({"image": [{"bytes": images[i].read_bytes(), "path": images[i].name}
                                                     for i in idx], "captions": [captions[i] for i in idx]},
                                          features=features)
        path = f"{out_dir}/{split}-{k:05d}-of-{n:05d}.parquet"
        part.to_parquet(path)
        out.append(path)
    return out


def run(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="a folder the folder loader reads (captions.csv, metadata.jsonl, .txt sidecars ...)")
    ap.add_argument("out", help="webdataset: the shards' path prefix (out-00000.tar ...); parquet: a folder")
    ap.add_argument("--to", choices=("webdataset", "parquet"), required=True)
    ap.add_argument("--per_shard", type=int, default=1000, help="images per tar shard / parquet file")
    ap.add_argument("--split", default="train", help="parquet: the split name in the file names")
    ap.add_argument("--captions_file", help="a captions CSV elsewhere than <folder>/captions.csv")
    args = ap.parse_args(argv)
    if args.per_shard < 1:
        ap.error("--per_shard must be at least 1")
    skips = SkipLog()
    data = load_folder(args.folder, skips, args.captions_file)
    if args.to == "webdataset":
        paths = write_webdataset(data.images, data.captions, args.out, args.per_shard)
    else:
        paths = write_parquet(data.images, data.captions, args.out, args.split, args.per_shard)
    print(f"{data.num_images} images, {sum(map(len, data.captions))} captions -> {len(paths)} files: "
          f"{paths[0]} ... {paths[-1]}; {skips.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(run, sys.argv[1:]))
