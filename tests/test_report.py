"""The HTML report: escaped text, thumbnails, sortable scores, and a real render in headless Chromium."""
import shutil
import subprocess

import numpy as np
import pytest
from conftest import chromium_path
from PIL import Image

from capkit.data.shapes import write_split
from capkit.evaluation import report


@pytest.fixture
def preds(tmp_path):
    write_split(tmp_path / "imgs", 6, seed=5)
    rows = [l.split(",", 1) for l in (tmp_path / "imgs" / "captions.csv").read_text().splitlines()[1:]]
    by_image = {}
    for name, cap in rows:
        by_image.setdefault(name, []).append(cap)
    out = [{"image": str(tmp_path / "imgs" / name), "caption": caps[0], "references": caps[1:],
            "rouge_l": s, "clip_score": 2 * s} for (name, caps), s in zip(sorted(by_image.items()), (0.2, 0.9, 0.5, 0.1, 0.7, 0.3))]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    out.append({"image": str(tmp_path / "bad.png"), "caption": "<script>alert(1)</script> & co", "references": ["x"],
                "rouge_l": 0.4, "clip_score": 0.8})
    return out


def test_report_page_thumbnails_and_escaping(tmp_path, preds):
    index = report.write_report(tmp_path / "rep", preds, {"CIDEr": 1.23456, "tokenizer": "ptb", "skipped": {"a": 1}})
    page = index.read_text()
    assert page.count('<img src="thumbs/') == 6 and len(list((tmp_path / "rep" / "thumbs").glob("*.jpg"))) == 6
    assert "unreadable:" in page                                      # the broken file is a row, not a crash
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    assert "1.2346" in page and "skipped" not in page                 # numbers formatted, nested values left out
    assert 'data-key="rouge_l"' in page and 'data-key="clip_score"' in page
    with Image.open(tmp_path / "rep" / "thumbs" / "00000.jpg") as im:
        assert max(im.size) == report.THUMB                           # the 64-px demo images are scaled up


def chromium(*args, cwd):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={cwd / 'chromium-profile'}", "--hide-scrollbars"]
    return subprocess.run([chromium_path(), *flags, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def saturated_pixels(png) -> int:
    """Pixels of strong colour: the demo thumbnails have them, text and table lines don't."""
    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int(((a.max(-1) - a.min(-1)) > 90).sum())


def test_report_renders_in_headless_chromium_with_its_images(tmp_path, preds):
    index = report.write_report(tmp_path / "rep", preds, {"CIDEr": 1.0})
    shot = tmp_path / "shot.png"
    p = chromium("--window-size=1200,1600", f"--screenshot={shot}", index.as_uri(), cwd=tmp_path)
    assert shot.exists(), p.stderr[-2000:]
    a = np.asarray(Image.open(shot).convert("L"))
    assert a.std() > 20                                # not a blank page
    shown = saturated_pixels(shot)
    # the same page with its thumbnails gone: what remains is text, lines and broken-image icons
    shutil.rmtree(tmp_path / "rep" / "thumbs")
    bare = tmp_path / "bare.png"
    chromium("--window-size=1200,1600", f"--screenshot={bare}", index.as_uri(), cwd=tmp_path)
    assert shown > 5000 and shown > 20 * max(saturated_pixels(bare), 1), (shown, saturated_pixels(bare))


def test_report_sorts_by_a_score_in_the_browser(tmp_path, preds):
    index = report.write_report(tmp_path / "rep", preds, {})
    p = chromium("--dump-dom", index.as_uri() + "#sort=rouge_l", cwd=tmp_path)
    body = p.stdout.split('<tbody>', 1)[1]
    order = [float(v) for v in __import__("re").findall(r'<td class="num" data-v="([0-9.]+)">[0-9.]+</td><td class="num"', body)]
    assert order == sorted(order, reverse=True) and len(order) == 7, order


def test_report_metric_table_gives_each_interval(tmp_path, preds):
    """eval.py's result -> the page's metric table: every score that has a 95 % interval shows it; a hostile
    predictions file's odd interval table is left out, never a crash."""
    res = {"loss": 2.5, "rouge_l": 0.42, "cider": 0.381, "intervals": {"rouge_l": [0.41, 0.43], "cider": [0.352, 0.409]},
           "caption_metrics": {"Bleu_4": 0.162, "METEOR": 0.179, "tokenizer": "ptb",
                               "intervals": {"Bleu_4": [0.151, 0.173], "METEOR": "not two numbers"}}}
    metrics = report.report_metrics(res)
    assert metrics["cider (capkit)"] == "0.3810 [0.3520, 0.4090]"
    assert metrics["rouge_l (rouge_score)"] == "0.4200 [0.4100, 0.4300]"
    assert metrics["Bleu_4"] == "0.1620 [0.1510, 0.1730]" and metrics["METEOR"] == 0.179 and "intervals" not in metrics
    page = report.write_report(tmp_path / "rep", preds, metrics).read_text()
    assert "0.3810 [0.3520, 0.4090]" in page and "0.1620 [0.1510, 0.1730]" in page
    assert report.report_metrics({"cider": 0.3, "intervals": "x", "caption_metrics": {"intervals": 5}}) == {"cider (capkit)": 0.3}
