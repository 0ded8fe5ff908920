"""Issue 23's table from the files ``scripts/gpu_two_gpus.sh`` writes (see its header).

    python scripts/two_gpus_summary.py DIR [--print-only]   # DIR: the part files (speed_*.json, recipe_*.json, eval_*)

Writes DIR/summary.json (not with --print-only) (every figure the table shows, the goals and whether each was met) and
prints the markdown table the README's multi-GPU section carries. A part whose files are missing
is said to be not measured; nothing is filled in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _gib(value) -> str:
    return "not measured (CPU)" if value is None else f"{value:.1f} GiB"


def scaling(d: Path) -> dict | None:
    rows = {k: _read(d / f"speed_{k}.json") for k in ("1gpu", "1gpu_nographs", "2gpu_ddp", "2gpu_after_backward")}
    ones = [r for k, r in rows.items() if k.startswith("1gpu") and r]
    twos = [r for k, r in rows.items() if k.startswith("2gpu") and r]
    if not ones or not twos:
        return None
    best1 = max(ones, key=lambda r: r["tokens_per_s"])
    best2 = max(twos, key=lambda r: r["tokens_per_s"])
    return {"rows": {k: None if r is None else {"tokens_per_s": r["tokens_per_s"], "peak_gib": r["peak_gib"],
                                                 "cuda_graphs": r["cuda_graphs"], "micro_batch_per_rank": r["micro_batch_per_rank"],
                                                 "grad_reduce": r["grad_reduce"], "batch": r["batch"]}
                     for k, r in rows.items()},
            "shape": best1["shape"] + (f" cut to {best1['layers']} layers" if best1.get("layers") else ""),
            "rows_per_gpu": best1["batch"], "length": best1["length"], "best_1gpu": best1["tokens_per_s"], "best_2gpu": best2["tokens_per_s"],
            "scaling": best2["tokens_per_s"] / best1["tokens_per_s"], "goal": 1.9,
            "met": best2["tokens_per_s"] / best1["tokens_per_s"] >= 1.9}


def _losses(record: dict) -> list[float]:
    return [m["train loss"] for m in record["train_info"]["metrics"] if "train loss" in m]


def recipe(d: Path) -> dict | None:
    records = {k: _read(d / f"recipe_{k}.json") for k in ("1gpu", "2gpu_ddp", "2gpu_after_backward")}
    one = records["1gpu"]
    if one is None or not any(records[k] for k in ("2gpu_ddp", "2gpu_after_backward")):
        return None
    out = {}
    for k, r in records.items():
        if r is None:
            out[k] = None
            continue
        ti = r["train_info"]
        mem = ti.get("cuda_memory_max")
        losses = _losses(r)
        out[k] = {"tokens_per_s": ti["tokens_per_second"], "cuda_memory_max_gib": None if mem is None else mem / 2**30,
                  "losses": losses, "steps": ti["steps"], "distributed": ti["distributed"],
                  "max_loss_rel_diff_vs_1gpu": max(abs(a - b) / abs(a) for a, b in zip(_losses(one), losses))}
    best2 = max((out[k] for k in ("2gpu_ddp", "2gpu_after_backward") if out[k]), key=lambda r: r["tokens_per_s"])
    tp = one["run_info"]["config"]["training_parameters"]
    return {"rows": out, "model": one["meta_info"]["model"]["model_id"],
            "optimizer_batch": tp["batch_size"] * tp["gradient_accumulation_steps"],
            "scaling": best2["tokens_per_s"] / out["1gpu"]["tokens_per_s"]}


def _completions(path: Path) -> list[str]:
    return [json.loads(line)["completion"] for line in path.read_text().splitlines()] if path.exists() else []


def evaluation(d: Path) -> dict | None:
    one, two = _read(d / "eval_1gpu.json"), _read(d / "eval_2gpu.json")
    if not one or not two:
        return None
    one, two = one["gsm8k"], two["gsm8k"]
    rate1 = one["engine"]["new_tokens"] / one["seconds"]["generate"]
    rate2 = two["engine_ranks"]["new_tokens"] / two["seconds"]["generate"]
    c1, c2 = _completions(d / "eval_1gpu.jsonl"), _completions(d / "eval_2gpu.jsonl")
    same = sum(a == b for a, b in zip(c1, c2))
    return {"new_tokens": [one["engine"]["new_tokens"], two["engine_ranks"]["new_tokens"]], "generate_s": [one["seconds"]["generate"],
            two["seconds"]["generate"]], "total_s": [one["seconds"]["total"], two["seconds"]["total"]],
            "new_tokens_per_s": [rate1, rate2], "scaling": rate2 / rate1, "goal": 1.9, "met": rate2 / rate1 >= 1.9,
            "problems": one["n"], "identical_completions": same, "compared": min(len(c1), len(c2)),
            "accuracy": [one["accuracy"], two["accuracy"]], "max_new_tokens": one["generation"]["max_new_tokens"],
            "model": _model_line(d)}


def _model_line(d: Path) -> str | None:
    """The model ``gpu_two_gpus.sh`` evaluated (its ``model:`` line in a gpu*.txt)."""
    text = "".join(f.read_text() for f in sorted(d.glob("gpu*.txt")))
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model:")), None)


def table(s: dict) -> str:
    lines = ["| what | 1 GPU | 2 GPUs | 2 GPUs / 1 GPU |", "|---|--:|--:|---|"]
    sc = s["scaling"]
    if sc:
        r = sc["rows"]
        graphs = lambda row: "CUDA graphs" if row["cuda_graphs"] else "no graphs"  # noqa: E731  (what ran)
        one = ", ".join(f"{r[k]['tokens_per_s']:,.0f} tok/s ({label}: {graphs(r[k])})"
                        for k, label in (("1gpu", "defaults"), ("1gpu_nographs", "--no-graphs")) if r[k])
        two = ", ".join(f"{r[k]['tokens_per_s']:,.0f} tok/s on both ({r[k]['grad_reduce']}: {graphs(r[k])})"
                        for k in ("2gpu_ddp", "2gpu_after_backward") if r[k])
        peaks = [p for k in ("2gpu_ddp", "2gpu_after_backward") if r[k] for p in r[k]["peak_gib"] if p is not None]
        one_peak = max((p for k in ("1gpu", "1gpu_nographs") if r[k] for p in r[k]["peak_gib"] if p is not None), default=None)
        lines.append(f"| {sc['shape']} shape (random weights), LoRA r32, {sc['rows_per_gpu']} x {sc['length']} tokens per GPU, "
                     f"`loralab run`'s step | {one}; peak {_gib(one_peak)} "
                     f"| {two}; peak {_gib(max(peaks, default=None))} per GPU | {sc['scaling']:.2f}x the best 1-GPU path "
                     f"(goal >= 1.9x: {'met' if sc['met'] else 'not met'}) |")
    else:
        lines.append("| Llama-3-8B-shape LoRA r32, 4 x 512 tokens per GPU | not measured | not measured | |")
    rc = s["recipe"]
    if rc:
        r = rc["rows"]
        two = ", ".join(f"{r[k]['tokens_per_s']:,.0f} tok/s on both ({k.removeprefix('2gpu_')}), peak "
                        f"{_gib(r[k]['cuda_memory_max_gib'])}, losses within {r[k]['max_loss_rel_diff_vs_1gpu']:.1e} "
                        "of 1 GPU's (relative)" for k in ("2gpu_ddp", "2gpu_after_backward") if r[k])
        lines.append(f"| seed 000 math recipe, `{rc['model']}`, GSM8K rows, batch {rc['optimizer_batch']}, {r['1gpu']['steps']} steps | "
                     f"{r['1gpu']['tokens_per_s']:,.0f} tok/s, peak {_gib(r['1gpu']['cuda_memory_max_gib'])} | {two} | "
                     f"{rc['scaling']:.2f}x (the better 2-GPU row) |")
    else:
        lines.append("| seed 000 math recipe at the 8B shape | not measured | not measured | |")
    ev = s["evaluation"]
    if ev:
        lines.append(f"| GSM8K, {ev['problems']:,} problems x {ev['max_new_tokens']:,} new tokens, loralab's engine, "
                     f"`{ev['model']}` + LoRA r32 | "
                     f"{ev['new_tokens_per_s'][0]:,.0f} new tok/s ({ev['total_s'][0]:.0f} s) | "
                     f"{ev['new_tokens_per_s'][1]:,.0f} new tok/s ({ev['total_s'][1]:.0f} s) | {ev['scaling']:.2f}x "
                     f"(goal >= 1.9x: {'met' if ev['met'] else 'not met'}); {ev['identical_completions']:,} of "
                     f"{ev['compared']:,} completions identical |")
    else:
        lines.append("| GSM8K with loralab's engine, 8B shape | not measured | not measured | |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    write = "--print-only" not in argv
    argv = [a for a in argv if a != "--print-only"]
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print(__doc__, file=sys.stderr)
        return 2
    d = Path(argv[0])
    summary = {"scaling": scaling(d), "recipe": recipe(d), "evaluation": evaluation(d)}
    if write:
        (d / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
