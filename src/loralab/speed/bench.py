"""``loralab bench``: the peer stack and loralab's training step, side by side on one device.

peer: transformers + peft as their docs show: ``get_peft_model`` (fp32 adapters over the base,
peft's default), padded batches, ``model(**batch).loss``, ``torch.optim.AdamW``.
liger (Llama models, CUDA, when ``liger-kernel`` is importable): the peer with Liger's kernels
(RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) applied to the model before ``get_peft_model``,
the strongest off-the-shelf stack issue 6 names.
loralab: the same model and adapter through ``speed.step`` (what ``loralab run`` calls): fast DoRA,
bf16 autocast with fp32 adapters, fused LM-head + chunked cross-entropy, packed rows (causal LM)
or length-grouped dynamic padding (classification), fused AdamW, optional regional compile.

Models are built from their configs (dicts below) with random weights; lengths are fixed or drawn
from real histograms (``lengths.json``). Throughput counts real (non-pad) tokens or samples.
MFU = throughput × FLOPs per token / peak, with 4N FLOPs per token for adapters (frozen base:
forward + input gradients) and 6N for full fine-tuning, N = parameters in matmuls (no embeddings).
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass

import torch

from loralab.speed import step
from loralab.speed.graphs import GraphedTraining, bucket_width
from loralab.speed.lengths import sample_lengths
from loralab.speed.packing import length_grouped_batches, pack_groups, pack_rows, pad_features

LLAMA3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
LLAMA32_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                  max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
ROBERTA_BASE = dict(model_type="roberta", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
TINY_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)
TINY_ROBERTA = dict(model_type="roberta", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, vocab_size=512, max_position_embeddings=160, type_vocab_size=1,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2)
MODELS = {"llama-3-8b": LLAMA3_8B, "llama-3.2-1b": LLAMA32_1B, "roberta-base": ROBERTA_BASE,
          "tiny-llama": TINY_LLAMA, "tiny-roberta": TINY_ROBERTA}
ROBERTA_TARGETS = r".*encoder.*\.(query|key|value|dense)$"  # all linear layers but the classifier head
PEAK_FLOPS = {"cuda": 989e12}  # H100 SXM dense bf16


@dataclass
class Workload:
    name: str
    model: str
    methods: tuple[str, ...]
    lengths: str = "fixed"
    """``fixed`` or a histogram in lengths.json (``gsm8k_sft``, ``sst2``)."""
    batch_size: int = 4
    seq_len: int = 512
    """Fixed length; else the peer's truncation / pad-to length."""
    rank: int = 32
    alpha: int = 64
    peer_dtype: str = "bfloat16"
    peer_pad_to_max: bool = False
    """Classification peer pads every batch to seq_len (seed 000)."""
    rows: int = 2
    row_tokens: int = 1024
    """loralab's packed batch for real causal-LM lengths: rows × row_tokens."""
    steps: int | None = None
    warmup: int | None = None
    """Per-workload step counts for the full preset (short steps need more to time well)."""


def presets(name: str) -> list[Workload]:
    if name == "tiny":
        return [
            Workload("tiny-llama/fixed-2x64", "tiny-llama", ("lora", "dora", "full"), batch_size=2, seq_len=64, rank=8, alpha=16),
            Workload("tiny-llama/gsm8k", "tiny-llama", ("lora",), "gsm8k_sft", batch_size=2, seq_len=256, rank=8, alpha=16, rows=2, row_tokens=512),
            Workload("tiny-roberta/sst2", "tiny-roberta", ("lora",), "sst2", batch_size=8, seq_len=128, rank=8, alpha=8,
                     peer_dtype="float32", peer_pad_to_max=True),
        ]
    if name == "full":
        return [
            Workload("llama-3-8b/fixed-4x512", "llama-3-8b", ("lora", "dora")),
            Workload("llama-3-8b/gsm8k", "llama-3-8b", ("lora", "dora"), "gsm8k_sft", seq_len=768),
            Workload("llama-3.2-1b/fixed-4x512", "llama-3.2-1b", ("lora", "full")),
            Workload("llama-3.2-1b/gsm8k", "llama-3.2-1b", ("lora",), "gsm8k_sft", seq_len=768),
            Workload("roberta-base/sst2", "roberta-base", ("lora", "dora"), "sst2", batch_size=32, seq_len=128,
                     rank=128, alpha=128, peer_dtype="float32", peer_pad_to_max=True, steps=40, warmup=12),
        ]
    raise ValueError(f"preset {name!r} is unknown; known: tiny, full")


