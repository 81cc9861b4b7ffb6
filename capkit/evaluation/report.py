"""
An HTML report of an evaluation: the metric table, then every image as a thumbnail with its
generated caption, its references and its per-image scores; click a column header to sort.

    python eval.py --checkpoint saved_models/model_state_dict_<run>-<epoch>.pth --report report/
    python -m capkit.evaluation.report predictions_test_<run>-<epoch>.json report/      # from a saved predictions file

The folder is self-contained (index.html + thumbs/): copy it anywhere, open index.html.
"""
from __future__ import annotations

import html
import math
import sys
from pathlib import Path

from PIL import Image

from capkit.data.images import open_image
from capkit.errors import DataError, run_cli
from capkit.evaluation.bootstrap import with_interval
from capkit.files import read_json

THUMB = 192  # thumbnail side, pixels
# per-image scores eval.py stores in predictions, and eval.py --compare's (A, B and B - A)
SCORE_KEYS = ("rouge_l", "cider", "clip_score", "ref_clip_score", "cider_a", "cider_b", "cider_b_minus_a",
              "rouge_l_a", "rouge_l_b")

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }}
th.sort {{ cursor: pointer; background: #eee; }} th.sort:hover {{ background: #ddd; }}
#metrics td:nth-child(2) {{ text-align: right; font-variant-numeric: tabular-nums; }}
.gen {{ font-weight: 600; max-width: 320px; }} .refs {{ color: #555; font-size: 90%; max-width: 360px; }}
.refs li {{ margin: 0 0 2px 0; }} img {{ display: block; width: {thumb}px; height: auto; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
</style></head><body>
<h1>{title}</h1>
<p>{subtitle}</p>
<h2>Metrics</h2>
<table id="metrics"><tr><th>metric</th><th>value</th></tr>
{metric_rows}
</table>
<h2>Images ({n})</h2>
<p>Click a header to sort (again to reverse); link to <code>index.html#sort=rouge_l</code> to open sorted.</p>
<table id="images"><thead><tr><th class="sort" title="original order">#</th><th>image</th><th>generated caption</th><th>references</th>
{score_headers}</tr></thead>
<tbody>
{image_rows}
</tbody></table>
<script>
document.querySelectorAll("#images th.sort").forEach(th => th.addEventListener("click", () => {{
  const body = document.querySelector("#images tbody"), col = th.cellIndex;
  const dir = th.dataset.dir === "desc" ? 1 : -1;   // first click: highest score first
  th.dataset.dir = dir === 1 ? "asc" : "desc";
  [...body.rows].sort((a, b) => dir * (parseFloat(a.cells[col].dataset.v) - parseFloat(b.cells[col].dataset.v)))
    .forEach(r => body.appendChild(r));
}}));
// index.html#sort=clip_score opens sorted, highest first (#sort=clip_score-asc: lowest first)
const want = location.hash.match(/^#sort=(\w+?)(-asc)?$/);
const th = want && document.querySelector(`#images th[data-key="${{want[1]}}"]`);
if (th) {{ th.click(); if (want[2]) th.click(); }}
</script>
</body></html>
"""


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def _is_number(v) -> bool:
    """A real number from a file read from anywhere (True / False are not scores)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _sort_value(v) -> str:
    """A cell's data-v attribute: a finite number, or NaN. Never text from the file (it would be markup)."""
    if _is_number(v) and math.isfinite(v):
        return repr(float(v))
    return "NaN"


def check_rows(predictions, source) -> list[dict]:
    """Rows of a predictions file from anywhere: each a JSON object with a string image and caption, and
    references a list of strings; DataError naming the row otherwise."""
    if not isinstance(predictions, list):
        raise DataError(f"{source}: 'predictions' must be a list of rows")
    for n, p in enumerate(predictions):
        if not isinstance(p, dict) or not isinstance(p.get("image"), str) or not isinstance(p.get("caption"), str):
            raise DataError(f"{source}: prediction row {n} needs 'image' and 'caption' strings, got {str(p)[:80]}")
        refs = p.get("references", [])
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise DataError(f"{source}: prediction row {n}: 'references' must be a list of strings")
    return predictions


def write_thumbnail(src, dst: Path) -> bool:
    """A JPEG thumbnail of src at dst; False (and no file) if the image can't be read. Only regular files
    under the pixel budget are opened: a predictions file can name anything."""
    try:
        with open_image(src) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            if max(im.size) < THUMB:  # tiny images (the 64-px demo) are scaled up so they can be seen
                s = THUMB / max(im.size)
                im = im.resize((round(im.width * s), round(im.height * s)), Image.NEAREST)
            im.save(dst, "JPEG", quality=88)
        return True
    except Exception:  # decoding a file from anywhere: whatever it raises, that thumbnail is left out
        return False


def write_report(out_dir, predictions: list[dict], metrics: dict, title: str = "capkit evaluation",
                 subtitle: str = "") -> Path:
    """predictions: eval.py's rows ({image, caption, references, rouge_l, [clip_score, ref_clip_score]});
    metrics: name -> value (numbers and short strings). -> the path of index.html."""
    predictions = check_rows(predictions, "predictions")
    out = check_report_dir(out_dir)
    keys = [k for k in SCORE_KEYS if any(k in p for p in predictions)]
    rows = []
    for i, p in enumerate(predictions):
        thumb = out / "thumbs" / f"{i:05d}.jpg"
        if thumb.is_symlink():  # written in place of a link, never through it
            thumb.unlink()
        img = (f'<img src="thumbs/{thumb.name}" alt="{html.escape(Path(p["image"]).name)}">'
               if write_thumbnail(p["image"], thumb) else f'<em>unreadable: {html.escape(str(p["image"]))}</em>')
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in p.get("references", []))
        scores = "".join(f'<td class="num" data-v="{_sort_value(p.get(k))}">{_fmt(p.get(k, ""))}</td>' for k in keys)
        caption = html.escape(p["caption"]) if "caption_a" not in p else \
            f'A: {html.escape(str(p["caption_a"]))}<br>B: {html.escape(p["caption"])}'  # eval.py --compare
        rows.append(f'<tr><td class="num" data-v="{i}">{i}</td><td>{img}</td><td class="gen">'
                    f'{caption}</td><td class="refs"><ul>{refs}</ul></td>{scores}</tr>')
    metric_rows = "\n".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in metrics.items()
                            if isinstance(v, (int, float, str)) and not isinstance(v, bool))
    headers = "".join(f'<th class="sort" data-key="{html.escape(k)}" title="sort by {html.escape(k)}">{html.escape(k)} ↕</th>'
                      for k in keys)
    page = PAGE.format(title=html.escape(title), subtitle=html.escape(subtitle), metric_rows=metric_rows,
                       n=len(predictions), score_headers=headers, image_rows="\n".join(rows), thumb=THUMB)
    if (out / "index.html").is_symlink():
        (out / "index.html").unlink()
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def check_report_dir(out_dir) -> Path:
    """The report folder with a real thumbs/ folder in it (a link there is replaced, never written through),
    created, or DataError. (The folder the user named may itself be a link: that is their choice.)"""
    out, thumbs = Path(out_dir), Path(out_dir) / "thumbs"
    if thumbs.is_symlink():
        thumbs.unlink()
    try:
        thumbs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"report folder {thumbs} can't be created: {e.strerror or e}") from None
    return out


def report_metrics(result: dict) -> dict:
    """An evaluation's result (eval.py's JSON or evaluate() + caption_metrics) -> the report's metric table, each
    score with its 95 % bootstrap interval where the result has one ("0.3810 [0.3520, 0.4090]")."""
    extra = result.get("caption_metrics") if isinstance(result.get("caption_metrics"), dict) else {}
    knn = result.get("knn_baseline") if isinstance(result.get("knn_baseline"), dict) else {}
    iv = {**_intervals(result), **_intervals(extra)}
    metrics = {"loss": result.get("loss"), "rouge_l (rouge_score)": _shown(result.get("rouge_l"), iv.get("rouge_l")),
               "cider (capkit)": _shown(result.get("cider"), iv.get("cider")),
               "kNN-consensus baseline cider": knn.get("consensus_cider"),
               "distinct captions": result.get("distinct_captions"),
               **{k: _shown(v, iv.get(k)) for k, v in extra.items() if k != "intervals"}}
    if result.get("clip_score_absent"):  # said, not left blank: the encoder has no text tower trained with it
        metrics["clip_score"] = f"absent: {result['clip_score_absent']}"
    return {k: v for k, v in metrics.items() if v is not None}


def _intervals(result: dict) -> dict:
    """result["intervals"] if it is a name -> (low, high) table, else {} (a predictions file is read from anywhere)."""
    iv = result.get("intervals")
    return iv if isinstance(iv, dict) else {}


def _shown(value, bounds):
    """A score with its interval as text, or the score alone where the bounds are absent or not two numbers."""
    ok = _is_number(value) and isinstance(bounds, (list, tuple)) and len(bounds) == 2 and all(map(_is_number, bounds))
    return with_interval(value, bounds) if ok else value


def run(argv) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[0] + "\nusage: python -m capkit.evaluation.report PREDICTIONS.json OUT_DIR",
              file=sys.stderr)
        return 2
    data = read_json(argv[0], "predictions file")
    if not isinstance(data, dict) or "predictions" not in data:
        raise DataError(f"{argv[0]} is not an eval.py predictions file (no 'predictions')")
    check_rows(data["predictions"], argv[0])  # (named after the file here; write_report checks the folder)
    index = write_report(argv[1], data["predictions"], report_metrics(data),
                         subtitle=f"{data.get('checkpoint', '')}, split {data.get('split', '?')}")
    print(f"report: {index}")
    return 0


def main(argv=None) -> int:
    """The command line: expected failures end in one paragraph and their exit code (errors.py)."""
    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
