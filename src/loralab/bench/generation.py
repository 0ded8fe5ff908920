"""``loralab bench --eval``: generation throughput of loralab's engine against transformers, side by side.

One process, one device, one model (a peft LoRA applied unmerged, as after training), the same
GSM8K test prompts (``loralab.tasks.gsm8k``'s prompt builder, CorDA's template) through each row:

- ``engine``: ``loralab.tasks.generation.generate(..., GenerationSettings(backend="engine"))``;
- ``transformers``: ``model.generate`` batched as a careful user would: left padding, prompts
  sorted by length, each batch size of ``batch_sizes`` tried, the best one reported;
- ``generate_batch``: transformers' continuous batching (``model.generate_batch``, its default
  ``ContinuousBatchingConfig``: paged KV cache sized from free memory, CUDA graphs on CUDA); skipped
  with the reason when the installed transformers lacks it or it fails.

Workloads (``stopping``):
- ``budget`` (default for ``random:`` models): no stop strings and EOS off, so every request runs
  to its ``max_new_tokens`` and every row does the same work (prompts x budget new tokens).
  transformers ``generate`` gets ``min_new_tokens = budget`` (EOS logits masked until the budget),
  ``generate_batch`` gets ``eos_token_id = -1`` (its "disabled"), the engine is checked by its counts.
- ``source`` (default for real models): GSM8K's source protocol (CorDA / seed 000) stop strings and
  the model's EOS, with ``max_new_tokens`` as the budget.

New tokens are counted per request from the token ids each row returns: up to and including the
token that ends it (EOS, the token that completes a stop string in the generated text, or the
budget), so tokens a batched ``generate`` keeps producing for finished rows do not count.
Seconds are wall time of the whole call (CUDA synchronised), setup inside it (graph capture,
compilation, cache allocation) included; one untimed forward pass warms the device first. Peak
memory is ``torch.cuda.max_memory_allocated`` (reset before each row). ``peer_prompts`` runs the
peer rows on the first N prompts only (their full-task seconds are then extrapolated by prompt
count and marked so); the engine always runs every prompt.

Beside the table: the decode-step bound for the card (``CARDS``): one decode step of ``slots``
sequences reads every weight once plus the KV cache of each sequence (memory bound), and does
2 FLOP per matmul parameter per sequence plus attention (compute bound); max new tokens/s =
slots / max(memory time, compute time).
"""

from __future__ import annotations

import contextlib
import gc
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROWS = ("engine", "transformers", "generate_batch")
STOPPING = ("auto", "budget", "source")
REAL_MODEL = "packaged:smollm2-135m"
GSM8K_TEST = 1319
"""GSM8K test problems (openai/gsm8k main test)."""


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


@dataclass
class EvalBenchSettings:
    model: str = "random:llama-3-8b"
    """``random:<shape>`` (a shape of ``loralab.models.MODELS``) or a real model id."""
    device: str = "cuda"
    rows: tuple[str, ...] = ROWS
    num_prompts: int | None = None
    """First N GSM8K test prompts; None = all 1,319."""
    max_new_tokens: int = 256
    stopping: str = "auto"
    """``budget``, ``source`` or ``auto`` (budget for random weights, source for real ones)."""
    batch_sizes: tuple[int, ...] = (64, 128)
    """Batch sizes tried by the ``transformers`` row; the best is reported."""
    peer_prompts: int | None = None
    """Run the transformers and generate_batch rows on the first N prompts only (None = all)."""
    slots: int = 512
    """The engine's slots (sequences decoded together; fewer when its KV-cache budget holds fewer),
    and the batch of the printed decode-step bound."""
    rank: int = 32
    dtype: str = "bfloat16"
    data_dir: str | None = None
    seed: int = 0


@dataclass
class Workload:
    prompts: list[str]
    ids: list[list[int]]
    budget: int
    stop: list[str] = field(default_factory=list)
    eos: list[int] = field(default_factory=list)
    """Token ids that end a request (empty: EOS off)."""

    @property
    def name(self) -> str:
        return "source" if self.stop or self.eos else "budget"


# ---------------------------------------------------------------- model and prompts