def liger_available(w: Workload, device: str) -> bool:
    import importlib.util

    return device == "cuda" and w.model.startswith("llama") and importlib.util.find_spec("liger_kernel") is not None


@contextlib.contextmanager
def liger_patched(model):
    """Liger's kernels on ``model`` for the duration; the module-level names Liger rebinds in
    transformers' Llama code (RoPE, RMSNorm, MLP classes) are put back afterwards, so the rows
    that follow run plain transformers again."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    try:
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)
        yield model
    finally:
        for name, value in saved.items():
            if vars(modeling_llama).get(name) is not value:
                setattr(modeling_llama, name, value)


def build_model(w: Workload, device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    spec = dict(MODELS[w.model])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.device(device):
        if "roberta" in w.model:
            config.num_labels = 2
            return AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def wrap(model, w: Workload, method: str):
    if method == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    seq_cls = "roberta" in w.model
    config = LoraConfig(r=w.rank, lora_alpha=w.alpha, lora_dropout=0.0, use_dora=method == "dora",
                        target_modules=ROBERTA_TARGETS if seq_cls else "all-linear",
                        task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM")
    return get_peft_model(model, config)


def matmul_params(model) -> int:
    """Parameters that take part in matmuls per token: all but embeddings (LM head counted)."""
    total = 0
    for name, p in model.named_parameters():
        if "lora_" in name or "embed" in name.lower() or p.dim() < 2:
            continue
        total += p.numel()
    return total


def batches(w: Workload, stack: str, vocab: int, n_steps: int, device: str, pad_id: int, bucket: bool = False):
    """(batch, real units, real tokens) per step, on device. Units: tokens (causal LM) or samples.
    ``bucket``: loralab's classification batches padded to ``graphs.bucket_width`` (as ``loralab run``
    pads them when CUDA graphs are on) instead of the longest sample rounded up to 8."""
    gen = torch.Generator().manual_seed(1)
    seq_cls = "roberta" in w.model
    out = []
    if w.lengths == "fixed":
        for _ in range(n_steps):
            ids = torch.randint(3, vocab, (w.batch_size, w.seq_len), generator=gen)
            batch = {"input_ids": ids, "labels": ids.clone()}
            if stack == "peer":
                batch["attention_mask"] = torch.ones_like(ids)
            out.append((batch, ids.numel(), ids.numel()))
    elif seq_cls:
        lengths = sample_lengths(w.lengths, w.batch_size * n_steps, seed=1, max_len=w.seq_len)
        groups = ([list(range(i, i + w.batch_size)) for i in range(0, len(lengths), w.batch_size)] if stack == "peer"
                  else length_grouped_batches(lengths, w.batch_size, seed=1))
        for g in groups[:n_steps]:
            feats = [{"input_ids": torch.randint(3, vocab, (lengths[i],), generator=gen).tolist(), "labels": i % 2} for i in g]
            pad_to = w.seq_len if w.peer_pad_to_max and stack == "peer" else None
            if stack == "loralab" and bucket:
                pad_to = bucket_width(max(lengths[i] for i in g))
            batch = pad_features(feats, pad_id, pad_to=pad_to)
            out.append((batch, len(g), sum(lengths[i] for i in g)))
    elif stack == "peer":
        lengths = sample_lengths(w.lengths, w.batch_size * n_steps, seed=1, max_len=w.seq_len)
        for s in range(n_steps):
            feats = [{"input_ids": torch.randint(3, vocab, (n,), generator=gen).tolist()}
                     for n in lengths[s * w.batch_size:(s + 1) * w.batch_size]]
            for f in feats:
                f["labels"] = list(f["input_ids"])
            batch = pad_features(feats, pad_id, multiple_of=1)
            n = sum(len(f["input_ids"]) for f in feats)
            out.append((batch, n, n))
    else:
        lengths = sample_lengths(w.lengths, (w.rows * w.row_tokens // 100 + 8) * n_steps, seed=1, max_len=w.row_tokens)
        groups = pack_groups(lengths, w.row_tokens, seed=1)
        for s in range(n_steps):
            rows = [[{"input_ids": torch.randint(3, vocab, (lengths[i],), generator=gen).tolist()} for i in g]
                    for g in groups[s * w.rows:(s + 1) * w.rows]]
            batch = pack_rows(rows, w.row_tokens, pad_token_id=pad_id)
            n = sum(sum(r) for r in batch.pop("seq_lens"))
            out.append((batch, n, n))
    return [({k: v.to(device) for k, v in b.items()}, n, t) for b, n, t in out]


def _peer_step(model, opt, batch):
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _ours_loss(seq_cls: bool):
    if seq_cls:
        return lambda model, batch: step.seq_cls_loss(model, batch)[0]
    return lambda model, batch: step.causal_lm_loss(model, batch)[0]


def _ours_step(trainer: GraphedTraining, batch):
    trainer.micro(batch, 1.0)
    trainer.step()


def run_one(w: Workload, method: str, stack: str, device: str, steps: int, warmup: int,
            compile: bool = False, graphs: bool = False, profile_to: list | None = None) -> dict:
    dtype = getattr(torch, w.peer_dtype) if stack in ("peer", "liger") or method == "full" else torch.bfloat16
    if device == "cpu":
        dtype = torch.float32
    _clean(device)
    patches = contextlib.ExitStack()
    base = build_model(w, device, dtype)
    if stack == "liger":
        patches.enter_context(liger_patched(base))
    reserved = torch.cuda.memory_reserved() / 2**30 if device == "cuda" else None
    with patches:
        row = _run_built(w, wrap(base, w, method), method, stack, device, steps, warmup, compile, graphs, profile_to)
    row["reserved_gib_at_start"] = None if reserved is None else round(reserved, 2)
    return row


def _clean(device: str) -> None:
    """Nothing of earlier rows left for the next one: compiled code (which holds its model), CUDA
    graph pools, cached blocks. Called at the start of every row, so also after a failed one."""
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _run_built(w, model, method, stack, device, steps, warmup, compile, graphs, profile_to) -> dict:
    seq_cls = "roberta" in w.model
    model.train()
    trainer = None
    if stack == "loralab":
        autocast = "bfloat16" if device == "cuda" else None
        step.prepare_model(model, step.SpeedOptions(autocast=autocast, compile=compile))
        opt = step.adamw(model, lr=1e-5)
        trainer = GraphedTraining(model, opt, _ours_loss(seq_cls), enabled=graphs)
        run = lambda b: _ours_step(trainer, b)  # noqa: E731
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        run = lambda b: _peer_step(model, opt, b)  # noqa: E731
    vocab = MODELS[w.model]["vocab_size"]
    pad_id = MODELS[w.model].get("pad_token_id", 0)
    data = batches(w, "peer" if stack == "liger" else stack, vocab, warmup + steps, device, pad_id,
                   bucket=graphs and stack == "loralab")
    n_params = matmul_params(model)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # Every batch shape is met before timing (a real run meets each of its few shapes once in
    # thousands of steps): compile and graph capture are not timed, for either stack.
    seen, first_of_shape = set(), []
    for batch, _, _ in data[warmup:]:
        key = tuple(tuple(v.shape) for v in batch.values())
        if key not in seen:
            seen.add(key)
            first_of_shape.append(batch)
    if device == "cuda":  # peak over warm-up too: graph capture and compile allocate there
        torch.cuda.reset_peak_memory_stats()
    for batch in [b for b, _, _ in data[:warmup]] + first_of_shape:
        run(batch)
    sync()
    start = time.perf_counter()
    for batch, _, _ in data[warmup:]:
        run(batch)
    sync()
    seconds = time.perf_counter() - start
    units = sum(n for _, n, _ in data[warmup:])
    tokens = sum(t for _, _, t in data[warmup:])
    throughput = units / seconds
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    mfu = None
    if device in PEAK_FLOPS:
        mfu = tokens / seconds * (6 if method == "full" else 4) * n_params / PEAK_FLOPS[device]
    if profile_to is not None and device == "cuda":
        profile_to.append(_profile(run, data[warmup:warmup + 2], f"{w.name} {method} {stack}"))
    row = {"workload": w.name, "method": method, "stack": stack, "throughput": round(throughput, 2),
           "unit": "samples/s" if seq_cls else "tokens/s", "peak_memory_gib": None if peak is None else round(peak, 2),
           "mfu": None if mfu is None else round(mfu, 4), "units_per_step": units / steps,
           "step_ms": round(1000 * seconds / steps, 2), "compile": compile if stack == "loralab" else False,
           "cuda_graphs": bool(trainer is not None and trainer.graphed and trainer.graphs > 0)}
    return row


def _profile(run, data, title: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch, _, _ in data:
            run(batch)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
    return f"== profile: {title} (2 steps) ==\n{table}"


def run_bench(preset: str, device: str, steps: int | None = None, warmup: int | None = None,
              only: str | None = None, compile: bool = False, graphs: bool = False, profile: bool = False,
              log=print, on_row=None):
    """All rows of a preset; ``only`` keeps workloads whose name contains it.

    cuDNN attention is switched off for both stacks: it builds a new plan for every new shape,
    which would charge padded batches of varying length (the peer's) seconds per step.
    """
    from tqdm import tqdm

    if device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    plan = [(w, m, s) for w in presets(preset) if not only or only in w.name for m in w.methods
            for s in ("peer", "loralab", "liger") if s != "liger" or liger_available(w, device)]
    rows, profiles = [], []
    for w, method, stack in tqdm(plan, desc="bench", disable=None):
        try:
            n_steps = steps or (3 if preset == "tiny" else w.steps or 8)
            n_warmup = warmup or (1 if preset == "tiny" else w.warmup or 3)
            row = run_one(w, method, stack, device, n_steps, n_warmup, compile=compile and stack == "loralab",
                          graphs=graphs and stack == "loralab")
        except torch.OutOfMemoryError as exc:
            row = {"workload": w.name, "method": method, "stack": stack, "throughput": None, "unit": None,
                   "peak_memory_gib": None, "mfu": None, "error": f"out of memory: {str(exc)[:120]}"}
        rows.append(row)
        log(format_row(row))
        if on_row is not None:
            on_row(rows)
    if profile and device == "cuda":
        # A second pass, after every row is timed: once the profiler has run in a process it
        # slows what follows (a peer row timed after a profiled row measured up to 30 % slower).
        for w, method, stack in [p for p in plan if p[2] == "loralab"]:
            run_one(w, method, stack, device, 2, warmup or w.warmup or 3, compile=compile, graphs=graphs,
                    profile_to=profiles)
    return rows, profiles


def format_row(row: dict) -> str:
    thr = "—" if row.get("throughput") is None else f"{row['throughput']:,.0f} {row['unit']}"
    mem = "—" if row.get("peak_memory_gib") is None else f"{row['peak_memory_gib']:.1f} GiB"
    mfu = "—" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%"
    return f"{row['workload']:<26} {row['method']:<5} {row['stack']:<8} {thr:>20} {mem:>10} {mfu:>7}" + (
        f"  {row['error']}" if row.get("error") else "")


def table(rows: list[dict]) -> str:
    """Markdown table with ours/peer ratios (and ours/liger when Liger rows exist)."""
    by_stack = {stack: {(r["workload"], r["method"], r.get("run")): r for r in rows if r["stack"] == stack}
                for stack in ("peer", "liger")}
    peers = ["peer", "liger"] if by_stack["liger"] else ["peer"]
    lines = ["| workload | method | stack | throughput | peak memory | MFU | " + " | ".join(f"ours/{p}" for p in peers) + " |",
             "|---|---|---|--:|--:|--:|" + "--:|" * len(peers)]
    for r in rows:
        ratios = []
        for stack in peers:
            p = by_stack[stack].get((r["workload"], r["method"], r.get("run")))
            ok = r["stack"] == "loralab" and p and p.get("throughput") and r.get("throughput")
            ratios.append(f"{r['throughput'] / p['throughput']:.2f}x" if ok else "")
        thr = "—" if r.get("throughput") is None else f"{r['throughput']:,.0f} {r['unit']}"
        mem = "—" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.1f} GiB"
        mfu = "—" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['workload']} | {r['method']} | {r['stack']} | {thr} | {mem} | {mfu} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)
