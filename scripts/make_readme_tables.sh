#!/usr/bin/env bash
# Regenerate the README's result tables and the HTML reports from the result files in results/
# (issue 14: the README's numbers are made by `loralab report`, not typed).
#   bash scripts/make_readme_tables.sh        # from anywhere; prints the markdown to paste into the README
# Writes results/glue-minilm/report.md (the README's "Measured: seed 000's GLUE recipe on MiniLM-L6"
# table) and results/glue-minilm/report.html (the same tables with curves, Pareto plots and every run).
# PYTHON may name the interpreter that has loralab installed (default: `loralab` on PATH, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
report() {
  if [ -n "${PYTHON:-}" ]; then "$PYTHON" -m loralab report "$@";
  elif command -v loralab >/dev/null 2>&1; then loralab report "$@";
  else python3 -m loralab report "$@"; fi
}
for set in glue-minilm; do
  report "results/$set" --format html --out "results/$set"
  report "results/$set" --format md --out "results/$set"
done
cat results/glue-minilm/report.md