def load_adapted_model(model_id: str, device: str, dtype: str, rank: int, seed: int = 0):
    """``(model, tokenizer)``: ``model_id`` in ``dtype`` on ``device`` with a peft LoRA of rank
    ``rank`` on all linear layers (alpha = 2 x rank, peft's default fp32 adapter weights), unmerged.
    Random-weight models get ``lora_B`` drawn from N(0, 0.02^2) (seeded; a fresh B = 0 adapter
    would change nothing, so the adapter must count); real models keep peft's B = 0 so their
    outputs, and so their stopping, are the real model's."""
    import torch
    from peft import LoraConfig, get_peft_model

    from loralab.models import RANDOM_PREFIX, load_model, load_tokenizer

    tokenizer = load_tokenizer(model_id)
    model = load_model(model_id, "causal_lm", dtype=dtype).to(device)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    if model_id.startswith(RANDOM_PREFIX):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model.eval(), tokenizer


def gsm8k_workload(model, tokenizer, settings: EvalBenchSettings) -> Workload:
    """The first ``num_prompts`` GSM8K test prompts (the evaluation's default options: CorDA's
    template) and the stopping rules of ``settings.stopping`` (end-of-sequence ids as every backend
    stops on them: ``tasks.generation.eos_ids``)."""
    from loralab.models import RANDOM_PREFIX
    from loralab.tasks import gsm8k
    from loralab.tasks.generation import eos_ids

    options = {key: spec[0] for key, spec in gsm8k.OPTIONS.items()}
    problems = gsm8k.load("gsm8k", settings.data_dir, settings.num_prompts)
    prompts = [gsm8k.build_prompt("gsm8k", p, options) for p in problems]
    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    stopping = settings.stopping
    if stopping == "auto":
        stopping = "budget" if settings.model.startswith(RANDOM_PREFIX) else "source"
    if stopping == "budget":
        return Workload(prompts, ids, settings.max_new_tokens)
    stop = gsm8k.source_generation("gsm8k", options)["stop"]
    return Workload(prompts, ids, settings.max_new_tokens, list(stop), sorted(eos_ids(model, tokenizer)))


# ---------------------------------------------------------------- counting


def tokens_to_end(ids, tokenizer, work: Workload) -> int:
    """New tokens of one request up to and including the one that ends it: the first EOS, the
    token completing the first stop string in the generated text, or the budget."""
    ids = [int(t) for t in ids][: work.budget]
    for i, t in enumerate(ids):
        if t in work.eos:
            ids = ids[: i + 1]
            break
    if not work.stop or not _has_stop(tokenizer.decode(ids, skip_special_tokens=True), work.stop):
        return len(ids)
    lo, hi = 1, len(ids)  # smallest prefix whose text holds a stop string (text grows with the prefix)
    while lo < hi:
        mid = (lo + hi) // 2
        if _has_stop(tokenizer.decode(ids[:mid], skip_special_tokens=True), work.stop):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _has_stop(text: str, stop: list[str]) -> bool:
    return any(s in text for s in stop)


# ---------------------------------------------------------------- rows


