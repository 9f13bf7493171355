"""`flexmore-merge`: a public base + expert artifacts -> one FlexMoRE model folder (or opt experts out of one)."""

from __future__ import annotations

import argparse
import sys

from flexmore.cli import TRUST_HELP
from flexmore.experts.hf import export_hf, export_olmo2
from flexmore.experts.merge import merge, opt_out, reroute
from flexmore.model import count_params
from flexmore.model.config import ROUTE_CONTEXTS
from flexmore.store.modeldir import load_model, save_model_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flexmore-merge", description=__doc__)
    ap.add_argument("--base", help="the public base: checkpoint, run folder or model folder")
    ap.add_argument("--experts", nargs="*", default=[], help="expert artifact folders (full or low-rank, any ranks)")
    ap.add_argument("--merged", help="instead of --base/--experts: an already merged model folder")
    ap.add_argument("--drop", nargs="*", default=[], help="names of experts to opt out")
    ap.add_argument("--top-k", type=int, default=None, help="experts per token (default: all)")
    ap.add_argument("--renormalize", action="store_true", help="top-k weights renormalised to sum to 1")
    ap.add_argument("--route-context", choices=ROUTE_CONTEXTS, default=None,
                    help="token: each token by its own router (FlexOlmo, the default); prefix / sequence: the public "
                         "expert and the one its sequence so far prefers, per layer / over all layers (two passes); "
                         "likelihood / posterior: every expert's two-expert model, each token from the one that "
                         "predicted its sequence so far best / their posterior mixture (E - 1 passes; the smallest "
                         "opt-out change measured); none but token has a transformers export")
    ap.add_argument("--out", required=True, help="output model folder")
    ap.add_argument("--hf", action="store_true", help="write transformers' format instead: FlexOlmo, or OLMo 2 for a dense model")
    ap.add_argument("--hf-bias", choices=["error", "drop"], default="error",
                    help="transformers' FlexOlmo has no expert bias: refuse a model with one (error), or write it "
                         "without it (drop: a different routing; evaluate it)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    args = ap.parse_args(argv)
    try:
        if args.top_k is not None and args.top_k < 1:
            raise ValueError(f"--top-k={args.top_k} must be >= 1")
        if args.merged:
            model = load_model(args.merged, trust_checkpoint=args.trust_checkpoint)
        elif args.base and args.experts:
            model = merge(args.base, args.experts, top_k=args.top_k, trust_checkpoint=args.trust_checkpoint)
        else:
            raise ValueError("give --base and --experts, or --merged")
        if args.drop:
            model = opt_out(model, args.drop)
        if args.renormalize or args.route_context:
            model = reroute(model, renormalize=args.renormalize or None, context=args.route_context)
        if args.hf and model.cfg.num_experts == 1:  # a dense model: transformers' OLMo 2
            out = export_olmo2(model, args.out, overwrite=args.overwrite)
            print("a dense model: written as transformers' Olmo2ForCausalLM")
        elif args.hf:
            out = export_hf(model, args.out, overwrite=args.overwrite, bias=args.hf_bias)
        else:
            out = save_model_dir(model, args.out, overwrite=args.overwrite,  # experts train at the base's length
                                 trained_from=args.merged or args.base)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"flexmore-merge: error: {e}", file=sys.stderr)
        return 2
    c = count_params(model)
    routing = "" if model.cfg.route_context == "token" else f", routed by {model.cfg.route_context}"
    print(f"wrote {out}: experts {model.cfg.expert_names or ['public']}, top-k {model.cfg.top_k}{routing}; "
          f"{c.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
