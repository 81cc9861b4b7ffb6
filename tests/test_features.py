"""The frozen-encoder feature cache: computed once, reused, invalidated when its key changes, rebuilt when damaged."""
import pytest
import torch
from conftest import make_model, write_image
from PIL import Image

import train
from capkit.data.features import encoder_fingerprint, image_features


@pytest.fixture
def images(tmp_path):
    return [write_image(tmp_path / "img" / f"{i}.png", color=(i * 40, 100, 200 - i * 30), size=(48, 40)) for i in range(5)]


def counting(model):
    calls = {"n": 0}
    inner = model.image_encoder.forward

    def forward(*a, **k):
        calls["n"] += 1
        return inner(*a, **k)
    model.image_encoder.forward = forward
    return calls


def test_cache_hit_skips_the_encoder_and_returns_the_same_features(tmp_path, images):
    model = make_model()
    calls = counting(model)
    a, ok = image_features(model, images, tmp_path / "cache", batch_size=2)
    assert calls["n"] == 3 and ok == list(range(5)) and a.shape == (5, 32)
    b, ok2 = image_features(model, images, tmp_path / "cache", batch_size=2)
    assert calls["n"] == 3 and ok2 == ok and torch.equal(a, b)
    # cached values are the fp16-rounded encoder output, kept in fp16 (patch tokens of a big set are gigabytes)
    ref, _ = image_features(model, images, None, batch_size=5)
    assert a.dtype == torch.float16 and torch.equal(a, ref.half())


def test_patch_tokens_are_cached_under_their_own_key(tmp_path, images, capsys):
    """encoder_features is part of the key: the same encoder's pooled and token features never mix, and the
    size on disk is said before extracting."""
    pooled, tokens = make_model(), make_model(mapper_type="resampler", encoder_features="tokens", mapper_num_layers=1,
                                              mapper_num_heads=2)
    assert encoder_fingerprint(pooled) != encoder_fingerprint(tokens)
    calls = counting(tokens)
    t, ok = image_features(tokens, images, tmp_path / "c", batch_size=5)
    assert t.shape == (5, 4, 32) and t.dtype == torch.float16 and ok == list(range(5))   # 2 x 2 patches, width 32
    assert "5 images x 4x32 fp16 (tokens) = 0.0 MB" in capsys.readouterr().out
    t2, _ = image_features(tokens, images, tmp_path / "c", batch_size=5)
    assert calls["n"] == 1 and torch.equal(t, t2)                      # a hit: the encoder ran once
    pixels = torch.stack([tokens.preprocess(Image.open(i).convert("RGB")) for i in images])
    assert torch.equal(t, tokens.encode_images(pixels).half())        # the patch tokens themselves, fp16
    p, _ = image_features(pooled, images, tmp_path / "c", batch_size=5)
    assert p.shape == (5, 32) and len(list((tmp_path / "c").rglob("*.safetensors"))) == 2


def test_cache_invalidated_by_encoder_weights_preprocessing_and_image_content(tmp_path, images):
    import open_clip
    model = make_model()
    calls = counting(model)
    image_features(model, images, tmp_path / "c")
    key = encoder_fingerprint(model)
    with torch.no_grad():
        next(model.image_encoder.parameters()).add_(1e-3)          # other weights
    assert encoder_fingerprint(model) != key
    image_features(model, images, tmp_path / "c")
    assert calls["n"] == 2
    model.preprocess = open_clip.image_transform(32, is_train=False, resize_mode="squash")   # other preprocessing
    image_features(model, images, tmp_path / "c")
    assert calls["n"] == 3
    write_image(images[0], color=(1, 2, 3), size=(48, 40))       # other image content
    image_features(model, images, tmp_path / "c")
    assert calls["n"] == 4
    image_features(model, images, tmp_path / "c")
    assert calls["n"] == 4
    assert len(list((tmp_path / "c").rglob("*.safetensors"))) == 4


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_cache_file_is_rebuilt(tmp_path, images, damage, capsys):
    model = make_model()
    calls = counting(model)
    a, _ = image_features(model, images, tmp_path / "c")
    (f,) = list((tmp_path / "c").rglob("*.safetensors"))
    raw = f.read_bytes()
    f.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": b"\x00" * 64 + raw[64:], "empty": b""}[damage])
    b, _ = image_features(model, images, tmp_path / "c")
    assert calls["n"] == 2 and torch.equal(a, b) and "rebuilding" in capsys.readouterr().out
    c, _ = image_features(model, images, tmp_path / "c")  # the rebuilt file is trusted again
    assert calls["n"] == 2 and torch.equal(a, c)


def test_unreadable_images_stay_skipped_on_cache_hits(tmp_path, images):
    from capkit.data.images import SkipLog
    (tmp_path / "img" / "3.png").write_bytes(b"not an image")
    model = make_model()
    for _ in range(2):
        skips = SkipLog()
        feats, ok = image_features(model, images, tmp_path / "c", skips=skips)
        assert ok == [0, 1, 2, 4] and feats.shape[0] == 4 and len(skips.items) == 1


def test_training_epochs_never_call_the_encoder(tmp_path, monkeypatch):
    """Encoder calls are the same for 1 and for 3 epochs: all of them happen in feature extraction."""
    from conftest import count_encoder_calls

    from capkit.data.shapes import write_split
    for split, n, seed in (("train", 24, 1), ("val", 4, 2), ("test", 4, 3)):
        write_split(tmp_path / "data" / split, n, seed)
    calls = count_encoder_calls(monkeypatch)
    counts = []
    for epochs in (1, 3):
        calls["n"] = 0
        hp = train.resolve_hparams(["--preset=demo", "--dataset=folder", f"--train_dir={tmp_path / 'data/train'}",
                                    f"--val_dir={tmp_path / 'data/val'}", f"--test_dir={tmp_path / 'data/test'}",
                                    f"--num_epochs={epochs}", "--batch_size=16", "--test_evaluation_enabled=False",
                                    f"--output_dir={tmp_path / f'out{epochs}'}", f"--feature_cache_dir={tmp_path / f'cache{epochs}'}"])
        train.train(hp)
        counts.append(calls["n"])
    assert counts[0] == counts[1] == 2  # one batch of train images, one of val images; never again