class RowSkipped(Exception):
    """A row that cannot run here (the reason is its message)."""


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _clean(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


class _TokenTap:
    """A tokenizer that remembers the ids of its latest ``decode`` calls, so the token ids behind
    each completion the public ``generate`` hands to ``on_complete`` can be counted exactly (the
    call returns text, and text does not re-tokenize to the same ids: random-weight models emit
    ids past the tokenizer's vocabulary, which decode to nothing). Everything else is the
    wrapped tokenizer's."""

    def __init__(self, tokenizer):
        self._tokenizer, self.recent = tokenizer, []

    def decode(self, ids, *args, **kwargs):
        text = self._tokenizer.decode(ids, *args, **kwargs)
        self.recent = (self.recent + [([int(t) for t in ids], text)])[-4:]
        return text

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def engine_row(model, tokenizer, work: Workload, device: str, slots: int) -> dict:
    """loralab's engine through the public ``generate`` call (every prompt), ``slots`` slots.

    Tokens per request come from the ids behind the completion ``on_complete`` receives (checked:
    they decode to it); the engine drops the EOS token it stops at, so a request that ended before
    its budget without a stop string gets that token back. A request whose ids cannot be matched
    is counted by re-tokenizing its text (``retokenized`` says how many)."""
    from loralab.tasks.generation import GenerationSettings, generate, truncate_at_stop

    tap = _TokenTap(tokenizer)
    counts, retokenized = {}, []

    def complete(i, completions):
        match = next((ids for ids, text in reversed(tap.recent) if truncate_at_stop(text, work.stop) == completions[0]), None)
        if match is None:
            retokenized.append(i)
            counts[i] = len(tokenizer(completions[0], add_special_tokens=False)["input_ids"])
            return
        n = tokens_to_end(match, tokenizer, work)
        ended_by_stop = bool(work.stop) and _has_stop(tokenizer.decode(match, skip_special_tokens=True), work.stop)
        counts[i] = n + (1 if n < work.budget and not ended_by_stop else 0)

    settings = GenerationSettings(max_new_tokens=work.budget, stop=list(work.stop), temperature=0.0,
                                  backend="engine", slots=slots)
    with _eos(model, work):
        start = time.perf_counter()
        generate(model, tap, work.prompts, settings, on_complete=complete)
        _sync(device)
        seconds = time.perf_counter() - start
    return {"prompts": len(work.prompts), "new_tokens": sum(counts.values()), "seconds": seconds, "slots": slots,
            "token_count": "returned token ids", "retokenized": len(retokenized)}


@contextlib.contextmanager
def _eos(model, work: Workload):
    """The model's generation config names ``work.eos`` as its end-of-sequence ids for the call
    (an empty list: none, so a budget workload runs every request to its budget)."""
    config = model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = list(work.eos)
    try:
        yield
    finally:
        config.eos_token_id = saved


def transformers_row(model, tokenizer, work: Workload, device: str, batch_sizes, n_prompts: int) -> dict:
    """``model.generate`` batched with left padding, prompts sorted by length; each batch size of
    ``batch_sizes`` runs the same first ``n_prompts`` prompts, the fastest is the row."""
    import torch

    tokenizer.padding_side = "left"
    order = sorted(range(n_prompts), key=lambda i: len(work.ids[i]))
    kwargs = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
              "pad_token_id": tokenizer.pad_token_id, "max_new_tokens": work.budget}
    if work.stop:
        kwargs.update(stop_strings=list(work.stop), tokenizer=tokenizer)
    if work.eos:
        kwargs["eos_token_id"] = list(work.eos)
    else:  # EOS off: its logit is masked until the budget, so every request runs to it
        kwargs["min_new_tokens"] = work.budget
    candidates = []
    for size in batch_sizes:
        _clean(device)
        tokens = 0
        start = time.perf_counter()
        for b in range(0, len(order), size):
            batch = order[b:b + size]
            padded = tokenizer.pad({"input_ids": [work.ids[i] for i in batch]}, return_tensors="pt").to(device)
            with torch.no_grad():
                out = model.generate(**padded, **kwargs)
            new = out[:, padded["input_ids"].shape[1]:].tolist()
            tokens += sum(tokens_to_end(row, tokenizer, work) for row in new)
        _sync(device)
        seconds = time.perf_counter() - start
        candidates.append({"batch_size": size, "new_tokens": tokens, "seconds": seconds,
                           "tokens_per_s": tokens / seconds, "peak_gib": _peak_gib(device)})
    best = max(candidates, key=lambda c: c["tokens_per_s"])
    return {"prompts": n_prompts, "new_tokens": best["new_tokens"], "seconds": best["seconds"],
            "peak_gib": best["peak_gib"], "batch_size": best["batch_size"], "candidates": candidates,
            "token_count": "returned token ids"}


def generate_batch_row(model, tokenizer, work: Workload, device: str, n_prompts: int) -> dict:
    """transformers' continuous batching, ``model.generate_batch`` with its default config (stop
    strings are not part of its API: requests run to EOS or the budget; counts stop at the string)."""
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        import transformers

        raise RowSkipped(f"transformers {transformers.__version__} has no generate_batch")
    config = GenerationConfig(max_new_tokens=work.budget, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=list(work.eos) if work.eos else -1)  # -1: EOS disabled (its API)
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=[list(i) for i in work.ids[:n_prompts]], generation_config=config,
                                   progress_bar=False)
    _sync(device)
    seconds = time.perf_counter() - start
    failed = [o for o in outputs.values() if getattr(o, "error", None)]
    if len(outputs) != n_prompts or failed:
        raise RowSkipped(f"generate_batch returned {len(outputs)} of {n_prompts} requests, {len(failed)} failed"
                         + (f" (first error: {failed[0].error})" if failed else ""))
    tokens = sum(tokens_to_end(o.generated_tokens, tokenizer, work) for o in outputs.values())
    return {"prompts": n_prompts, "new_tokens": tokens, "seconds": seconds, "token_count": "returned token ids"}


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


