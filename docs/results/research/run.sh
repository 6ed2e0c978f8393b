#!/usr/bin/env bash
# Issue 24's measurements, in order, each step's output beside this script. Every step is cached
# or resumable (the store's content addresses, the studies' saved points, the bench files), so
# re-running the script skips what is done. Hours on a 2-core CPU; run it in the background:
#   nohup docs/results/research/run.sh > docs/results/research/logs/run.log 2>&1 &
# SPARSIFY_PYTHON: a Python with eai-sparsify (see README.md here); without it sparsify is skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
HERE=docs/results/research
export HF_HUB_OFFLINE=1 SAEFLOW_HOME=${SAEFLOW_HOME:-$PWD/.saeflow}
SAEFLOW=.venv/bin/saeflow
SPARSIFY_PYTHON=${SPARSIFY_PYTHON:-}
STORE=${STORE:-$SAEFLOW_HOME/store}
mkdir -p "$HERE/bench" "$HERE/logs"
step() { echo "== $(date -u +%FT%TZ) $*"; }

# 1. Extraction speed: float32 against bfloat16 weights through the compiled forward, 3 rounds.
for i in 1 2 3; do
  for mode in float32 bfloat16-compiled; do
    out=$HERE/bench/extract-$mode-shard64-$i.json
    [ -s "$out" ] && continue
    step "bench extract $mode ($i)"
    flags="--dtype ${mode%-compiled}"
    [ "$mode" = bfloat16-compiled ] && flags="$flags --compile"
    $SAEFLOW bench extract $flags --tokens 16384 --shard-mb 64 --json > "$out.tmp" && mv "$out.tmp" "$out"
  done
done

# 2. What bfloat16 changes: the activations' error, and the demo SAE over 3 seeds in each dtype.
[ -s "$HERE/precision-demo.json" ] || {
  step "activations: bfloat16 against float32 (demo)"
  $SAEFLOW study precision --preset demo > "$HERE/precision-demo.json"
}
for dtype in float32 bfloat16; do
  step "demo SAE, model.dtype=$dtype, seeds 0-2"
  $SAEFLOW sweep --preset demo --set model.dtype=$dtype --n 4608 --k 32 --seeds 0,1,2 \
    --no-progress > "$HERE/logs/demo-$dtype.log" 2>&1
done

# 3. Quality per token at the issue's point: Brown, 262,144 tokens, one pass, B = 4096.
SPARSIFY=${SPARSIFY_PYTHON:+--sparsify-python $SPARSIFY_PYTHON}
step "recipes and sparsify, Brown 2^18"
$SAEFLOW study recipes --preset demo --out "$HERE/recipes-brown-2p18.json" --budgets 262144 \
  $SPARSIFY --set data.train_tokens=266368 --set data.eval_tokens=32768 \
  --set train.batch_size=4096 > "$HERE/logs/recipes-brown.log" 2>&1

# 4. The research activations (extracted once, then cached) and the scaling law: n in 1152 ...
#    9216, k in 16, 32, 64, tokens 2^20 x (n / 1152)^0.6.
step "research sweep"
$SAEFLOW sweep --preset research --store "$STORE" --set train.tokens=1048576 --no-progress \
  > "$HERE/logs/sweep.log" 2>&1

# 5. The frontier: budgets 2^17 ... 2^22 on the research preset's data (2^22 in one run of its own).
step "recipes and sparsify, english 2^17 ... 2^21"
ACTS=$STORE/activations/5d530e83a1bb2f40  # step 4's activations here (`saeflow ls` names them)
$SAEFLOW study recipes --preset research --activations "$ACTS" --out "$HERE/recipes-english.json" \
  --budgets 131072,262144,524288,1048576,2097152 --set train.batch_size=4096 --ce-contexts 128 \
  $SPARSIFY > "$HERE/logs/recipes-english.log" 2>&1
step "recipes and sparsify, english 2^22"
$SAEFLOW study recipes --preset research --activations "$ACTS" --out "$HERE/recipes-english-2p22.json" \
  --budgets 4194304 --set train.batch_size=4096 --ce-contexts 128 $SPARSIFY \
  > "$HERE/logs/recipes-2p22.log" 2>&1
for seed in 0 1 2; do
  step "budget recipe and sparsify at 2^20, seed $seed"
  $SAEFLOW study recipes --preset research --activations "$ACTS" --budgets 1048576 --recipes budget \
    --set train.batch_size=4096 --set train.seed=$seed --ce-contexts 128 $SPARSIFY \
    --out "$HERE/seeds-2p20/seed$seed.json" > "$HERE/logs/seeds-2p20-$seed.log" 2>&1
done

# 6. Tokens to convergence: k = 32, n in 288 ... 4608, the same 2^22 tokens each.
step "convergence sweep"
$SAEFLOW sweep --preset research --store "$STORE" --n 288,576,1152,2304,4608 --k 32 \
  --set train.tokens=4194304 --set sweep.tokens_exponent=null --no-progress \
  > "$HERE/logs/convergence.log" 2>&1

# 7. The expander frontier at d = 2 against the parameter-matched dense SAE, 3 seeds, 2^21 tokens.
step "frontier d=2"
$SAEFLOW frontier --preset research --store "$STORE" --set train.tokens=2097152 \
  --set saebench.enabled=false --no-progress > "$HERE/logs/frontier.log" 2>&1

# 8. Dead latents at n = 16,384, with AuxK and without (2^20 tokens, dead window 2^17).
for aux in 0.03125 0; do
  step "n=16384, aux_alpha=$aux"
  $SAEFLOW sweep --preset research --store "$STORE" --n 16384 --k 32 --set train.tokens=1048576 \
    --set sweep.tokens_exponent=null --set sae.aux_alpha=$aux --set sae.dead_window_tokens=131072 \
    --set saebench.enabled=false --no-progress > "$HERE/logs/n16384-aux$aux.log" 2>&1
done

# 9. train.dtype: the training step in float32 and bfloat16, 3 rounds.
for i in 1 2 3; do
  for dtype in float32 bfloat16; do
    out=$HERE/bench/train-$dtype-$i.json
    [ -s "$out" ] && continue
    step "bench train $dtype ($i)"
    $SAEFLOW bench train --dtype $dtype --steps 10 --json > "$out.tmp" && mv "$out.tmp" "$out"
  done
done
# 10. The sweep to convergence: tokens 2^21 x (n / 1152)^0.66 (the exponent step 6 measured, from
#     the 10%-per-doubling point of n = 1152 with a margin): 2.1M, 3.3M, 5.2M, 8.3M tokens; n = 9216
#     takes two epochs of the 4.23M rows. Re-extracts the research activations where the extraction
#     code has changed since step 4 (a new content address); hours on 2 cores, resumable.
step "sweep to convergence"
$SAEFLOW sweep --preset research --store "$STORE" --set train.tokens=2097152 \
  --set sweep.tokens_exponent=0.66 --no-progress > "$HERE/logs/sweep-converged.log" 2>&1
# 11. Dead latents at n = 9216, k = 16 after step 10: the same run with AuxK at 4x the paper's
#     coefficient (1/8).
step "n=9216 k=16, aux_alpha=1/8"
$SAEFLOW sweep --preset research --store "$STORE" --n 9216 --k 16 --set train.tokens=8273920 \
  --set sweep.tokens_exponent=null --set sae.aux_alpha=0.125 --set saebench.enabled=false \
  --no-progress > "$HERE/logs/n9216k16-aux0.125.log" 2>&1
step "done"
