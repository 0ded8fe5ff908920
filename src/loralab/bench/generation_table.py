"""The generation bench's report as Markdown, and the decode-step bound it prints beside it.

Beside the table: the decode-step bound for the card (``CARDS``): one decode step of ``slots``
sequences reads every weight once plus the KV cache of each sequence (memory bound), and does
2 FLOP per matmul parameter per sequence plus attention (compute bound); max new tokens/s =
slots / max(memory time, compute time).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Card:
    """Decode-step limits of one accelerator: bytes/s of HBM and dense bf16 FLOP/s."""

    hbm_nominal: float
    hbm_usable: float
    bf16_flops: float
    source: str


CARDS = {
    "H200": Card(hbm_nominal=4.8e12, hbm_usable=4.3e12, bf16_flops=790e12,
                 source="NVIDIA H200 SXM datasheet: 4.8 TB/s HBM3e (989 TFLOP/s dense bf16 nominal); usable "
                        "figures as measured on this project's H200 (issue 19): ~4.3 TB/s streaming, "
                        "~790 TFLOP/s bf16 dense matmul"),
}
"""Keyed by a substring of ``torch.cuda.get_device_name()``; a card not here gets no bound."""


# ---------------------------------------------------------------- bound


def decode_bound(model, device_name: str | None, slots: int, context: float) -> dict:
    """Max new tokens/s of one decode step of ``slots`` sequences with ``context`` tokens each in
    cache, on the card named ``device_name`` (``CARDS``); ``None`` fields for an unknown card.

    Memory: every matmul weight read once per step (bytes as stored; adapter weights included,
    the input embedding only gathers ``slots`` rows so it is left out unless tied to the LM head),
    plus each sequence's K and V (2 x layers x kv_heads x head_dim x dtype bytes per token).
    Compute: 2 FLOP per matmul parameter per sequence, plus attention's 4 x layers x heads x
    head_dim FLOP per cached token."""
    embedding = model.get_input_embeddings().weight
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    params = [p for p in model.parameters() if tied or p is not embedding]
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    matmul_params = sum(p.numel() for p in params)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * embedding.element_size()
    attention_flop_per_token = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim
    out = {"slots": slots, "context_tokens": round(context, 1), "weight_bytes": weight_bytes,
           "matmul_params": matmul_params, "kv_bytes_per_token": kv_per_token, "card": None}
    card_name = next((k for k in CARDS if device_name and k in device_name), None)
    if card_name is None:
        return {**out, "note": f"no constants for device {device_name!r} (known: {', '.join(CARDS)})"}
    card = CARDS[card_name]
    step_bytes = weight_bytes + slots * context * kv_per_token
    step_flop = slots * (2 * matmul_params + attention_flop_per_token * context)
    memory_s, weights_only_s, compute_s = step_bytes / card.hbm_usable, weight_bytes / card.hbm_usable, step_flop / card.bf16_flops
    return {**out, "card": card_name, "card_constants": asdict(card),
            "memory_bound_tokens_per_s": slots / memory_s,
            "memory_bound_weights_only_tokens_per_s": slots / weights_only_s,
            "compute_bound_tokens_per_s": slots / compute_s,
            "max_tokens_per_s": slots / max(memory_s, compute_s)}


def table(report: dict) -> str:
    """Markdown: one line per row, then the decode-step bound."""
    rows = [r for r in report["rows"] if "skipped" not in r]
    peers = [r["tokens_per_s"] for r in rows if r["row"] != "engine"]
    best_peer = max(peers) if peers else None
    lines = ["| row | prompts | new tokens | seconds | new tokens/s | full task s | peak GiB | vs best peer | notes |",
             "|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['row']} | | | | | | | | skipped: {r['skipped']} |")
            continue
        notes = []
        if r.get("batch_size"):
            notes.append(f"batch {r['batch_size']} (tried {', '.join(str(c['batch_size']) for c in r['candidates'])})")
        if r["extrapolated"]:
            notes.append("full task extrapolated by prompt count")
        if r["row"] == "generate_batch" and report["workload"]["stop"]:
            notes.append("no stop strings in its API")
        if report["workload"]["stopping"] == "budget" and not r["all_to_budget"]:
            notes.append("not every request ran to its budget")
        peak = "—" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        ratio = f"{r['tokens_per_s'] / best_peer:.2f}x" if best_peer else ""
        lines.append(f"| {r['row']} | {r['prompts']:,} | {r['new_tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} "
                     f"| {r['full_task_seconds']:.1f} | {peak} | {ratio} | {'; '.join(notes)} |")
    b = report["bound"]
    if b.get("card"):
        lines.append(f"\nDecode-step bound on {b['card']} at {b['slots']} sequences of ~{b['context_tokens']:.0f} tokens: "
                     f"memory {b['memory_bound_tokens_per_s']:,.0f} new tokens/s "
                     f"(weights only {b['memory_bound_weights_only_tokens_per_s']:,.0f}; {b['weight_bytes'] / 1e9:.1f} GB of "
                     f"weights, {b['kv_bytes_per_token'] / 1024:.0f} KiB of KV per token), compute "
                     f"{b['compute_bound_tokens_per_s']:,.0f} new tokens/s -> at most {b['max_tokens_per_s']:,.0f} new tokens/s. "
                     f"Constants: {b['card_constants']['source']}.")
    else:
        lines.append(f"\nDecode-step bound: {b.get('note', 'no card')}")
    return "\n".join(lines)
