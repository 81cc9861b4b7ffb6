"""capkit's decode loop (capkit/models/decoding.py) against transformers' generate on tiny models: greedy gives the
same tokens, beam search the same captions, for captions ending at different steps, batch sizes 1 and odd, a
retrieval prompt, the never-empty guard and the stop hook; sampling goes to generate and repeats with a seed."""
import pytest
import torch
from conftest import make_model

from capkit.models.retrieval import Datastore


def ending_at_various_steps(model, bias: float):
    """A forward hook that adds `bias` to the end-of-text logit: with a suitable bias, captions of a batch end at
    different steps (an untrained tiny decoder rarely ends by itself)."""
    eos = model.tokenizer.eos_token_id

    def hook(module, inputs, out):
        out[..., eos] += bias
        return out
    return model.lm.get_output_embeddings().register_forward_hook(hook)


def both(model, **kw):
    """(capkit's loop, transformers' generate) on the same inputs and settings -> their token ids and captions."""
    model.fast_decoding = True
    fast = model.generate_ids(**kw), model.generate(**kw)
    model.fast_decoding = False
    try:
        slow = model.generate_ids(**kw), model.generate(**kw)
    finally:
        model.fast_decoding = True
    return fast, slow


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = make_model()
    for p in m.mapper.parameters():  # a prefix that matters: captions differ from image to image
        p.data.normal_(0, 0.5)
    return m


@pytest.mark.parametrize("batch", [1, 3, 7])
@pytest.mark.parametrize("bias", [0.0, 4.0, 4.5])
@pytest.mark.parametrize("max_new", [1, 5, 14])
def test_greedy_gives_generates_tokens(model, batch, bias, max_new):
    feats = torch.randn(batch, model.config.encoder_embed_dim, generator=torch.Generator().manual_seed(batch))
    handle = ending_at_various_steps(model, bias)
    try:
        (ids, caps), (ref_ids, ref_caps) = both(model, image_embeds=feats, max_new_tokens=max_new)
    finally:
        handle.remove()
    assert torch.equal(ids, ref_ids) and caps == ref_caps


def test_the_bias_really_ends_captions_at_different_steps(model):
    """(so that the tests above cover rows leaving the batch mid-way)"""
    feats = torch.randn(7, model.config.encoder_embed_dim, generator=torch.Generator().manual_seed(7))
    handle = ending_at_various_steps(model, 4.0)
    try:
        ids = model.generate_ids(image_embeds=feats, max_new_tokens=14)
    finally:
        handle.remove()
    ended = ids == model.tokenizer.eos_token_id
    ends = torch.where(ended.any(-1), ended.float().argmax(-1), -1)
    assert len(set(ends.tolist())) >= 4 and -1 in ends.tolist()  # several steps, and some never end


@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("beams", [2, 3])
@pytest.mark.parametrize("bias", [0.0, 4.0, 4.5])
@pytest.mark.parametrize("max_new", [1, 6, 14])
def test_beam_search_gives_generates_captions(model, batch, beams, bias, max_new):
    feats = torch.randn(batch, model.config.encoder_embed_dim, generator=torch.Generator().manual_seed(batch + 10))
    handle = ending_at_various_steps(model, bias)
    try:
        (ids, caps), (ref_ids, ref_caps) = both(model, image_embeds=feats, max_new_tokens=max_new, num_beams=beams)
    finally:
        handle.remove()
    assert caps == ref_caps
    assert ids.shape == ref_ids.shape


def test_a_retrieval_prompt_decodes_as_generate_does():
    model = make_model(retrieval_k=2, positions=256)
    for p in model.mapper.parameters():
        p.data.normal_(0, 0.5)
    keys = torch.randn(6, model.config.encoder_embed_dim)
    captions = [["a red circle"], ["two blue squares on grass"], ["a dog"], ["a small cat"], ["x"], ["a big tree"]]
    model.attach_datastore(Datastore.build(keys, [f"{i}.png" for i in range(6)], captions, "fp"))
    feats = torch.randn(5, model.config.encoder_embed_dim)   # prompts of different lengths: left padding
    for beams in (1, 3):
        (ids, caps), (ref_ids, ref_caps) = both(model, image_embeds=feats, max_new_tokens=10, num_beams=beams)
        assert caps == ref_caps and (beams > 1 or torch.equal(ids, ref_ids))


@pytest.mark.parametrize("beams", [1, 3])
def test_the_stop_hook_ends_a_batch_as_in_generate(model, beams):
    feats = torch.randn(3, model.config.encoder_embed_dim)
    calls = {"fast": 0, "slow": 0}

    def stop_after(which, n):
        def stop():
            calls[which] += 1
            return calls[which] >= n
        return stop
    model.fast_decoding = True
    fast = model.generate(image_embeds=feats, max_new_tokens=12, num_beams=beams, stop=stop_after("fast", 4))
    model.fast_decoding = False
    slow = model.generate(image_embeds=feats, max_new_tokens=12, num_beams=beams, stop=stop_after("slow", 4))
    model.fast_decoding = True
    assert fast == slow and calls["fast"] == calls["slow"] == 4


