#!/bin/bash
# Step time, samples/s and tokens/s of a training log, read from Megatron's iteration lines the way
# MindSpeed-MM's scripts read them (iterations 51-150 of the log, or all there are).
# Usage: bash examples/report_throughput.sh LOG [GLOBAL_BATCH_SIZE]   (default: consumed samples / iteration)
set -euo pipefail
log=$1
lines() { grep "$1" "$log" | head -n 150 | tail -n 100; }
step_ms=$(lines "elapsed time per iteration" | sed 's/.*elapsed time per iteration (ms): *\([0-9.]*\).*/\1/' |
  awk '{total += $1} END {if (NR) printf("%.1f", total / NR)}')
gbs=${2:-$(grep "consumed samples:" "$log" | tail -n 1 |
  sed 's/.*iteration *\([0-9]*\)\/.*consumed samples: *\([0-9]*\).*/\2 \1/' | awk '{printf("%.2f", $1 / $2)}')}
samples=$(awk -v gbs="$gbs" -v ms="$step_ms" 'BEGIN {printf("%.3f", gbs * 1000 / ms)}')
echo "step time (ms): $step_ms"
echo "global batch size: $gbs"
echo "samples per second: $samples"
if grep -q "tokens per sample" "$log"; then
  tokens=$(lines "tokens per sample" | sed 's/.*tokens per sample: *\([0-9.E+-]*\).*/\1/' |
    awk '{total += $1} END {if (NR) printf("%.1f", total / NR)}')
  echo "tokens per sample: $tokens"
  echo "tokens per second: $(awk -v s="$samples" -v t="$tokens" 'BEGIN {printf("%.3f", s * t)}')"
fi
