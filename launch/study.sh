#!/usr/bin/env bash
# The FlexMoRE study end to end on the embedded data, from nothing: a public base, full experts for math, facts and
# code (each trained alone against the frozen base, with public negatives and the routing loss), the rank sweep (every
# mixture of several experts routed by posterior as the README workflow does, each pair with its owner's own router;
# ROUTE=token for FlexOlmo's rule, whose mixtures get their router tuned first, TUNE_STEPS) and the report (table,
# plots, summary).
#   SIZE=small PARALLEL=1 SHARDS=3 launch/study.sh   # one GPU (~16 minutes on an H200), results in $OUT (default outputs/study)
#   SIZE=tiny  launch/study.sh      # CPU, a few minutes: the pipeline at toy scale
# Any variable below can be overridden from the environment (e.g. BASE_STEPS=500). Re-running resumes: finished
# training runs and sweep cells are not recomputed.
# PARALLEL=1 trains the three experts at once, SHARDS=N runs the sweep in N processes (a GPU with room for them).
# REFIT_STEPS=N: each owner re-fits its compressed expert's router row N steps (flexmore-sweep --refit-steps; default
# 200, 0 keeps the rows trained beside the full expert).
set -euo pipefail
source "$(dirname "$0")/python.sh"
SIZE=${SIZE:-small}
OUT=${OUT:-outputs/study}
if [ "$SIZE" = tiny ]; then
  : "${MODEL:=tiny}" "${BASE_STEPS:=150}" "${EXPERT_STEPS:=60}" "${SEQ:=64}" "${MB:=8}" "${CHARS:=400000}"
  : "${N:=8}" "${MAXEXP:=5}" "${VALB:=2}" "${COMPILE:=false}" "${TUNED:=100}"
else
  : "${MODEL:=small}" "${BASE_STEPS:=2000}" "${EXPERT_STEPS:=600}" "${SEQ:=512}" "${MB:=32}" "${CHARS:=32000000}"
  : "${N:=500}" "${MAXEXP:=8}" "${VALB:=8}" "${COMPILE:=false}"  # compiling 4 runs costs more than it saves
  : "${TUNED:=200}"
fi
ROUTE=${ROUTE:-posterior}
case "$ROUTE" in  # routed by likelihood or posterior, each pair is its owner's two-expert model as trained: nothing to tune
  likelihood|posterior) : "${TUNE_STEPS:=0}" ;;
  *) : "${TUNE_STEPS:=$TUNED}" ;;
esac
COMMON="train.seq_len=$SEQ train.micro_batch=$MB train.compile=$COMPILE train.eval_every=0 train.progress=false \
logging.mode=${WANDB_MODE:-disabled} data.train_chars=$CHARS train.save_every=${SAVE_EVERY:-500}"  # a cut run resumes
"$PY" -m flexmore.cli.train model="$MODEL" train.steps="$BASE_STEPS" optim.lr=1e-3 $COMMON hydra.run.dir="$OUT/base"
expert() {
  "$PY" -m flexmore.cli.train experiment=expert expert.base="$OUT/base" expert.name="$1" "data.domains=[$1]" \
    "data.val_domains=[$1]" train.steps="$EXPERT_STEPS" $COMMON hydra.run.dir="$OUT/$1"
}
if [ "${PARALLEL:-0}" = 1 ]; then
  pids=()
  for domain in math facts code; do expert "$domain" > "$OUT/expert-$domain.log" 2>&1 & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid" || { echo "an expert's training failed: see $OUT/expert-*.log" >&2; exit 1; }; done
else
  for domain in math facts code; do expert "$domain"; done
fi
sweep() {
  "$PY" -u -m flexmore.cli.sweep --base "$OUT/base/model" --experts "$OUT/math/expert" "$OUT/facts/expert" "$OUT/code/expert" \
    --max-rank-exp "$MAXEXP" --n "$N" --val-batches "$VALB" --seq-len "$SEQ" --tune-steps "$TUNE_STEPS" \
    --val-domains public code math facts --route-context "$ROUTE" \
    --refit-steps "${REFIT_STEPS:-200}" --out "$OUT/sweep" "$@"
}
if [ "${SHARDS:-1}" -gt 1 ]; then  # SHARDS=N: N sweep processes share the GPU, then one pass adds design (c)
  pids=()
  # CPU threads split between the shards: N processes of all-core OpenMP (the SVDs of extraction) thrash each other
  threads=$(( $(nproc) / SHARDS )); [ "$threads" -ge 1 ] || threads=1
  for ((i = 0; i < SHARDS; i++)); do
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads} sweep --shard "$i/$SHARDS" > "$OUT/sweep-$i.log" 2>&1 & pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || { echo "a sweep shard failed: see $OUT/sweep-*.log" >&2; exit 1; }; done
fi
sweep ${PARAM_BUDGET:+--budget $PARAM_BUDGET}
