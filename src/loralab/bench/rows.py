"""The bench's rows as text and their ratios: a row's log line (``format_row``), loralab's ratios to the
best and the docs peer on the same workload and method (``add_ratios``), and the Markdown table (``table``).
A row is the dict ``loralab.bench.runner`` writes (workload, method, stack, throughput, unit,
peak_memory_gib, mfu, micro_batch, and on loralab's rows the ratios)."""

from __future__ import annotations

from loralab.bench.workloads import float_method

PEER_STACKS = ("peer", "liger", "tuned")
"""Rows that are peers of loralab's: the docs peer first (``ours/docs peer``), then the others."""


def format_row(row: dict) -> str:
    thr = "—" if row.get("throughput") is None else f"{row['throughput']:,.0f} {row['unit']}"
    mem = "—" if row.get("peak_memory_gib") is None else f"{row['peak_memory_gib']:.1f} GiB"
    mfu = "—" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%"
    return f"{row['workload']:<26} {row['method']:<5} {row['stack']:<8} {thr:>20} {mem:>10} {mfu:>7}" + (
        f"  {row['error']}" if row.get("error") else "")


def add_ratios(rows: list[dict]) -> None:
    """Set, on every loralab row with a throughput, ``best_peer`` (the peer stack with the highest
    throughput on the same workload, method and run; an FP8-base row: the float method's peers),
    ``ratio_best_peer`` (loralab / that peer) and ``ratio_docs_peer`` (loralab / the docs peer); None
    where that peer has no throughput."""
    for r in rows:
        if r["stack"] != "loralab":
            continue
        same = [p for p in rows if p["stack"] in PEER_STACKS and p.get("throughput")
                and (p["workload"], p["method"], p.get("run")) == (r["workload"], float_method(r["method"]), r.get("run"))]
        best = max(same, key=lambda p: p["throughput"], default=None)
        docs = next((p for p in same if p["stack"] == "peer"), None)
        ok = bool(r.get("throughput"))
        r["best_peer"] = best["stack"] if best else None
        r["ratio_best_peer"] = round(r["throughput"] / best["throughput"], 3) if ok and best else None
        r["ratio_docs_peer"] = round(r["throughput"] / docs["throughput"], 3) if ok and docs else None


def table(rows: list[dict]) -> str:
    """Markdown table, one line per row, with the micro-batch of the rows that choose one and, on
    loralab's rows, ours / best peer (which one in brackets) and ours / docs peer (``add_ratios``)."""
    add_ratios(rows)
    lines = ["| workload | method | stack | throughput | peak memory | MFU | micro-batch | ours/best peer | ours/docs peer |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        best = f"{r['ratio_best_peer']:.2f}x ({r['best_peer']})" if r.get("ratio_best_peer") else ""
        docs = f"{r['ratio_docs_peer']:.2f}x" if r.get("ratio_docs_peer") else ""
        thr = "—" if r.get("throughput") is None else f"{r['throughput']:,.0f} {r['unit']}"
        mem = "—" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.1f} GiB"
        mfu = "—" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        micro = "" if r.get("micro_batch") is None else str(r["micro_batch"])
        lines.append(f"| {r['workload']} | {r['method']} | {r['stack']} | {thr} | {mem} | {mfu} | {micro} | {best} | {docs} |")
    return "\n".join(lines)
