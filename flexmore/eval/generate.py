"""Greedy decoding and log-likelihoods with our model (no KV cache: the models evaluated here are small).

Prompts are batched by token length, so no padding (and no attention mask) is ever needed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import torch

from flexmore.data.tokenizer import Tokenizer


@torch.no_grad()
def greedy(model, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int, device: torch.device,
           stop: Callable[[str], bool] | None = None, batch_size: int = 32) -> list[str]:
    """The greedy continuation of each prompt, cut at EOS, at ``stop(text)`` or after ``max_new_tokens``."""
    model.eval()
    out: list[str | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = defaultdict(list)
    encoded = [tokenizer.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    limit = model.cfg.max_seq_len
    for length, idxs in sorted(by_len.items()):
        for b0 in range(0, len(idxs), batch_size):
            chunk = idxs[b0 : b0 + batch_size]
            x = torch.tensor([encoded[i] for i in chunk], device=device)
            gen = [[] for _ in chunk]
            done = [False] * len(chunk)
            for _ in range(max_new_tokens):
                if x.shape[1] >= limit:
                    break
                nxt = model(x).logits[:, -1].argmax(-1)
                x = torch.cat([x, nxt[:, None]], dim=1)
                for j, t in enumerate(nxt.tolist()):
                    if done[j]:
                        continue
                    if t == tokenizer.eos_id:
                        done[j] = True
                        continue
                    gen[j].append(t)
                    if stop is not None and stop(tokenizer.decode(gen[j])):
                        done[j] = True
                if all(done):
                    break
            for j, i in enumerate(chunk):
                out[i] = tokenizer.decode(gen[j])
    return out  # type: ignore[return-value]


@torch.no_grad()
def continuation_logprobs(model, tokenizer: Tokenizer, context: str, continuations: Sequence[str],
                          device: torch.device) -> list[tuple[float, int]]:
    """(sum of log p(continuation tokens | context), number of tokens) for each continuation."""
    model.eval()
    ctx = tokenizer.encode(context) or [tokenizer.eos_id]  # an empty context: condition on a document boundary
    res = []
    for cont in continuations:
        ids = tokenizer.encode(cont)
        if not ids:
            res.append((0.0, 0))
            continue
        x = torch.tensor([ctx + ids], device=device)[:, -model.cfg.max_seq_len - 1 :]
        logp = torch.log_softmax(model(x[:, :-1]).logits.float(), -1)
        tgt = x[0, 1:]
        picked = logp[0, torch.arange(tgt.numel(), device=device), tgt][-len(ids) :]
        res.append((float(picked.sum()), len(ids)))
    return res