def test_sampling_goes_to_generate_once_said_and_repeats_with_a_seed(model, capsys):
    feats = torch.randn(3, model.config.encoder_embed_dim)
    kw = {"image_embeds": feats, "max_new_tokens": 8, "do_sample": True, "temperature": 2.0, "seed": 3}
    a, b = model.generate(**kw), model.generate(**kw)
    assert a == b and a != model.generate(**{**kw, "seed": 4})
    assert capsys.readouterr().out.count("sampling decodes through transformers' generate") == 1


def test_captioning_a_split_shows_a_bar_that_reaches_the_image_count(model, capsys):
    from capkit.evaluation.evaluator import generate_all
    feats = torch.randn(7, model.config.encoder_embed_dim)
    caps = generate_all(model, feats, batch_size=3, max_new_tokens=4)
    err = capsys.readouterr().err
    assert len(caps) == 7 and "Captioning" in err and "0/7" in err and "7/7" in err  # (tqdm skips quick updates)


def repeated_trigrams(ids) -> list[int]:
    return [len(g) - len(set(g)) for g in ([tuple(r[i:i + 3]) for i in range(len(r) - 2)] for r in ids.tolist())]


def test_no_repeat_ngram_size_and_repetition_penalty_change_what_generate_returns(model, capsys):
    feats = torch.randn(6, model.config.encoder_embed_dim, generator=torch.Generator().manual_seed(3))
    plain = model.generate_ids(image_embeds=feats, max_new_tokens=20)
    assert sum(repeated_trigrams(plain)) > 0                                # (the tiny decoder loops by itself)
    assert sum(repeated_trigrams(model.generate_ids(image_embeds=feats, max_new_tokens=20,
                                                    no_repeat_ngram_size=3))) == 0
    repeats = [len(r) - len(set(r)) for r in plain.tolist()]
    penalised = model.generate_ids(image_embeds=feats, max_new_tokens=20, repetition_penalty=3.0)
    assert sum(len(r) - len(set(r)) for r in penalised.tolist()) < sum(repeats)
    assert "no_repeat_ngram_size / repetition_penalty decodes through transformers' generate" in capsys.readouterr().out


@pytest.mark.parametrize("beams", [1, 3])
def test_min_new_tokens_holds_the_end_of_text_back_as_in_generate(model, beams):
    feats = torch.randn(5, model.config.encoder_embed_dim, generator=torch.Generator().manual_seed(5))
    handle = ending_at_various_steps(model, 4.5)
    try:
        short = model.generate_ids(image_embeds=feats, max_new_tokens=12, num_beams=beams)
        (ids, caps), (ref_ids, ref_caps) = both(model, image_embeds=feats, max_new_tokens=12, num_beams=beams,
                                                min_new_tokens=6)
    finally:
        handle.remove()
    eos = model.tokenizer.eos_token_id
    first_end = lambda t: [(r.index(eos) if eos in r else len(r)) for r in t.tolist()]  # noqa: E731
    assert min(first_end(short)) < 6 <= min(first_end(ids))                 # it ended earlier without the setting
    assert caps == ref_caps and (beams > 1 or torch.equal(ids, ref_ids))


def test_length_penalty_is_applied_as_in_generate(model):
    feats = torch.randn(5, model.config.encoder_embed_dim, generator=torch.Generator().manual_seed(6))
    handle = ending_at_various_steps(model, 4.0)
    try:
        results = {lp: both(model, image_embeds=feats, max_new_tokens=12, num_beams=3, length_penalty=lp)
                   for lp in (-2.0, 3.0)}
    finally:
        handle.remove()
    for (ids, caps), (ref_ids, ref_caps) in results.values():
        assert caps == ref_caps
    lengths = {lp: sum(len(c.split()) for c in r[0][1]) for lp, r in results.items()}
    assert lengths[3.0] > lengths[-2.0]                                     # a positive penalty favours longer ones


def test_serve_takes_the_decoding_settings_as_options():
    from serve import read_options
    opts = read_options([("min_new_tokens", "3"), ("no_repeat_ngram_size", "2")], [("length_penalty", "1.5")])
    assert (opts["min_new_tokens"], opts["no_repeat_ngram_size"], opts["length_penalty"]) == (3, 2, 1.5)
    with pytest.raises(Exception, match="repetition_penalty"):
        read_options([("repetition_penalty", "0")], [])
