"""Our model as an lm-evaluation-harness ``LM`` (only when lm-eval is installed and its task data is local).

    pip install lm-eval            # not a dependency of this package (it is of the tests)
    python -m flexmore.eval.lm_eval_adapter --model flexmore --model_args path=outputs/merged,tokenizer=byte \\
        --tasks <your task> --include_path <folder of your task YAMLs>     # lm_eval's CLI, 'flexmore' registered

Implements ``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until`` with this package's own scoring code
(no batching across requests; fine for the small models evaluated here).
"""

from __future__ import annotations

import torch

from flexmore.data.tokenizer import load_tokenizer
from flexmore.eval.generate import continuation_logprobs, greedy, request_logprobs
from flexmore.store.modeldir import load_model

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - optional
    raise ImportError("flexmore.eval.lm_eval_adapter needs lm-eval: pip install lm-eval") from e


@register_model("flexmore")
class FlexmoreLM(LM):
    def __init__(self, path: str, tokenizer: str = "byte", device: str = "auto", **_):
        super().__init__()
        self.dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                ("cpu" if device == "auto" else device))
        self.model = load_model(path, device=self.dev).eval()
        self.tok = load_tokenizer(tokenizer)

    def loglikelihood(self, requests):
        """A mixture routed by likelihood scores the requests that share a context (a question's choices) with the
        two-expert model that fits them all best, as our own multiple-choice scoring (``evidence="item"``)."""
        out = []
        scored = request_logprobs(self.model, self.tok, [req.args for req in requests], self.dev, evidence="item")
        for req, (lp, _) in zip(requests, scored):
            context, continuation = req.args
            ctx_ids = self.tok.encode(context)
            ids = self.tok.encode(continuation)
            with torch.no_grad():
                x = torch.tensor([ctx_ids + ids], device=self.dev)
                evidence = torch.arange(x.shape[1] - 1, device=self.dev)[None] < len(ctx_ids)
                logits = self.model(x[:, :-1], route_evidence=evidence).logits  # is_greedy: as generation routes
                greedy_ids = logits[0, -len(ids):].argmax(-1).tolist() if ids else []
            out.append((lp, greedy_ids == ids))
        return out

    def loglikelihood_rolling(self, requests):
        out = []
        for req in requests:
            (text,) = req.args
            (lp, _), = continuation_logprobs(self.model, self.tok, "", [text], self.dev)
            out.append(lp)
        return out

    def generate_until(self, requests):
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until", []) or []
            text, = greedy(self.model, self.tok, [context], kwargs.get("max_gen_toks", 64), self.dev,
                           stop=lambda t: any(u in t for u in until))
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


if __name__ == "__main__":  # lm-eval's own command line, with the model name 'flexmore' registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
