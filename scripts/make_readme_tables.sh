#!/usr/bin/env bash
# Regenerate the README's result tables and the HTML reports from the result files in results/
# (issue 14: the README's numbers are made by `loralab report`, not typed).
#   bash scripts/make_readme_tables.sh        # from anywhere; prints the markdown to paste into the README
# Writes report.md (the README's tables), report.html (the same tables with curves, Pareto plots,
# cost and every run) and report.csv into each results folder below.
# PYTHON may name the interpreter that has loralab installed (default: `loralab` on PATH, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
report() {
  if [ -n "${PYTHON:-}" ]; then "$PYTHON" -m loralab report "$@";
  elif command -v loralab >/dev/null 2>&1; then loralab report "$@";
  else python3 -m loralab report "$@"; fi
}
SETS="glue-minilm glue-minilm-seeds svd-family/seed000-lr svd-family/tuned svd-family/sweep lorafa-svd-minilm"
for set in $SETS; do
  for format in html md csv; do report "results/$set" --format $format --out "results/$set"; done
done
for set in $SETS; do echo "## results/$set"; cat "results/$set/report.md"; done
