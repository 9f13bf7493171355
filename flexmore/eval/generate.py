"""Greedy decoding (with a KV cache) and log-likelihoods with our model."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from flexmore.data.tokenizer import Tokenizer
from flexmore.model.config import BY_LIKELIHOOD
from flexmore.model.layers import KVCache

EVIDENCE = ("all", "context", "item")  # what a mixture routed by likelihood reads to choose its expert


@torch.no_grad()
def greedy(model, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int, device: torch.device,
           stop: Callable[[str], bool] | None = None, batch_size: int = 256, progress: str | None = None) -> list[str]:
    """The greedy continuation of each prompt, cut at EOS, at ``stop(text)`` or after ``max_new_tokens``.

    Prompts are left-padded into batches with an attention mask; RoPE is relative, so each row's logits are the
    ones it would get alone (tested). Prompts are sorted by length first, so a batch wastes little on padding.
    """
    model.eval()
    out: list[str | None] = [None] * len(prompts)
    encoded = [tokenizer.encode(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad = getattr(tokenizer, "pad_id", None)
    pad = tokenizer.eos_id if pad is None else pad
    limit = model.cfg.max_seq_len
    bar = progress_bar(progress, len(prompts))
    for b0 in range(0, len(order), batch_size):
        chunk = order[b0 : b0 + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        x = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in chunk], device=device)
        valid = torch.tensor([[False] * (width - len(encoded[i])) + [True] * len(encoded[i]) for i in chunk],
                             device=device)
        gen: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        cache, step_in = KVCache(model.cfg.n_layers), x  # the prompt once, then one token per step
        for _ in range(max_new_tokens):
            if valid.shape[1] >= limit:
                break
            nxt = model(step_in, attention_mask=valid, cache=cache).logits[:, -1].argmax(-1)
            step_in = nxt[:, None]
            valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
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
        bar.update(len(chunk))
    bar.close()
    return out  # type: ignore[return-value]


@torch.no_grad()
def continuation_logprobs(model, tokenizer: Tokenizer, context: str, continuations: Sequence[str],
                          device: torch.device, evidence: str = "all") -> list[tuple[float, int]]:
    """(sum of log p(continuation tokens | context), number of tokens) for each continuation."""
    return request_logprobs(model, tokenizer, [(context, c) for c in continuations], device, evidence=evidence)


@torch.no_grad()
def request_logprobs(model, tokenizer: Tokenizer, requests: Sequence[tuple[str, str]], device: torch.device,
                     batch_size: int = 512, progress: str | None = None,
                     evidence: str = "all") -> list[tuple[float, int]]:
    """(sum of log p(continuation | context), number of continuation tokens) for each (context, continuation) pair.

    Pairs are right-padded into batches: the model is causal, so padding after a sequence leaves its logits as they
    are alone (tested). A sequence longer than the model's context keeps its last max_seq_len + 1 tokens.
    ``evidence="context"``: a mixture routed by likelihood chooses its expert from the context alone, as when choices
    are compared (each choice's own tokens would otherwise pick the expert that likes them best); "all": every token;
    "item": the requests that share a context are one item (a question and its choices), and the mixture scores all
    of them with one two-expert model, the one that gives the context and every continuation together the highest
    likelihood (ties: the lowest expert; posterior: the models weighted by softmax of that likelihood), so no choice
    picks its own scorer and the choices' words count as evidence.
    """
    if evidence not in EVIDENCE:
        raise ValueError(f"evidence={evidence!r}: one of {', '.join(EVIDENCE)}")
    rule = getattr(getattr(model, "cfg", None), "route_context", None) in BY_LIKELIHOOD
    by_context, by_item = rule and evidence == "context", rule and evidence == "item" and model.cfg.is_moe
    model.eval()
    out: list[tuple[float, int]] = [(0.0, 0)] * len(requests)
    seqs = []
    for i, (context, cont) in enumerate(requests):
        ids = tokenizer.encode(cont)
        if ids:  # an empty context conditions on a document boundary
            x = ((tokenizer.encode(context) or [tokenizer.eos_id]) + ids)[-model.cfg.max_seq_len - 1:]
            seqs.append((i, x, min(len(ids), len(x) - 1), max(0, len(x) - len(ids))))  # ..., context tokens kept
    seqs.sort(key=lambda s: len(s[1]))
    pairs: dict[int, tuple] = {}  # evidence="item": request -> per pair (context, continuation), tokens
    bar = progress_bar(progress, len(seqs))
    for b0 in range(0, len(seqs), batch_size):
        chunk = seqs[b0 : b0 + batch_size]
        width = max(len(x) for _, x, _, _ in chunk)
        x = torch.tensor([x + [tokenizer.eos_id] * (width - len(x)) for _, x, _, _ in chunk], device=device)
        kw = {}
        if by_context:
            kw["route_evidence"] = torch.arange(width - 1, device=device) < torch.tensor([c for *_, c in chunk],
                                                                                           device=device)[:, None]
        if by_item:  # (pairs, rows, positions): log p of each next token under each two-expert model
            nxt = x[None, :, 1:, None].expand(model.cfg.num_experts - 1, -1, -1, 1)
            tok = model.pair_logprobs(x[:, :-1]).gather(-1, nxt).squeeze(-1)
            for row, (i, ids, n, c) in enumerate(chunk):
                cont = tok[:, row, len(ids) - 1 - n : len(ids) - 1].sum(-1)
                pairs[i] = (tok[:, row, : max(c - 1, 0)].sum(-1), cont, n)  # c = 0: truncation kept no context
            bar.update(len(chunk))
            continue
        logp = torch.log_softmax(model(x[:, :-1], **kw).logits.float(), -1)
        for row, (i, ids, n, _) in enumerate(chunk):
            pos = torch.arange(len(ids) - 1 - n, len(ids) - 1, device=device)
            out[i] = (float(logp[row, pos, x[row, pos + 1]].sum()), n)
        bar.update(len(chunk))
    bar.close()
    if by_item:
        items: dict[str, list[int]] = {}
        for i in pairs:
            items.setdefault(requests[i][0], []).append(i)
        posterior = model.cfg.route_context == "posterior"
        for members in items.values():  # the item's evidence: its context once, and every continuation
            score = pairs[members[0]][0] + sum(pairs[i][1] for i in members)
            for i in members:  # likelihood: the best pair's; posterior: the pairs' mixture weighted by softmax(score)
                lp = torch.logsumexp(pairs[i][1] + torch.log_softmax(score, 0), 0) if posterior else \
                    pairs[i][1][int(score.argmax())]
                out[i] = (float(lp), pairs[i][2])
    return out


def progress_bar(desc: str | None, total: int):
    """A progress bar (items/s, ETA) on stderr, from rank 0 only; a silent stand-in when ``desc`` is None."""
    from tqdm.auto import tqdm

    silent = desc is None or (dist.is_initialized() and dist.get_rank() != 0)
    return tqdm(total=total, desc=desc, unit="item", disable=silent, mininterval=2.0, dynamic_ncols=True)
