"""Retrieval (retrieval.py): the datastore's neighbours and files, the kNN baseline, and retrieval-augmented
captioning through train.py, eval.py, inference.py and --datastore."""
import json

import pytest
import torch
from conftest import as_generation_sees, make_model, run_script

import train
from capkit.errors import MissingInputError, RefusedFileError
from capkit.evaluation.evaluator import consensus_captions, knn_baseline
from capkit.models.retrieval import Datastore, open_datastore
from model import load_captioner

CAPTIONS = [["a red dog"], ["the blue cat sits on the grass"], ["a green ball"], ["big snow"], ["a small red cat runs"]]


def store_for(model, seed=0):
    feats = torch.randn(len(CAPTIONS), model.config.encoder_embed_dim, generator=torch.Generator().manual_seed(seed))
    return Datastore.build(feats, [f"{i}.png" for i in range(len(CAPTIONS))], CAPTIONS, "fp"), feats


def test_neighbours_are_the_nearest_and_never_the_query_itself():
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]])
    store = Datastore.build(keys, list("abcd"), [[c] for c in "abcd"], "fp")
    idx = store.neighbours(keys[[0, 2]], k=2).tolist()
    assert idx[0] == [1, 3] and idx[1] == [3, 1]                # itself (cosine 1) excluded; then by cosine
    tokens = keys[:, None, :].expand(4, 5, 2)                   # tokens: their mean is the key
    assert store.neighbours(tokens[[0]], k=1).tolist() == [[1]]


