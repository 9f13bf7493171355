#!/usr/bin/env bash
# Every GPU measurement of benchmarks/README.md in one resumable command, for a lent GPU with a time limit per call:
# steps already done (outputs/gpu/<step>.done, kept on a warm machine) are skipped, each step gets what is left of
# BUDGET seconds, and the results are copied to $OUT (default outputs/gpu-results).
#   BUDGET=560 benchmarks/run_all_gpu.sh                   # again on the same machine to go on
#   SKIP="kernels optstep" benchmarks/run_all_gpu.sh       # a fresh machine: steps done on an earlier one
# Without an installed package (a bare image): put hydra-core, omegaconf and antlr4 wheels in .whl/ and PYTHONPATH is
# set to them and the clone; the console scripts the study calls are then shimmed.
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-560}
DEADLINE=$((SECONDS + BUDGET))
OUT=${OUT:-outputs/gpu-results}
mkdir -p "$OUT" outputs/gpu
export FLEXMORE_CACHE=${FLEXMORE_CACHE:-$PWD/outputs/cache}
if ! command -v flexmore-train > /dev/null; then
  [ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  mkdir -p /tmp/bin
  for c in train sweep; do printf '#!/bin/sh\nexec python3 -m flexmore.cli.%s "$@"\n' $c > /tmp/bin/flexmore-$c; chmod +x /tmp/bin/flexmore-$c; done
  export PATH=/tmp/bin:$PATH
fi
G=outputs/gpu
for s in $SKIP; do touch $G/$s.done; done  # a fresh machine: steps already run on an earlier one
{ nvidia-smi --query-gpu=name,driver_version --format=csv; python3 -c "import torch,triton;print(torch.__version__,triton.__version__)"; date; } > $G/env.txt
step() {  # name, command...: skip when done, else run within what is left of the deadline
  local name=$1; shift
  [ -e $G/$name.done ] && { echo "== $name: done before"; return; }
  local left=$((DEADLINE - SECONDS))
  [ $left -lt 20 ] && { echo "== $name: no time left"; return; }
  echo "== $name (up to ${left}s)"
  if timeout $left "$@" > $G/$name.txt 2>&1; then touch $G/$name.done; echo "== $name ok"; else echo "== $name FAILED/TIMEOUT rc=$?"; fi
  tail -5 $G/$name.txt
}
step tests python3 -m pytest -q -rs tests/test_flexdemo_kernels.py
step kernels python3 benchmarks/bench_flexdemo_kernels.py --out $G/kernels.json
NCU="ncu --clock-control none -s 2 -c 1 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats"
step profile sh -c "$NCU -k regex:_encode_kernel python3 benchmarks/profile_kernels.py; $NCU -k regex:_decode_kernel python3 benchmarks/profile_kernels.py"
step optstep python3 benchmarks/bench_optimizer_step.py --model base 1b --kernel-choice $G/kernels.json --out $G/optstep.json \
  --profile $G/optstep_profile
step e2e python3 benchmarks/check_triton_e2e.py --out $G/e2e.json
step experts python3 benchmarks/bench_experts.py --size small --out $G/experts.json
step study env SIZE=small PARALLEL=1 SHARDS=${SHARDS:-3} OUT=outputs/study bash launch/study.sh
step slow_link python3 benchmarks/bench_slow_link.py --model base --links uncapped 10 1 --out $G/slow_link
tar czf $G/study.tgz --exclude=checkpoints --exclude=expert --exclude=lowrank --exclude=model --exclude=base-model \
  outputs/study 2>/dev/null
cat $G/*.txt > $OUT/logs.txt 2>/dev/null
cp $G/env.txt $OUT/
[ -e $G/profile.txt ] && cp $G/profile.txt $OUT/
for f in kernels optstep e2e experts; do [ -e $G/$f.json ] && cp $G/$f.json $OUT/; done
[ -e $G/study.tgz ] && cp $G/study.tgz $OUT/
[ -d $G/slow_link ] && cp -r $G/slow_link $OUT/
[ -d $G/optstep_profile ] && cp -r $G/optstep_profile $OUT/
ls $G