# ---------------------------------------------------------------- the bench


def run_eval_bench(settings: EvalBenchSettings, *, command: str = "", on_row=None) -> dict:
    """Every row of ``settings.rows`` on one model; returns the report (``meta``, ``workload``,
    ``bound``, ``rows``). ``on_row(report)`` is called after each row (to save partial results)."""
    import torch

    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    model, tokenizer = load_adapted_model(settings.model, settings.device, settings.dtype, settings.rank, settings.seed)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    work = gsm8k_workload(model, tokenizer, settings)
    n_peer = min(settings.peer_prompts or len(work.prompts), len(work.prompts))
    with torch.no_grad():  # warm the device (CUDA context, kernels) outside every row's clock
        model(input_ids=torch.tensor([work.ids[0]], device=settings.device))
    mean_prompt = sum(map(len, work.ids)) / len(work.ids)
    device_name = torch.cuda.get_device_name() if settings.device == "cuda" else None
    report = {
        "meta": meta_info(settings, command, device_name),
        "workload": {"task": "gsm8k test", "prompts": len(work.prompts), "max_new_tokens": work.budget,
                     "stopping": work.name, "stop": work.stop, "eos": work.eos, "mean_prompt_tokens": mean_prompt,
                     "peer_prompts": n_peer, "adapter": f"peft LoRA r{settings.rank} all-linear, unmerged"},
        "bound": decode_bound(model, device_name, settings.slots, mean_prompt + work.budget / 2),
        "rows": [],
    }
    for name in settings.rows:
        _clean(settings.device)
        row = {"row": name}
        try:
            if name == "engine":
                row.update(engine_row(model, tokenizer, work, settings.device, settings.slots))
            elif name == "transformers":
                row.update(transformers_row(model, tokenizer, work, settings.device, settings.batch_sizes, n_peer))
            else:
                row.update(generate_batch_row(model, tokenizer, work, settings.device, n_peer))
        except RowSkipped as exc:
            row["skipped"] = str(exc)
        except Exception as exc:  # a peer failing is a result, not the end of the bench
            row["skipped"] = f"{type(exc).__name__}: {exc}"
            print(f"row {name} failed: {row['skipped']}", file=sys.stderr)
        if "skipped" not in row:
            row.setdefault("peak_gib", _peak_gib(settings.device))
            row["tokens_per_s"] = row["new_tokens"] / row["seconds"]
            row["extrapolated"] = row["prompts"] < len(work.prompts)
            row["full_task_seconds"] = row["seconds"] * len(work.prompts) / row["prompts"]
            row["all_to_budget"] = row["new_tokens"] == row["prompts"] * work.budget
        report["rows"].append(row)
        if on_row:
            on_row(report)
    return report


def meta_info(settings: EvalBenchSettings, command: str, device_name: str | None) -> dict:
    """Device, package versions, the command and git state as ``loralab.results.git_state`` measures
    it for the code that runs (``"unknown"`` on a tree without .git unless the launcher states it,
    and the record names who did)."""
    from loralab.models import model_provenance
    from loralab.results import git_state, now_iso, package_info, system_info

    git = git_state()
    meta = {"created_at": now_iso(), "command": command, "argv": sys.argv, "device": settings.device, "device_name": device_name,
            "package_info": package_info(), "system_info": system_info(), "settings": asdict(settings),
            "model": model_provenance(settings.model)}
    meta["git"] = git
    return meta


def default_output(model_id: str, created_at: str) -> Path:
    stem = model_id.replace(":", "-").replace("/", "--")
    return Path("results") / "eval-bench" / f"{stem}--{created_at.replace(':', '-')}.json"


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
