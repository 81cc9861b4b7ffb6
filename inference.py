"""
Caption images with a trained checkpoint.

    python inference.py --checkpoint saved_models/model_state_dict_....pth photo.jpg more_photos/
    python inference.py --checkpoint ...pth photos/ --output captions.jsonl --num_beams 3
    python inference.py --checkpoint ...pth photos/ --do_sample --temperature 0.7 --top_p 0.9
    python inference.py --checkpoint saved_models/adapter_<run>-<epoch> photos/   # git / blip, same options
    python inference.py --model microsoft/git-base photos/      # a GIT / BLIP model as published, untrained
    python inference.py --model_path CKPT --input_path photos/ --output_path captions.jsonl   # the seeds' names

Prints one `path<TAB>caption` line per image (folders are searched recursively); a tab or line
break inside a name or caption is printed as \\t, \\n or \\r. Unreadable files are skipped and
listed at the end. --output FILE.json or FILE.jsonl also writes them, exactly.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from capkit.cli import check_output_path, float_in, int_at_least, positive_int, tsv_line
from capkit.data.batching import Collate
from capkit.data.folders import find_images
from capkit.data.images import ImageDataset
from capkit.errors import NothingReadable, run_cli
from capkit.files import file_kind
from capkit.models.captioner import GENERATION_LIMITS, SHAPING_FIELDS, Generation, add_shaping_arguments
from capkit.models.hf_captioner import load_base_captioner
from capkit.runtime import pick_device
from model import load_checkpoint


def collect_images(inputs, skipped: list) -> list[Path]:
    """Image files given, and those in the folders given (recursively). A name that doesn't exist or is
    not a regular file (a FIFO, a device) is reported in `skipped`, never opened."""
    out = []
    for item in map(Path, inputs):
        try:
            item.exists()
        except OSError:  # a name too long for the file system
            skipped.append((str(item), "unreadable path"))
            continue
        if item.is_dir():
            out += find_images(item)
        elif item.is_file():
            out.append(item)
        elif item.exists():
            skipped.append((str(item), f"not a regular file: {file_kind(item.stat().st_mode)}"))
        else:
            skipped.append((str(item), "missing file"))
    return out


def main(argv=None) -> int:
    """The command line: expected failures end in one paragraph and their exit code (errors.py)."""
    return run_cli(run, argv)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", "--model_path", help="a capkit checkpoint: .pth, adapter_* or merged_* folder")
    which.add_argument("--model", "--model_name", metavar="HUB_ID_OR_DIR",
                       help="a GIT / BLIP captioning model as published (microsoft/git-base, a folder), untrained")
    ap.add_argument("--model_type", choices=("git", "blip"), help="with --model: when its name doesn't say")
    ap.add_argument("inputs", nargs="*", help="image files and/or folders")
    ap.add_argument("--image_path", "--input_path", "--test_dir", dest="more_inputs", action="append", default=[],
                    metavar="PATH", help="an image file or folder (the seeds' spelling of the inputs; repeatable)")
    ap.add_argument("--output", "--output_path", "--output_file", help="write results to FILE.json or FILE.jsonl")
    ap.add_argument("--batch_size", type=positive_int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--datastore", metavar="DIR_OR_FILE", help="a model trained with retrieval_k: retrieve from these "
                    "captioned images instead of its training set (a folder, or a saved datastore_*.safetensors)")
    g, lim = Generation(), GENERATION_LIMITS  # the defaults and ranges every script shares
    ap.add_argument("--max_new_tokens", type=int_at_least(*lim["max_new_tokens"]), default=g.max_new_tokens)
    ap.add_argument("--num_beams", type=int_at_least(*lim["num_beams"]), default=g.num_beams)
    ap.add_argument("--do_sample", action="store_true")
    ap.add_argument("--temperature", type=float_in(*lim["temperature"], False), default=g.temperature)
    ap.add_argument("--top_p", type=float_in(*lim["top_p"], True), default=g.top_p)
    ap.add_argument("--top_k", type=int_at_least(*lim["top_k"]), default=g.top_k)
    ap.add_argument("--seed", type=int_at_least(*lim["seed"]), default=None, help="for reproducible sampling")
    add_shaping_arguments(ap)  # --min_new_tokens, --no_repeat_ngram_size, --repetition_penalty, --length_penalty
    args = ap.parse_args(argv)
    args.inputs += args.more_inputs
    if not args.inputs:
        ap.error("give image files and/or folders to caption")
    if args.output and not args.output.endswith((".json", ".jsonl")):
        ap.error("--output must end in .json or .jsonl")
    if args.model and args.datastore:
        ap.error("--datastore is for a checkpoint trained with retrieval_k, not for --model")
    if args.model_type and not args.model:
        ap.error("--model_type goes with --model (a checkpoint knows its own type)")
    return args


def run(argv=None) -> int:
    args = parse_args(argv)
    check_output_path(args.output)
    if args.model:
        model = load_base_captioner(args.model, pick_device(args.device), args.model_type)
    else:
        model, _, _ = load_checkpoint(args.checkpoint, pick_device(args.device), datastore=args.datastore)
    skipped = []
    paths = collect_images(args.inputs, skipped)
    gen = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample,
               temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
               **{k: getattr(args, k) for k in SHAPING_FIELDS})
    model.generation(gen)  # a max_new_tokens the decoder has no positions for: said before any image is read
    if args.seed is not None:
        torch.manual_seed(args.seed)
    results = []
    # JSONL is written as we go; JSON at the end, also after a Ctrl-C (what was captioned is kept either way)
    stream = open(args.output, "w", encoding="utf-8") if args.output and args.output.endswith(".jsonl") else None
    stdout_open = True
    loader = DataLoader(ImageDataset(paths, model.preprocess), batch_size=args.batch_size, collate_fn=Collate())
    bar = tqdm(total=len(paths), desc="Captioning", unit="img", file=sys.stderr)  # stderr: stdout is the captions
    try:
        for batch in loader:
            skipped += batch["skipped"]
            bar.update(len(batch["skipped"]))
            if "pixel_values" not in batch:
                continue
            captions = model.generate(pixel_values=batch["pixel_values"], **gen)
            bar.update(len(captions))
            for i, caption in zip(batch["image_idx"].tolist(), captions):
                rec = {"image": str(paths[i]), "caption": caption}
                results.append(rec)
                if stream:
                    stream.write(json.dumps(rec) + "\n")
                    stream.flush()
                if stdout_open:
                    try:
                        bar.write(tsv_line(paths[i], caption), file=sys.stdout)  # above the bar, not through it
                        sys.stdout.flush()
                    except BrokenPipeError:  # e.g. `| head`: keep captioning into --output, stop printing
                        stdout_open = False
                        sys.stdout = open(os.devnull, "w")
    finally:
        bar.close()
        if stream:
            stream.close()
        elif args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=2)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"{len(results)} captioned, {len(skipped)} skipped" + (f"; wrote {args.output}" if args.output else ""),
          file=sys.stderr)
    if not results:
        raise NothingReadable("not one image could be read" if paths or skipped else
                              f"no image files in {', '.join(args.inputs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