def test_a_datastore_file_round_trips_and_damage_is_refused(tmp_path):
    store = Datastore.build(torch.randn(5, 8), [f"{i}.png" for i in range(5)], CAPTIONS, "abc")
    store.save(tmp_path / "d.safetensors")
    again = Datastore.load(tmp_path / "d.safetensors")
    assert again.captions == CAPTIONS and again.fingerprint == "abc"
    assert torch.allclose(again.keys, store.keys, atol=1e-3)
    raw = (tmp_path / "d.safetensors").read_bytes()
    for bad in (raw[: len(raw) // 2], b"garbage", b""):
        (tmp_path / "bad.safetensors").write_bytes(bad)
        with pytest.raises(RefusedFileError, match="datastore"):
            Datastore.load(tmp_path / "bad.safetensors")


def test_consensus_picks_the_caption_its_neighbours_agree_on():
    picked = consensus_captions([["a dog runs on grass", "a dog runs on the grass", "a red car", "a dog on grass"]])
    assert picked[0] in ("a dog runs on grass", "a dog runs on the grass")
    store = Datastore.build(torch.eye(3), list("abc"), [["a dog"], ["a dog runs"], ["a cat"]], "fp")
    out = knn_baseline(store, torch.tensor([[1.0, 0.9, 0.0]]), [["a dog runs"]], k=2)
    assert out["k"] == 2 and out["consensus_cider"] >= 0 and out["nearest_rouge_l"] > 0.5


def test_the_prompt_is_left_padded_and_greedy_equals_teacher_forced_argmax():
    """With prompts of different lengths in one batch, the caption's logits are those of each image alone."""
    model = make_model(retrieval_k=2, positions=256)
    store, feats = store_for(model)
    model.attach_datastore(store)
    torch.manual_seed(3)
    for p in model.mapper.parameters():
        p.data.normal_(0, 0.5)
    q = torch.randn(3, model.config.encoder_embed_dim)
    ids, mask = model.retrieval_prompt(q)
    assert (mask.sum(1) != mask.shape[1]).any() and (mask[:, -1] == 1).all()  # left padding where shorter
    text = model.tokenizer.decode(ids[0][mask[0].bool()])
    assert text.startswith("Similar images show: ") and text.endswith(". This image shows:")
    gen = model.generate_ids(image_embeds=q, max_new_tokens=6)
    eos = model.tokenizer.eos_token_id
    cmask = torch.ones_like(gen)
    for i in range(len(gen)):
        hit = (gen[i] == eos).nonzero()
        if len(hit):
            cmask[i, hit[0, 0] + 1:] = 0
    logits, _ = model(gen, cmask, image_embeds=q)
    assert torch.equal(as_generation_sees(logits, model.tokenizer).argmax(-1)[cmask.bool()], gen[cmask.bool()])
    alone, _ = model(gen[:1], cmask[:1], image_embeds=q[:1])                # batched = alone
    assert torch.allclose(alone[0][cmask[0].bool()], model(gen, cmask, image_embeds=q)[0][0][cmask[0].bool()],
                          atol=1e-4)


def prompt_texts(model, q):
    ids, mask = model.retrieval_prompt(q)
    return [model.tokenizer.decode(i[m.bool()]) for i, m in zip(ids, mask)]


def test_training_draws_k_of_the_pool_and_a_random_caption_evaluation_takes_the_nearest():
    """retrieval_pool: in training the k neighbours are drawn among the pool nearest (and any of their captions);
    in evaluation they are the k nearest, first captions, every time. The SmallCap template's words surround them."""
    model = make_model(retrieval_k=1, retrieval_pool=4, retrieval_template="smallcap", positions=256)
    captions = [[f"{w} dog", f"{w} cat"] for w in ("red", "blue", "green", "big", "small")]
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.0, 1.0]])
    model.attach_datastore(Datastore.build(keys, list("abcde"), captions, "fp"))
    q = torch.tensor([[1.0, 0.05]])
    model.eval()
    assert {prompt_texts(model, q)[0] for _ in range(5)} == {"Similar images show\n\nred dog.\n\nThis image shows"}
    model.train()
    torch.manual_seed(0)
    seen = {prompt_texts(model, q)[0] for _ in range(60)}
    inner = {t.removeprefix("Similar images show\n\n").removesuffix(".\n\nThis image shows") for t in seen}
    assert inner == {f"{w} {a}" for w in ("red", "blue", "green", "big") for a in ("dog", "cat")}  # never "small"
    torch.manual_seed(0)
    assert {prompt_texts(model, q)[0] for _ in range(60)} == seen  # torch's RNG: a resume replays the draw
    model.config.retrieval_pool = 0  # no pool: training reads the k nearest's first captions, as evaluation does
    assert {prompt_texts(model, q)[0] for _ in range(5)} == {"Similar images show\n\nred dog.\n\nThis image shows"}


def test_a_retrieval_model_without_a_datastore_says_so():
    model = make_model(retrieval_k=2, positions=256)
    with pytest.raises(ValueError, match="datastore"):
        model.generate(image_embeds=torch.randn(1, model.config.encoder_embed_dim))


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory):
    """train.py on the tiny demo with retrieval_k=2 (one epoch) -> (folder, its last metadata)."""
    from capkit.data.shapes import write_split
    tmp = tmp_path_factory.mktemp("rag")
    for split, n, seed in (("train", 48, 1), ("val", 6, 2), ("test", 6, 3), ("other", 8, 4)):
        write_split(tmp / "data" / split, n, seed)
    hp = train.resolve_hparams(["--preset=demo", "--dataset=folder", f"--train_dir={tmp / 'data/train'}",
                                f"--val_dir={tmp / 'data/val'}", f"--test_dir={tmp / 'data/test'}", "--num_epochs=1",
                                "--batch_size=16", "--retrieval_k=2", "--ablate_image=False", "--log_with=None",
                                f"--output_dir={tmp / 'out'}", f"--feature_cache_dir={tmp / 'cache'}"])
    return tmp, train.train(hp)


