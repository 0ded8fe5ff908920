"""The README's evaluation-speed tables, generated from the files in results/eval-bench/.

    python scripts/eval_bench_table.py [results/eval-bench]

Prints (1) the bench table (engine vs transformers' best batched generate vs generate_batch) of the
H200 run, as ``loralab bench --eval`` printed it, (2) the whole-task evaluations with their wall
times, and (3) a goal check, each sentence computed from the files.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from loralab.bench.generation_table import table
from loralab.tasks.eval_output import task_metrics

root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/eval-bench")


def done_in(log: Path) -> int | None:
    """Wall seconds of a ``loralab eval`` run (its "done in Ns" line: loading, generation, scoring)."""
    match = re.search(r"done in (\d+)s", log.read_text()) if log.exists() else None
    return int(match.group(1)) if match else None


bench = json.loads((root / "h200-bench8b.json").read_text())
print(table(bench))
rows = {r["row"]: r for r in bench["rows"]}
engine = rows["engine"]
peers = [r for name, r in rows.items() if name != "engine" and r.get("tokens_per_s")]
best = max(peers, key=lambda r: r["tokens_per_s"])
ratio = engine["tokens_per_s"] / best["tokens_per_s"]

print("\n| evaluation (8B shape, LoRA r32 adapter, bf16, engine) | prompts | new-token budget | wall time incl. load + score | generation s |")
print("|---|--:|--:|--:|--:|")
gsm8k = json.loads((root / "h200-gsm8k-1024.json").read_text())["gsm8k"]
gsm8k_wall = done_in(root / "h200-gsm8k-1024.log")
print(f"| GSM8K test, 1,024-token budgets (seed 000's), CorDA prompt, its stop strings | {gsm8k['n']:,} | {gsm8k['generation']['max_new_tokens']:,} | {gsm8k_wall} s | "
      f"{gsm8k['seconds']['generate']:.1f} |")
commonsense = task_metrics(json.loads((root / "h200-commonsense.json").read_text()))  # without meta_info
cs_n = sum(v["n"] for v in commonsense.values())
cs_wall = done_in(root / "h200-commonsense.log")
cs_generate = sum(v["seconds"]["generate"] for v in commonsense.values())
print(f"| {len(commonsense)} commonsense test sets ({', '.join(commonsense)}), greedy | {cs_n:,} | "
      f"{next(iter(commonsense.values()))['generation']['max_new_tokens']} | {cs_wall} s | {cs_generate:.1f} |")

print(f"\nGoal check: engine {engine['tokens_per_s']:,.0f} new tokens/s on {engine['prompts']:,} prompts x "
      f"{bench['workload']['max_new_tokens']} (goal >= 10,000: {'met' if engine['tokens_per_s'] >= 10_000 else 'NOT met'}), "
      f"{ratio:.1f}x the best transformers path ({best['row']}, {best['tokens_per_s']:,.0f}; goal >= 7x: "
      f"{'met' if ratio >= 7 else 'NOT met'}); GSM8K at 1,024 tokens in {gsm8k_wall} s (goal <= 180: "
      f"{'met' if gsm8k_wall is not None and gsm8k_wall <= 180 else 'NOT met'}); {cs_n:,} of the 22,419 commonsense "
      f"prompts in {cs_wall} s (the goal's 180 s is for all eight sets; hellaswag's file is not in this project's data).")

cpu = root / "cpu-smollm2.json"
if cpu.exists():
    report = json.loads(cpu.read_text())
    rows = {r["row"]: r for r in report["rows"]}
    work = report["workload"]
    print(f"\nOn this project's 2-core CPU (shared with other jobs), SmolLM2-135M-Instruct (real weights, fp32, LoRA r32 "
          f"with B = 0), {work['prompts']} GSM8K prompts, budget {work['max_new_tokens']} with the source's stop strings "
          f"and EOS: engine {rows['engine']['new_tokens']:,} new tokens in {rows['engine']['seconds']:.0f} s "
          f"({rows['engine']['tokens_per_s']:.1f}/s), transformers generate (best batch {rows['transformers']['batch_size']}) "
          f"{rows['transformers']['new_tokens']:,} in {rows['transformers']['seconds']:.0f} s "
          f"({rows['transformers']['tokens_per_s']:.1f}/s): {rows['engine']['tokens_per_s'] / rows['transformers']['tokens_per_s']:.2f}x, "
          f"so `auto` picks the engine on the CPU too.")
