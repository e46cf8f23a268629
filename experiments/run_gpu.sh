#!/usr/bin/env bash
# Every experiment at --scale gpu on one H200, arms in parallel processes; what comes back in $OUT:
#   run_gpu.log                      this run's output (per-job logs are in the tarball)
#   experiments-results.tar.gz       results/<experiment>/{results.md,summary.json,*.png,runs/,routing/}
#                                    and results/logs/, without the HTML routing reports
#   experiments-reports.tar.gz       the HTML routing reports (PNGs embedded), when under 15 MiB
#   <experiment>.md                  each experiment's table, readable without unpacking
# Environment: PYTHON (default python3), PARALLEL (8), BUDGET (1.0: multiplies every step count),
# DEADLINE (480 s: then running arms are stopped, the reports still written from what finished),
# ONLY (a job-name regular expression: those jobs, what they need and the reports; earlier
# results under $WORK/results stay), EXPERIMENTS (all; a comma-separated subset such as `mole,mocle`: one call under 10 minutes each),
# WORK (/tmp/vlmoe-experiments/<scale>), SCALE (gpu; `SCALE=smoke PARALLEL=2` checks the script on a
# CPU in a minute). Run from anywhere: it changes to the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that comes back}
PYTHON=${PYTHON:-python3}
SCALE=${SCALE:-gpu}
WORK=${WORK:-/tmp/vlmoe-experiments/$SCALE}
RESULTS="$WORK/results"
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/run_gpu.log") 2>&1
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
date -u +"start %FT%TZ"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
"$PYTHON" -m experiments.run_all --scale "$SCALE" --work "$WORK" --results "$RESULTS" \
  --parallel "${PARALLEL:-8}" --budget "${BUDGET:-1.0}" --workers "$(nproc)" \
  --deadline "${DEADLINE:-480}" ${EXPERIMENTS:+--experiments "$EXPERIMENTS"} ${ONLY:+--only "$ONLY"} || status=$?
date -u +"end %FT%TZ (exit $status)"
tar -czf "$OUT/experiments-results.tar.gz" -C "$WORK" --exclude='*.html' --exclude='*.npz' results
if [ -d "$RESULTS" ]; then
  (cd "$WORK" && find results -name '*.html' -print0 | tar -czf "$OUT/experiments-reports.tar.gz" --null -T -)
  if [ "$(stat -c %s "$OUT/experiments-reports.tar.gz")" -gt $((15 * 1024 * 1024)) ]; then
    rm "$OUT/experiments-reports.tar.gz"; echo "HTML reports over 15 MiB: left out" | tee -a "$OUT/run_gpu.log"
  fi
  for md in "$RESULTS"/*/results.md; do cp "$md" "$OUT/$(basename "$(dirname "$md")").md"; done
fi
exit $status