def test_training_saves_the_datastore_and_the_checkpoint_loads_with_it(retrieval_run):
    tmp, meta = retrieval_run
    ckpt = tmp / "out" / meta["checkpoint"]
    assert meta["model_config"]["retrieval_k"] == 2 and "knn_baseline" in meta["test"]
    store_file = tmp / "out" / f"datastore_{meta['run_id']}.safetensors"
    assert store_file.is_file() and len(Datastore.load(store_file)) == 48  # every training image (val_dir is given)
    model = load_captioner(ckpt)
    assert model.datastore is not None and len(model.datastore) == len(Datastore.load(store_file))
    caps = model.generate(image_embeds=torch.randn(2, *model.feature_shape), max_new_tokens=8)
    assert all(c.strip() for c in caps)
    # the datastore moved away: one sentence naming the file and the way out
    store_file.rename(store_file.with_suffix(".moved"))
    try:
        with pytest.raises(MissingInputError, match="--datastore"):
            load_captioner(ckpt)
    finally:
        store_file.with_suffix(".moved").rename(store_file)


def test_a_datastore_name_that_leaves_the_checkpoint_folder_is_refused(retrieval_run, tmp_path):
    """The checkpoint names its datastore; a hostile name ('../x', '/etc/passwd', a list) is never opened."""
    tmp, meta = retrieval_run
    ckpt = torch.load(tmp / "out" / meta["checkpoint"], weights_only=True)
    for name in ("../datastore.safetensors", "/etc/passwd", ["a"]):
        torch.save({**ckpt, "datastore": name}, tmp_path / "hostile.pth")
        with pytest.raises(RefusedFileError, match="datastore file name"):
            load_captioner(tmp_path / "hostile.pth", datastore=str(tmp / "data" / "other"))


def test_datastore_swap_retrieves_from_another_folder(retrieval_run):
    """--datastore DIR: training-free transfer; the prompts now quote the new folder's captions."""
    tmp, meta = retrieval_run
    ckpt = tmp / "out" / meta["checkpoint"]
    model = load_captioner(ckpt, datastore=str(tmp / "data" / "other"))
    assert len(model.datastore) == 8
    other = {c for caps in model.datastore.captions for c in caps}
    ids, mask = model.retrieval_prompt(torch.randn(1, *model.feature_shape))
    text = model.tokenizer.decode(ids[0][mask[0].bool()])
    assert any(c[:10] in text for c in other)
    foreign = Datastore.build(torch.randn(3, 5), list("abc"), [["x"], ["y"], ["z"]], "another encoder")
    foreign.save(tmp / "foreign.safetensors")
    with pytest.raises(RefusedFileError, match="another image encoder"):
        open_datastore(model, tmp / "foreign.safetensors")


def test_eval_and_inference_use_the_datastore(retrieval_run, tmp_path):
    tmp, meta = retrieval_run
    ckpt = tmp / "out" / meta["checkpoint"]
    out = run_script("eval.py", "--checkpoint", str(ckpt), "--output", str(tmp_path / "p.json"), "--device", "cpu")
    assert "kNN baseline (8 nearest of" in out and "distinct captions:" in out
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["knn_baseline"]["consensus_cider"] >= 0 and all(p["knn_caption"] for p in res["predictions"])
    img = sorted((tmp / "data" / "test").rglob("*.png"))[0]
    out = run_script("inference.py", "--checkpoint", str(ckpt), str(img), "--datastore", str(tmp / "data" / "other"),
                     "--device", "cpu")
    assert str(img) in out


def test_serve_captions_with_the_retrieval_model(retrieval_run):
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from serve import create_app
    tmp, meta = retrieval_run
    model = load_captioner(tmp / "out" / meta["checkpoint"])
    img = sorted((tmp / "data" / "test").rglob("*.png"))[0]
    with TestClient(create_app(model, "rag.pth")) as c:
        r = c.post("/caption", files=[("files", (img.name, img.read_bytes(), "image/png"))])
    assert r.status_code == 200, r.text
    expected = model.generate(pixel_values=model.preprocess(Image.open(io.BytesIO(img.read_bytes())).convert("RGB"))[None])
    assert r.json()[0]["caption"] == expected[0] and expected[0].strip()
