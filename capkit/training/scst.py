"""
Self-critical sequence training (Rennie et al. 2017), the fine-tuning after cross-entropy: the captioner samples
captions, each is scored by a reward (CIDEr-D, capkit.evaluation.metrics.CiderD with the training captions' IDF),
and the log-probability of a sample is raised in proportion to how much it beats the model's own greedy caption of
the same image (the baseline). Samples that score below the greedy caption are pushed down: the loss has no
fixed sign, and with every sample equal to the baseline it is 0.

    loss, stats = scst_loss(model, image_embeds, references, reward, samples=5, max_new_tokens=30)

reward(captions, references, ended) -> (N,) scores; train.py passes CiderD(training captions).scores. Decoding and
the forward pass run with the captioner in eval mode (no dropout, retrieval's nearest neighbours): the sampled
caption's log-probability is then that of the model that sampled it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SCST_BOUNDS = {"scst_samples": (1, 16)}  # sampled captions per image per step (inclusive)
# what a sample's reward is measured against: "greedy", the model's own greedy caption (Rennie et al. 2017); "mean",
# the mean reward of the image's other samples (Luo 2020, "a better variant of SCST"; needs scst_samples >= 2)
SCST_BASELINES = ("greedy", "mean")


def through_end(ids: torch.Tensor, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated ids (N, T), padded after their end token -> (mask (N, T): 1 up to and including the first end
    token, or everywhere when there is none; ended (N,) bool: the caption wrote its end token)."""
    is_end = ids == eos
    ended = is_end.any(1)
    first = torch.where(ended, is_end.float().argmax(1), torch.full_like(ended, ids.shape[1], dtype=torch.long))
    mask = (torch.arange(ids.shape[1], device=ids.device)[None] <= first[:, None]).long()
    return mask, ended


def scst_loss(model, image_embeds: torch.Tensor, references: list[list[str]], reward, samples: int = 5,
              max_new_tokens: int = 30, baseline: str = "greedy") -> tuple[torch.Tensor, dict]:
    """One self-critical step's loss for a batch of images: image_embeds (B, ...), references: each image's
    captions. -> (loss, {"reward": the samples' mean reward, "baseline": the greedy captions' mean reward})."""
    if baseline not in SCST_BASELINES or (baseline == "mean" and samples < 2):
        raise ValueError(f"scst baseline {baseline!r} with {samples} samples: 'greedy', or 'mean' with 2 or more")
    tok, eos = model.tokenizer, model.tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            greedy = model.generate_ids(image_embeds=image_embeds, max_new_tokens=max_new_tokens)      # (B, t)
            many = image_embeds.repeat_interleave(samples, 0)                                          # (B*S, ...)
            sampled = model.generate_ids(image_embeds=many, max_new_tokens=max_new_tokens, do_sample=True)  # (B*S, t')
        refs = [r for r in references for _ in range(samples)]
        _, greedy_ended = through_end(greedy, eos)
        mask, ended = through_end(sampled, eos)
        base = reward(tok.batch_decode(greedy, skip_special_tokens=True), references, greedy_ended.tolist())  # (B,)
        got = reward(tok.batch_decode(sampled, skip_special_tokens=True), refs, ended.tolist())              # (B*S,)
        if baseline == "mean":  # each sample against the mean of its image's other samples
            per = np.asarray(got).reshape(-1, samples)                                                   # (B, S)
            against = ((per.sum(1, keepdims=True) - per) / (samples - 1)).reshape(-1)
        else:
            against = np.repeat(base, samples)
        advantage = torch.as_tensor(np.asarray(got) - against, dtype=torch.float32, device=model.device)  # (B*S,)
        ids = sampled.masked_fill(mask == 0, tok.pad_token_id)
        logits, _ = model(ids, mask, image_embeds=many)                                                   # (B*S, t', V)
        logp = F.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)                   # (B*S, t')
        loss = -(advantage[:, None] * logp * mask).sum() / mask.sum()
    finally:
        model.train(was_training)
    return loss, {"reward": float(got.mean()), "baseline": float(base.mean())}
