"""
capkit's decode loop for the main path (PrefixCaptioner): greedy search and beam search with transformers'
`generate` semantics, less of its work. The image prefix (and retrieval prompt) is run through the decoder once per
image and its KV cache shared by the image's beams (generate runs it once per beam); an image whose caption is
settled (greedy: it wrote its end of text; beams: no open beam can beat the finished ones) leaves the batch, so
later steps compute only the captions still being written (generate keeps computing every row to the longest).
Beam bookkeeping is transformers' own (GenerationMixin's top-k / finished-beam / early-stop helpers), so the final
captions are the ones `generate` picks. Sampling is left to `generate` (capkit's Generation.do_sample).

    ids = decode(model.lm, lead, mask, g, eos_id=..., pad_id=..., suppress=..., begin_suppress=..., stop=None)
    # lead (B, L, H) embeddings, mask (B, L) -> new token ids (B, <= g.max_new_tokens), pad after the end of text
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

NEG = -1.0e9  # transformers' "never chosen" score in beam search


def covers(lm, g) -> str | None:
    """None when decode() reproduces lm.generate for settings g; else why not (generate is used then)."""
    if g.do_sample:
        return "sampling"
    if g.no_repeat_ngram_size or g.repetition_penalty != 1.0:
        return "no_repeat_ngram_size / repetition_penalty"
    needed = ("_get_top_k_continuations", "_get_running_beams_for_next_iteration", "_update_finished_beams",
              "_check_early_stop_heuristic")
    if g.num_beams > 1 and not all(hasattr(lm, n) for n in needed):
        return "beam search with this transformers version"
    return None


def _suppressed(scores: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """scores (N, V) with the columns `ids` at -inf, as transformers' SuppressTokens processors set them."""
    if ids is None or not len(ids):
        return scores
    return scores.index_fill(-1, ids, -float("inf"))


def _step(lm, tokens: torch.Tensor, mask: torch.Tensor, cache, cache_kw: str) -> torch.Tensor:
    """One decoding step for N rows: tokens (N,) appended at the end of mask (N, S) -> next-token logits (N, V)
    in float32. Positions count the real tokens only (a left-padded prompt), as generate counts them."""
    pos = (mask.sum(-1, keepdim=True) - 1)                                                    # (N, 1)
    out = lm(inputs_embeds=lm.get_input_embeddings()(tokens[:, None]), attention_mask=mask, position_ids=pos,
             use_cache=True, **{cache_kw: cache})
    return out.logits[:, -1].float()


@functools.cache
def _cache_kwarg(lm_class) -> str:
    """The name lm.forward takes its KV cache by: `cache` (transformers 5.x), `past_key_values` before (read once
    per model class, not once per step)."""
    return "cache" if "cache" in inspect.signature(lm_class.forward).parameters else "past_key_values"


