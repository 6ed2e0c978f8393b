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
step "recipes and sparsify, Brown 2^18"
SPARSIFY=${SPARSIFY_PYTHON:+--sparsify-python $SPARSIFY_PYTHON}
$SAEFLOW study recipes --preset demo --out "$HERE/recipes-brown-2p18.json" --budgets 262144 \
  $SPARSIFY --set data.train_tokens=266368 --set data.eval_tokens=32768 \
  --set train.batch_size=4096 > "$HERE/logs/recipes-brown.log" 2>&1

# 4. The frontier: budgets 2^17 ... 2^22 on the research preset's data.
step "recipes and sparsify, english 2^17 ... 2^22"
$SAEFLOW study recipes --preset research --out "$HERE/recipes-english.json" \
  --budgets 131072,262144,524288,1048576,2097152,4194304 $SPARSIFY \
  > "$HERE/logs/recipes-english.log" 2>&1

# 5. The scaling law at convergence: n in 1152 ... 9216, k in 16, 32, 64.
step "research sweep"
$SAEFLOW sweep --preset research --no-progress > "$HERE/logs/sweep.log" 2>&1

# 6. Dead latents at n = 16,384, with AuxK and without.
step "n=16384 with AuxK"
$SAEFLOW run --preset research --set sae.n_latents=16384 --no-progress > "$HERE/logs/n16384-auxk.log" 2>&1
step "n=16384 without AuxK"
$SAEFLOW run --preset research --set sae.n_latents=16384 --set sae.aux_alpha=0 --no-progress \
  > "$HERE/logs/n16384-no-auxk.log" 2>&1

# 7. The expander frontier at d = 2 against the parameter-matched dense SAE, 3 seeds.
step "frontier d=2"
$SAEFLOW frontier --preset research --no-progress > "$HERE/logs/frontier.log" 2>&1
step "done"
