"""
Evaluate a checkpoint on held-out data: validation loss and ROUGE-L, with per-image predictions.

    python eval.py                                # the newest checkpoint in saved_models/, on its own test split
    python eval.py --checkpoint saved_models/model_state_dict_20261122_120000-3.pth
    python eval.py --checkpoint saved_models/adapter_20261122_120000-3        # git / blip adapter (or merged folder)
    python eval.py --checkpoint ...pth --split val --output preds.json
    python eval.py --checkpoint ...pth --ablate_image     # also score with images shuffled across the set
    python eval.py --checkpoint ...pth --report report/   # + an HTML page: thumbnails, captions, sortable scores
    accelerate launch --multi_gpu --num_processes 4 eval.py --checkpoint ...pth   # decode on 4 GPUs
    python eval.py --references refs.json --predictions preds.json [--output scores.json]  # no model: COCO metrics
    python eval.py --compare A.json B.json [--report cmp/]   # two predictions files: B - A with a 95 % interval

The dataset comes from the checkpoint's training metadata (the JSON next to it); --data_dir etc.
point at another copy. ROUGE-L here = mean over images of the best rouge_score ROUGE-L F-measure
between the generated caption and each of that image's references (Porter stemming on).
--ablate_image gives every image another image's features (a derangement, seeded): if captions
really depend on the image, ROUGE-L drops and the loss rises.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from accelerate import Accelerator

from capkit.checkpoints import newest_checkpoint, predictions_name
from capkit.cli import check_output_path, int_at_least, positive_int, write_output
from capkit.data.images import SkipLog
from capkit.errors import DataError, MissingInputError, NothingReadable, run_cli
from capkit.evaluation.bootstrap import paired, with_interval
from capkit.evaluation.evaluator import evaluate, knn_line, spread_line
from capkit.evaluation.metrics import (
    CIDER_NOTE,
    ROUGE_L_NOTE,
    print_metrics,
    read_predictions,
    read_references,
    score_captions,
    sentence_embedder,
)
from capkit.evaluation.report import check_report_dir, check_rows, report_metrics, write_report
from capkit.files import read_json
from capkit.models.captioner import GENERATION_LIMITS, SHAPING_FIELDS, Generation, add_shaping_arguments
from capkit.models.retrieval import open_datastore
from capkit.runtime import pick_device
from capkit.training.implied import Notes, data_as_meant
from dataset import PATH_KEYS, load_splits
from model import load_checkpoint


def score_files(args, embedder) -> int:
    preds = read_predictions(args.predictions)
    m = score_captions(read_references(args.references), preds, embedder=embedder)
    print_metrics(m)
    if args.output:
        write_output(args.output, json.dumps(m, indent=2))
        print(f"wrote {args.output}")
    return 0


DATA_KEYS = ("dataset", *PATH_KEYS, "image_column", "caption_column", "data_cache_dir")  # --KEY overrides the run's
CAPTION_METRICS_NOTE = ("pycocoevalcap: PTB tokens, corpus BLEU, METEOR 1.5, ROUGE_L with beta 1.2 (no stemming), "
                        "CIDEr-D; plus caption diversity, the Fréchet distance between sentence embeddings of the "
                        "generated captions and of all references, and CLIPScore / RefCLIPScore (Hessel et al. 2021, "
                        "w = 2.5) with the run's CLIP")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a model_state_dict_*.pth, adapter_* folder or merged folder (default: the "
                    "newest checkpoint in saved_models/)")
    ap.add_argument("--references", help="score files, no model: {image_id: [refs]} JSON")
    ap.add_argument("--predictions", help="with --references: {image_id: caption} or COCO results JSON")
    ap.add_argument("--split", choices=["test", "val"], default="test")
    ap.add_argument("--output", help="predictions JSON (default: next to the checkpoint)")
    ap.add_argument("--ablate_image", action="store_true", help="also score with images shuffled across the set")
    ap.add_argument("--datastore", metavar="DIR_OR_FILE", help="captioned images to retrieve from (retrieval models) "
                    "and to score the kNN baseline with; default: the datastore saved beside the checkpoint")
    ap.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="two predictions files of eval.py on "
                    "the same images: the paired bootstrap difference B - A per metric (with --report DIR: both "
                    "captions per image, the most different first)")
    ap.add_argument("--report", metavar="DIR", help="also write an HTML report (thumbnails, captions, sortable scores)")
    ap.add_argument("--frechet_embedder", metavar="HUB_ID_OR_DIR", help="the sentence embedder of the Fréchet "
                    "distance: a hub id or a local folder (e.g. thenlper/gte-base, saved); default: gte-base from the "
                    "hub or its cache, else the offline all-MiniLM-L6-v2 package")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch_size", type=positive_int, default=None)
    ap.add_argument("--max_new_tokens", type=int_at_least(*GENERATION_LIMITS["max_new_tokens"]), default=None)
    ap.add_argument("--num_beams", type=int_at_least(*GENERATION_LIMITS["num_beams"]), default=None)
    add_shaping_arguments(ap, dict.fromkeys(SHAPING_FIELDS))  # None: the run's own setting
    for key in DATA_KEYS:
        ap.add_argument(f"--{key}", default=None, help="override the training run's value")
    args = ap.parse_args(argv)
    if args.references or args.predictions:
        if not (args.references and args.predictions) or args.checkpoint:
            ap.error("score files with --references and --predictions together (and no --checkpoint)")
    elif args.compare:
        if args.checkpoint:
            ap.error("--compare reads two predictions files; it takes no --checkpoint")
    elif not args.checkpoint:
        args.checkpoint = newest_checkpoint()
        if args.checkpoint is None:
            raise MissingInputError("no --checkpoint given and none in saved_models/ (train one: python train.py "
                                    "--preset demo), or score files with --references and --predictions")
        print(f"checkpoint: {args.checkpoint} (the newest in saved_models/)")
    return args


def baseline_datastore(model, args, hp: dict):
    """The training captions the kNN baseline copies from: the model's own datastore (retrieval models), the one
    --datastore names, or the one saved beside the checkpoint; None (and a note) for models without features."""
    if getattr(model, "datastore", None) is not None:
        return model.datastore
    if not getattr(model, "supports_feature_cache", False):
        return None
    beside = Path(args.checkpoint).parent / model.datastore_file if model.datastore_file else None
    source = args.datastore or (beside if beside is not None and beside.is_file() else None)
    if source is None:
        print("kNN baseline skipped: no datastore beside the checkpoint (checkpoints from before it existed); "
              "give the training images with --datastore DIR")
        return None
    return open_datastore(model, source, hp.get("feature_cache_dir"))


def run(argv=None) -> int:
    args = parse_args(argv)
    # a named embedder is loaded now: a wrong folder is said before the evaluation, not after it
    embedder = sentence_embedder(args.frechet_embedder) if args.frechet_embedder else None
    if args.references:
        return score_files(args, embedder)
    if args.compare:
        return compare_files(args)
    check_output_path(args.output)
    if args.report:
        check_report_dir(args.report)  # said now, not after the whole evaluation
    # under `accelerate launch` each process decodes its share of the images; one process otherwise
    device = pick_device(args.device)
    acc = Accelerator(cpu=args.device == "cpu")
    model, meta, hp = load_checkpoint(args.checkpoint, acc.device if acc.num_processes > 1 else device,
                                                 datastore=args.datastore)
    given = {k: v for k in DATA_KEYS if (v := getattr(args, k)) is not None}  # another copy of the data, or other data
    hp = data_as_meant({**hp, **given}, given, Notes(), "the run's")  # --test_dir photos/: that folder
    skips = SkipLog()
    data = load_splits(hp, skips, which=(args.split,))[args.split]
    gen = {"max_new_tokens": args.max_new_tokens or hp.get("max_new_tokens", Generation.max_new_tokens),
           "num_beams": args.num_beams or hp.get("num_beams", Generation.num_beams),
           **{k: v if (v := getattr(args, k)) is not None else hp.get(k, getattr(Generation, k)) for k in SHAPING_FIELDS}}
    model.generation(gen)  # a max_new_tokens the decoder has no positions for: said now, not after the features
    res = evaluate(model, data, batch_size=args.batch_size or hp.get("eval_batch_size", 32),
                   max_caption_length=hp.get("max_caption_length", 128), gen_kwargs=gen,
                   ablate_image=args.ablate_image, seed=hp.get("seed", 0), skips=skips,
                   cache_dir=hp.get("feature_cache_dir"), acc=acc, clip_score=True,
                   datastore=baseline_datastore(model, args, hp))
    if not acc.is_main_process:
        return 0
    if res["num_images"] == 0:
        raise NothingReadable(f"not one of the {data.num_images} {args.split} images could be read ({skips.summary()})")
    # the COCO toolkit's metrics on the same predictions (references grouped per image)
    res["caption_metrics"] = score_captions({p["image"]: p["references"] for p in res["predictions"]},
                                            {p["image"]: p["caption"] for p in res["predictions"]}, res,
                                            embedder=embedder)
    if "clip_score" not in res:
        print(f"CLIPScore skipped: {res.get('clip_score_absent') or 'no captions were generated'}")
    res["metric_notes"] = {"rouge_l": ROUGE_L_NOTE, "cider": CIDER_NOTE, "caption_metrics": CAPTION_METRICS_NOTE}
    write_results(args, res, skips)
    return 0


COMPARED = ("cider", "rouge_l")  # the per-image metrics eval.py writes: --compare pairs them


def prediction_rows(path) -> dict:
    """eval.py's predictions file -> {image: row}, each row with its caption, references and per-image scores."""
    data = read_json(path, "predictions file")
    rows = check_rows(data.get("predictions") if isinstance(data, dict) else None, path)
    missing = [p["image"] for p in rows if not all(isinstance(p.get(k), (int, float)) for k in COMPARED)]
    if missing:
        raise DataError(f"{path}: rows without per-image {' / '.join(COMPARED)} (e.g. {missing[0]}): compare two "
                        "predictions files written by eval.py")
    return {p["image"]: p for p in rows}