def _prefill(lm, lead: torch.Tensor, mask: torch.Tensor):
    """The lead (B, L, H) through the decoder once -> (next-token logits (B, V) float32, the KV cache)."""
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    out = lm(inputs_embeds=lead, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.cache if "cache" in out else out.past_key_values  # (transformers 5.x's name, and the older one)
    return out.logits[:, -1].float(), cache


@torch.no_grad()
def decode(lm, lead, mask, g, eos_id: int, pad_id: int, suppress=None, begin_suppress=None, stop=None):
    """-> new token ids (B, T <= g.max_new_tokens), pad_id after each caption's end of text: greedy when
    g.num_beams == 1, else beam search. suppress / begin_suppress: token ids never chosen / not chosen first;
    stop(): once True, decoding ends after the current step (serve.py's hook)."""
    def ids(tokens):
        return None if tokens is None else torch.as_tensor(list(tokens), dtype=torch.long, device=lead.device)
    # the tokens ruled out at step t: `suppress` always, `begin_suppress` first, and the end of text before
    # min_new_tokens (transformers' SuppressTokens, SuppressTokensAtBegin and MinNewTokensLength processors)
    sup, first, end = ids(suppress), ids(begin_suppress), ids([eos_id])

    def ruled_out(scores: torch.Tensor, t: int) -> torch.Tensor:
        scores = _suppressed(_suppressed(scores, sup), first if t == 0 else None)
        return _suppressed(scores, end if t < g.min_new_tokens else None)
    run = (_greedy if g.num_beams == 1 else _beams)
    return run(lm, lead, mask.long(), g, eos_id, pad_id, ruled_out, stop, _cache_kwarg(type(lm)))


def _greedy(lm, lead, mask, g, eos_id, pad_id, ruled_out, stop, cache_kw):
    max_new = g.max_new_tokens
    B = lead.shape[0]
    out = torch.full((B, max_new), pad_id, dtype=torch.long, device=lead.device)
    logits, cache = _prefill(lm, lead, mask)
    rows = torch.arange(B, device=lead.device)  # which image each live row is
    for t in range(max_new):
        nxt = ruled_out(logits, t).argmax(-1)                                                                # (N,)
        out[rows, t] = nxt
        live = nxt != eos_id
        if t == max_new - 1 or not live.any() or (stop is not None and stop()):
            return out[:, :t + 1]
        if not live.all():  # finished captions leave the batch and the cache
            keep = live.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, mask, nxt = rows[keep], mask[keep], nxt[keep]
        mask = F.pad(mask, (0, 1), value=1)
        logits = _step(lm, nxt, mask, cache, cache_kw)
    return out


class _BeamState:
    """transformers' beam-search tensors for the images still being decoded, (b, beams, ...) each."""

    def __init__(self, b: int, beams: int, max_new: int, fill: int, dev):
        self.running = torch.full((b, beams, max_new), fill, dtype=torch.long, device=dev)
        self.sequences = self.running.clone()
        self.running_scores = torch.zeros((b, beams), device=dev)
        self.running_scores[:, 1:] = NEG
        self.scores = torch.full((b, beams), NEG, device=dev)
        self.finished = torch.zeros((b, beams), dtype=torch.bool, device=dev)
        self.open = torch.ones((b, 1), dtype=torch.bool, device=dev)  # the early-stop heuristic still unsatisfied
        self.running_idx = torch.full((b, beams, max_new), -1, dtype=torch.int32, device=dev)
        self.idx = self.running_idx.clone()

    def select(self, keep: torch.Tensor) -> None:
        for name in ("running", "sequences", "running_scores", "scores", "finished", "open", "running_idx", "idx"):
            setattr(self, name, getattr(self, name)[keep])


def _beams(lm, lead, mask, g, eos_id, pad_id, ruled_out, stop, cache_kw):
    B, k, max_new = lead.shape[0], g.num_beams, g.max_new_tokens
    keep_k = 2 * k  # transformers' beams_to_keep with one end-of-text id
    top_k_mask = torch.cat([torch.ones(k, dtype=torch.bool), torch.zeros(keep_k - k, dtype=torch.bool)]).to(lead.device)
    logits, cache = _prefill(lm, lead, mask)                       # once per image, then shared by its beams
    cache.batch_repeat_interleave(k)
    logits, mask = logits.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)              # (B*k, V), (B*k, S)
    s = _BeamState(B, k, max_new, pad_id, lead.device)
    images = torch.arange(B, device=lead.device)   # which image each row of the state is
    result = torch.full((B, max_new), pad_id, dtype=torch.long, device=lead.device)
    lengths = torch.zeros(B, dtype=torch.long, device=lead.device)  # each best beam's steps, its end of text included
    for t in range(max_new):
        b = s.open.shape[0]
        logp = ruled_out(F.log_softmax(logits, -1), t)
        logp = (logp.view(b, k, -1) + s.running_scores[:, :, None]).reshape(b, -1)
        top_lp, top_seq, top_idx = lm._get_top_k_continuations(
            accumulated_log_probs=logp, running_sequences=s.running, running_beam_indices=s.running_idx, cur_len=t,
            decoder_prompt_len=0, do_sample=False, beams_to_keep=keep_k, num_beams=k, batch_size=b)
        halt = t + 1 >= max_new or (stop is not None and stop())
        hits = torch.full_like(top_lp, True, dtype=torch.bool) if halt else top_seq[:, :, t] == eos_id
        s.running, s.running_scores, s.running_idx = lm._get_running_beams_for_next_iteration(
            topk_log_probs=top_lp, topk_running_sequences=top_seq, topk_running_beam_indices=top_idx,
            next_token_hits_stopping_criteria=hits, num_beams=k)
        s.sequences, s.scores, s.idx, s.finished = lm._update_finished_beams(
            sequences=s.sequences, topk_running_sequences=top_seq, beam_scores=s.scores, topk_log_probs=top_lp,
            beam_indices=s.idx, topk_running_beam_indices=top_idx, is_early_stop_heuristic_unsatisfied=s.open,
            is_sent_finished=s.finished, next_token_hits_stopping_criteria=hits, top_num_beam_mask=top_k_mask,
            num_beams=k, cur_len=t, decoder_prompt_len=0, length_penalty=g.length_penalty, early_stopping=False)
        s.open = lm._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=s.open, running_beam_scores=s.running_scores, beam_scores=s.scores,
            is_sent_finished=s.finished, cur_len=t + 1, max_length=max_new, decoder_prompt_len=0,
            early_stopping=False, length_penalty=g.length_penalty)
        settled = ~s.open[:, 0]
        if halt or bool(hits.all()):
            settled[:] = True
        if settled.any():  # these images' captions can't change: keep their best beam, drop their rows
            result[images[settled]] = s.sequences[settled, 0]
            lengths[images[settled]] = (s.idx[settled, 0] != -1).sum(-1)
        if bool(settled.all()):
            break
        beam_idx = s.running_idx[:, :, t].reshape(-1).long()                    # rows of the cache each beam extends
        live = (~settled).nonzero().squeeze(-1)
        if not bool((~settled).all()):
            rows = (live[:, None] * k + torch.arange(k, device=lead.device)).reshape(-1)
            beam_idx = _renumber(beam_idx.view(b, k)[live], live, k)
            s.select(live)
            images = images[live]
            cache.batch_select_indices(rows)
            mask = mask.view(b, k, -1)[live].reshape(-1, mask.shape[-1])
        cache.reorder_cache(beam_idx)
        mask = F.pad(mask, (0, 1), value=1)
        logits = _step(lm, s.running[:, :, t].reshape(-1), mask, cache, cache_kw)
    return result[:, :max(int(lengths.max().item()), 1)]  # as wide as the longest caption, as generate returns


def _renumber(beam_idx: torch.Tensor, live: torch.Tensor, k: int) -> torch.Tensor:
    """Beam indices into the full (b * k) rows -> indices into the rows kept (live images only, in order)."""
    pos = torch.empty(int(live.max().item()) + 1, dtype=torch.long, device=live.device)
    pos[live] = torch.arange(len(live), device=live.device)
    return (pos[beam_idx // k] * k + beam_idx % k).reshape(-1)