def compare_files(args) -> int:
    """--compare A.json B.json: the paired bootstrap difference B - A of each per-image metric over the same images;
    --report DIR: both captions per image, sorted by how much their CIDEr-D differs."""
    if args.report:
        check_report_dir(args.report)
    a, b = (prediction_rows(p) for p in args.compare)
    if set(a) != set(b) or any(sorted(a[i]["references"]) != sorted(b[i]["references"]) for i in a):
        raise DataError(f"{args.compare[0]} and {args.compare[1]} are not scored on the same images and references "
                        f"({len(set(a) & set(b))} images in common of {len(a)} and {len(b)}): compare runs "
                        "evaluated on one split")
    images = sorted(a)
    print(f"{len(images)} images; A = {args.compare[0]}, B = {args.compare[1]} (95 % paired bootstrap over images)")
    summary = {}
    for k in COMPARED:
        d = paired([a[i][k] for i in images], [b[i][k] for i in images])
        summary[k] = d
        print(f"{k:<8} A {sum(a[i][k] for i in images) / len(images):.4f}  B {sum(b[i][k] for i in images) / len(images):.4f}"
              f"  B - A {with_interval(d['difference'], d['interval'])}  B ahead in {d['b_better']:.0%} of draws")
    if args.report:
        rows = sorted(({"image": i, "caption": b[i]["caption"], "caption_a": a[i]["caption"],
                        "references": a[i]["references"], "cider_a": a[i]["cider"], "cider_b": b[i]["cider"],
                        "cider_b_minus_a": b[i]["cider"] - a[i]["cider"], "rouge_l_a": a[i]["rouge_l"],
                        "rouge_l_b": b[i]["rouge_l"]} for i in images),
                      key=lambda r: -abs(r["cider_b_minus_a"]))
        metrics = {f"{k} B - A": with_interval(d["difference"], d["interval"]) for k, d in summary.items()}
        index = write_report(args.report, rows, metrics, title="capkit comparison",
                             subtitle=f"A: {args.compare[0]}; B: {args.compare[1]}; {len(images)} images")
        print(f"report: {index}")
    return 0


def write_results(args, res: dict, skips: SkipLog) -> None:
    """The predictions file (scores + per-image rows), the summary on stdout, and the HTML report if asked."""
    ck = Path(args.checkpoint)
    out = Path(args.output) if args.output else ck.with_name(predictions_name(args.split, ck))
    summary = {k: v for k, v in res.items() if k != "predictions"}
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"checkpoint": str(args.checkpoint), "split": args.split, **summary,
                   "skipped_inputs": dict(skips.counts), "predictions": res["predictions"]}, f, indent=2)
    print(f"{args.split}: {res['num_images']} images; {skips.summary()}")
    print(f"📈 loss: {res['loss']:.4f}")
    iv = res["intervals"]
    print(f"🎯 ROUGE-L (rouge_score, stemmed): {with_interval(res['rouge_l'], iv['rouge_l'])}   "
          f"CIDEr-D: {with_interval(res['cider'], iv['cider'])}   ([95 % bootstrap interval over images])")
    print(spread_line(res))
    if "knn_baseline" in res:
        print(knn_line(res))
    print_metrics(res["caption_metrics"])
    if args.ablate_image:
        a = res["ablated"]
        print(f"🔀 images shuffled: loss {a['loss']:.4f}, ROUGE-L {a['rouge_l']:.4f} "
              f"(ROUGE-L drop {res['rouge_l'] - a['rouge_l']:.4f}), CIDEr-D {a['cider']:.4f}")
    print(f"predictions: {out}")
    if args.report:
        index = write_report(args.report, res["predictions"], report_metrics(res),
                             subtitle=f"{args.checkpoint}, {args.split} split, {res['num_images']} images")
        print(f"report: {index}")


def main(argv=None) -> int:
    """The command line: expected failures end in one paragraph and their exit code (errors.py)."""
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
