"""``loralab bench``: the peer stack and ``loralab run``'s training step, side by side on one device.

peer: transformers + peft as their docs show: ``get_peft_model`` (fp32 adapters over the base,
peft's default), padded batches, ``model(**batch).loss``, ``torch.optim.AdamW``.
liger (Llama models, CUDA, when ``liger-kernel`` is importable): the peer with Liger's kernels
(RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) applied to the model before ``get_peft_model``,
the strongest off-the-shelf stack issue 6 names.
loralab: the same model, adapter and optimizer batches through what ``loralab run`` builds with
no ``speed`` keys (``loralab_step``): ``resolve_speed``'s defaults for the device, ``prepare_model``
and ``loralab.step.Step`` (packing into rows of the workload's length for causal LMs, the
auto micro-batch probe, bucketed widths and CUDA graphs, exact token-mean loss, fused AdamW).
Nothing is tuned by hand; ``--no-compile`` / ``--no-cuda-graphs`` are explicit speed keys.

Models are built from their configs (dicts below) with random weights in the workload's dtype
(the recipe's base dtype, the same for every stack; float32 on CPU); each optimizer step gets the
same ``batch_size`` samples in every stack, of fixed length or with lengths drawn from real
histograms (``lengths.json``). Throughput counts real (non-pad) tokens or samples.
MFU = throughput × FLOPs per token / peak, with 4N FLOPs per token for adapters (frozen base:
forward + input gradients) and 6N for full fine-tuning, N = parameters in matmuls (no embeddings).

``run_experiment_bench`` (``loralab bench --experiment DIR``) times one experiment folder instead:
``loralab run``'s own path (``train.run_experiment``) against transformers ``Trainer`` + peft set
up as the recipe says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from dataclasses import dataclass

import torch

from loralab.data import collate
from loralab.models import HUB_SHAPES, MODELS
from loralab.speed import step
from loralab.speed.lengths import sample_lengths
from loralab.step import Step, probe_micro_batch


class BenchError(ValueError):
    """Bad input to ``loralab bench`` (an argument or a recipe it cannot bench), with what is allowed."""


def random_model_id(model_id: str) -> str:
    """``random:<shape>`` for a known hub id (or a ``random:`` id, unchanged); ValueError naming
    the known ids otherwise."""
    if model_id.startswith("random:"):
        return model_id
    if model_id not in HUB_SHAPES:
        raise BenchError(f"--random-weights: no known shape for model_id {model_id!r}; known: "
                         f"{', '.join(sorted(HUB_SHAPES))} (or set model_id to one of "
                         f"{', '.join('random:' + m for m in MODELS)})")
    return "random:" + HUB_SHAPES[model_id]
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
    """Fixed length, else the cap on drawn lengths; the recipe's ``max_length`` (loralab packs rows
    of this many tokens; the classification peer pads to it with ``peer_pad_to_max``)."""
    rank: int = 32
    alpha: int = 64
    dtype: str = "bfloat16"
    """The base model's dtype (the recipe's ``dtype``), for every stack (float32 on CPU)."""
    peer_pad_to_max: bool = False
    """Classification peer pads every batch to seq_len (seed 000)."""
    steps: int | None = None
    warmup: int | None = None
    """Per-workload step counts for the full preset (short steps need more to time well)."""


def presets(name: str) -> list[Workload]:
    if name == "tiny":
        return [
            Workload("tiny-llama/fixed-2x64", "tiny-llama", ("lora", "dora", "full"), batch_size=2, seq_len=64, rank=8, alpha=16),
            Workload("tiny-llama/gsm8k", "tiny-llama", ("lora",), "gsm8k_sft", batch_size=2, seq_len=256, rank=8, alpha=16),
            Workload("tiny-roberta/sst2", "tiny-roberta", ("lora",), "sst2", batch_size=8, seq_len=128, rank=8, alpha=8,
                     dtype="float32", peer_pad_to_max=True),
        ]
    if name == "full":
        return [
            Workload("llama-3-8b/fixed-4x512", "llama-3-8b", ("lora", "dora")),
            Workload("llama-3-8b/gsm8k", "llama-3-8b", ("lora", "dora"), "gsm8k_sft", seq_len=768),
            Workload("llama-3.2-1b/fixed-4x512", "llama-3.2-1b", ("lora", "full")),
            Workload("llama-3.2-1b/gsm8k", "llama-3.2-1b", ("lora",), "gsm8k_sft", seq_len=768),
            Workload("roberta-base/sst2", "roberta-base", ("lora", "dora"), "sst2", batch_size=32, seq_len=128,
                     rank=128, alpha=128, dtype="float32", peer_pad_to_max=True, steps=40, warmup=12),
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
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

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


def step_features(w: Workload, vocab: int, n_steps: int) -> list[list[dict]]:
    """The optimizer batches of a row: ``n_steps`` lists of ``batch_size`` tokenized samples
    (random ids in [3, vocab), fixed length or lengths drawn from ``w.lengths``), the same for
    every stack. Causal LM: labels = input ids; classification: labels alternate 0/1."""
    gen = torch.Generator().manual_seed(1)
    seq_cls = is_seq_cls(w)
    n = w.batch_size * n_steps
    lengths = [w.seq_len] * n if w.lengths == "fixed" else sample_lengths(w.lengths, n, seed=1, max_len=w.seq_len)
    out = []
    for s in range(n_steps):
        feats = []
        for i in range(s * w.batch_size, (s + 1) * w.batch_size):
            ids = torch.randint(3, vocab, (lengths[i],), generator=gen).tolist()
            feats.append({"input_ids": ids, "labels": i % 2 if seq_cls else list(ids)})
        out.append(feats)
    return out


def peer_batch(w: Workload, feats: list[dict], pad_id: int) -> dict:
    """The peer's padded batch: to ``seq_len`` (``peer_pad_to_max``), else to the longest sample
    (classification: rounded up to 8, as transformers' collators do)."""
    if is_seq_cls(w):
        return collate(feats, pad_id, w.seq_len if w.peer_pad_to_max else None, multiple_of=8)
    return collate(feats, pad_id)


def is_seq_cls(w: Workload) -> bool:
    return "roberta" in w.model


def _peer_step(model, opt, batch):
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def loralab_step(model, features: list[list[dict]], *, kind: str, dtype: str, max_length: int, batch_size: int,
                 device: str, speed: dict | None = None, learning_rate: float = 1e-5, log=print) -> tuple[Step, dict]:
    """The step ``loralab run`` builds (``loralab.train._train``), for an adapted ``model``.

    ``speed`` holds explicit ``speed`` keys (the experiment's; the bench's --no-compile /
    --no-cuda-graphs); every other key is ``loralab.config``'s default, resolved by
    ``resolve_speed`` for this device, task kind and base dtype. Then, as in ``loralab run``: fused
    AdamW (``train.make_optimizer``), ``prepare_model``, the micro-batch probe when it is "auto"
    (over all the row's samples, limit = the optimizer batch), ``Step`` with packing into rows of
    ``max_length``, bucketed widths and CUDA graphs as resolved, token normalisation, no clipping.
    Returns (step, resolved speed options).
    """
    from types import SimpleNamespace

    from loralab.config import _speed_defaults
    from loralab.speed.defaults import resolve_speed
    from loralab.train import make_optimizer

    torch_device = torch.device(device)
    options = {**_speed_defaults(), **(speed or {})}
    resolved = resolve_speed(options, device=torch_device, kind=kind, base_dtype=dtype)
    optimizer = make_optimizer(model, None, None, SimpleNamespace(learning_rate=learning_rate, weight_decay=0.0))
    names = {f.name for f in dataclasses.fields(step.SpeedOptions)}
    step.prepare_model(model, step.SpeedOptions(**{k: v for k, v in resolved.items() if k in names}))
    pad_id = getattr(step._hf_model(model).config, "pad_token_id", None) or 0
    micro = resolved["micro_batch"]
    if micro == "auto":
        micro = probe_micro_batch(model, [f for feats in features for f in feats], kind=kind,
                                  packing=resolved["packing"], max_length=max_length, limit=batch_size,
                                  pad_id=pad_id, device=torch_device, log=log)
    elif micro is None:
        micro = batch_size
    resolved["micro_batch"] = micro
    runner = Step(model, optimizer, kind=kind, normalization="tokens", micro_batch=micro, packing=resolved["packing"],
                  max_length=max_length, pad_to=None, pad_id=pad_id, device=torch_device,
                  graphs=resolved["cuda_graphs"], max_grad_norm=0.0, log=log)
    return runner, resolved


def run_one(w: Workload, method: str, stack: str, device: str, steps: int, warmup: int,
            speed: dict | None = None, profile_to: list | None = None) -> dict:
    """One row: build the model (the workload's dtype for every stack; float32 on CPU), adapt it,
    time ``steps`` optimizer steps after ``warmup`` ones. ``speed``: explicit loralab speed keys."""
    dtype = "float32" if device == "cpu" else w.dtype
    _clean(device)
    patches = contextlib.ExitStack()
    base = build_model(w, device, getattr(torch, dtype))
    if stack == "liger":
        patches.enter_context(liger_patched(base))
    reserved = torch.cuda.memory_reserved() / 2**30 if device == "cuda" else None
    with patches:
        row = _run_built(w, wrap(base, w, method), method, stack, device, dtype, steps, warmup, speed, profile_to)
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


def _run_built(w, model, method, stack, device, dtype, steps, warmup, speed, profile_to) -> dict:
    seq_cls = is_seq_cls(w)
    model.train()
    spec = MODELS[w.model]
    vocab, pad_id = spec["vocab_size"], spec.get("pad_token_id", 0)
    data = step_features(w, vocab, warmup + steps)
    resolved, runner = None, None
    if stack == "loralab":
        runner, resolved = loralab_step(model, data, kind="seq_cls" if seq_cls else "causal_lm", dtype=dtype,
                                        max_length=w.seq_len, batch_size=w.batch_size, device=device, speed=speed,
                                        log=lambda line: None)
        run = runner
        shape_of = lambda feats: tuple(tuple(tuple(v.shape) for v in b.values()) for b in runner.plan(feats))
        inputs = data
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        run = lambda b: _peer_step(model, opt, b)
        shape_of = lambda b: tuple(tuple(v.shape) for v in b.values())
        inputs = [{k: v.to(device) for k, v in peer_batch(w, feats, pad_id).items()} for feats in data]
    n_params = matmul_params(model)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # Every batch shape is met before timing (a real run meets each of its few shapes once in
    # thousands of steps): compile and graph capture are not timed, for either stack.
    seen, first_of_shape = set(), []
    for item in inputs[warmup:]:
        key = shape_of(item)
        if key not in seen:
            seen.add(key)
            first_of_shape.append(item)
    if device == "cuda":  # peak over warm-up too: graph capture and compile allocate there
        torch.cuda.reset_peak_memory_stats()
    for item in inputs[:warmup] + first_of_shape:
        run(item)
    sync()
    start = time.perf_counter()
    for item in inputs[warmup:]:
        run(item)
    sync()
    seconds = time.perf_counter() - start
    timed = data[warmup:]
    tokens = sum(len(f["input_ids"]) for feats in timed for f in feats)
    units = sum(len(feats) for feats in timed) if seq_cls else tokens
    throughput = units / seconds
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    mfu = None
    if device in PEAK_FLOPS:
        mfu = tokens / seconds * (6 if method == "full" else 4) * n_params / PEAK_FLOPS[device]
    if profile_to is not None and device == "cuda":
        profile_to.append(_profile(run, inputs[warmup:warmup + 2], f"{w.name} {method} {stack}"))
    row = {"workload": w.name, "method": method, "stack": stack, "throughput": round(throughput, 2),
           "unit": "samples/s" if seq_cls else "tokens/s", "peak_memory_gib": None if peak is None else round(peak, 2),
           "mfu": None if mfu is None else round(mfu, 4), "units_per_step": units / steps,
           "step_ms": round(1000 * seconds / steps, 2), "dtype": dtype,
           "compile": bool(resolved and resolved["compile"]),
           "cuda_graphs": bool(runner is not None and runner.trainer.graphed and runner.trainer.graphs > 0)}
    if resolved is not None:
        row["speed"] = resolved
        row["micro_batch"] = runner.micro_batch
    return row


def _profile(run, data, title: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for item in data:
            run(item)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
    return f"== profile: {title} (2 steps) ==\n{table}"


def run_bench(preset: str, device: str, steps: int | None = None, warmup: int | None = None,
              only: str | None = None, speed: dict | None = None, profile: bool = False,
              log=print, on_row=None):
    """All rows of a preset; ``only`` keeps workloads whose name contains it; ``speed`` holds
    explicit loralab speed keys (e.g. ``{"compile": False}``), the rest are ``loralab run``'s defaults.

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
            row = run_one(w, method, stack, device, n_steps, n_warmup, speed=speed)
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
            run_one(w, method, stack, device, 2, warmup or w.warmup or 3, speed=speed, profile_to=profiles)
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


# ------------------------------------------------------------------------------------------------
# loralab bench --experiment DIR: one recipe through `loralab run` and through transformers' Trainer


@contextlib.contextmanager
def _environ(**values):
    import os

    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bench_copy(path, into, *, steps: int, random_weights: bool = False, task: str | None = None,
               device: str | None = None):
    """A copy of the experiment folder ``path`` under ``into/experiments/<its name>`` for a timing
    run, read back with ``read_experiment``: ``max_steps`` = ``steps``, ``logging_steps`` 1 (every
    step ends with a host sync, so ``loralab run`` can tell warm-up steps from steady ones),
    no checkpoints, no evaluation during training; ``random_weights`` swaps the model for its
    ``random:<shape>`` stand-in, ``task`` the training data (e.g. ``gsm8k`` for a MetaMathQA
    recipe when MetaMathQA is not on disk), ``device`` the device. Everything else (batch,
    accumulation, dtype, lr, schedule, max_length, speed keys, the adapter) is the recipe's.
    Raises ConfigError (every problem) for a folder that is not a valid experiment after the
    changes, BenchError (a ValueError) for an unknown id under ``random_weights``.
    """
    import json
    import shutil
    from pathlib import Path

    from loralab.experiment import (
        ADAPTER_FILE,
        PARAMS_FILE,
        experiment_name,
        read_experiment,
    )

    original = read_experiment_params(Path(path))
    overrides = dict(original)
    overrides.update(max_steps=steps, logging_steps=1, checkpoint_steps=0, eval_steps=None)
    if random_weights:
        from loralab.config import default_parameters

        overrides["model_id"] = random_model_id(original.get("model_id", default_parameters()["model_id"]))
    if task is not None:
        overrides["task"] = task
    if device is not None:
        overrides["device"] = device
    target = Path(into) / "experiments" / experiment_name(Path(path))
    target.mkdir(parents=True, exist_ok=True)
    if (Path(path) / ADAPTER_FILE).exists():
        shutil.copy(Path(path) / ADAPTER_FILE, target / ADAPTER_FILE)
    (target / PARAMS_FILE).write_text(json.dumps(overrides, indent=2) + "\n")
    return read_experiment(target)


def read_experiment_params(path) -> dict:
    """The raw ``training_parameters.json`` of an experiment folder ({} when absent); a folder
    that does not exist or a file that is not a JSON object raises ConfigError."""
    import json
    from pathlib import Path

    from loralab.config import ConfigError
    from loralab.experiment import PARAMS_FILE

    path = Path(path)
    if not path.is_dir():
        raise ConfigError([f"experiment folder {str(path)!r} does not exist"], str(path))
    file = path / PARAMS_FILE
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{PARAMS_FILE}: not valid JSON ({exc})"], str(path)) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"{PARAMS_FILE}: must hold a JSON object"], str(path))
    return data


def _gib(n) -> float | None:
    return None if n is None else round(n / 2**30, 2)


def _loralab_run_row(exp, workdir) -> dict:
    """``loralab run``'s own path (``train.run_experiment(evaluate=False)``), results and outputs
    under ``workdir``; the row is read off the result record: steady-state tokens/s as the run
    reports it (steps after the first that captured no new CUDA graph; compile, capture and the
    micro-batch probe are warm-up), peak memory = ``cuda_memory_max`` (from after the probe)."""
    from loralab.train import run_experiment

    with _environ(LORALAB_RESULTS_DIR=workdir / "results", LORALAB_OUTPUT_DIR=workdir / "outputs"):
        record, _ = run_experiment(exp, verbose=False, evaluate=False)
    info = record["train_info"]
    timing = info["timing"]
    losses = [m["train loss"] for m in info["metrics"] if "train loss" in m]
    return {"stack": "loralab", "steps": info["steps"], "samples": info["train_samples"], "tokens": info["train_tokens"],
            "tokens_per_second": info["tokens_per_second"], "samples_per_second": info["samples_per_second"],
            "steady_steps": (timing.get("steady_samples") or 0) // (exp.params.batch_size * exp.params.gradient_accumulation_steps),
            "steady_tokens": timing.get("steady_tokens"), "steady_seconds": timing.get("steady_s"),
            "overall_tokens_per_second": info["train_tokens"] / info["train_time"] if info["train_time"] else None,
            "warmup_seconds": timing.get("warmup_s"), "train_seconds": info["train_time"],
            "peak_memory_gib": _gib(info.get("cuda_memory_max")), "losses": losses,
            "micro_batch": timing.get("micro_batch"), "cuda_graphs_captured": timing.get("cuda_graphs"),
            "oom_retries": timing.get("oom_retries"), "speed": info["speed"]}


def _trainer_row(exp, workdir, log) -> dict:
    """transformers ``Trainer`` + peft as the recipe says: the same model (same random weights for
    ``random:`` ids), ``get_peft_model`` with the recipe's adapter config (``all-linear`` expanded
    as loralab does), per-device batch ``batch_size``, ``gradient_accumulation_steps``, bf16/fp16
    mixed precision when the base dtype is bf16/fp16, the recipe's lr, scheduler, warm-up, weight
    decay, max_grad_norm and seed, ``DataCollatorForSeq2Seq`` padding, and the very samples
    ``loralab run`` trained on, in its order (``train.epoch_batches``; sequential sampler).
    Step times come from a callback that synchronises the GPU at every optimizer step's end; the
    steady state is steps 2..N (step 1 carries CUDA/cuBLAS initialisation and allocator growth).
    """
    from transformers import (
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from loralab.data import pad_id as _pad_id
    from loralab.methods.common import resolve_config
    from loralab.models import load_model, load_tokenizer
    from loralab.tasks import get_task
    from loralab.train import epoch_batches, pick_device, warmup_steps

    params = exp.params
    device = pick_device(params.device)
    task = get_task(params.task)
    if task.kind != "causal_lm":
        raise BenchError(f"bench --experiment: the Trainer peer covers causal-LM recipes; task {params.task!r} is {task.kind}")
    tokenizer = load_tokenizer(params.model_id)
    train = task.load(params, tokenizer).train
    model = load_model(params.model_id, task.kind, getattr(task, "num_labels", 2), params.dtype)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = _pad_id(tokenizer)
    if exp.peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, resolve_config(model, exp.peft_config, task.kind))
    else:
        model.requires_grad_(True)
    opt_batch = params.batch_size * params.gradient_accumulation_steps
    lengths = [len(f["input_ids"]) for f in train]
    order, epoch = [], 0
    while len(order) < params.max_steps * opt_batch:
        for batch in epoch_batches(len(train), lengths, opt_batch, epoch, params):
            order.extend(batch)
            if len(order) >= params.max_steps * opt_batch:
                break
        epoch += 1
    samples = [train[i] for i in order[:params.max_steps * opt_batch]]
    per_step_tokens = [sum(len(f["input_ids"]) for f in samples[k * opt_batch:(k + 1) * opt_batch])
                       for k in range(params.max_steps)]
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class Clock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self.times = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter())

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    clock = Clock()
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"), per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps, learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler, warmup_steps=warmup_steps(params.warmup_ratio, params.max_steps),
        weight_decay=params.weight_decay, max_grad_norm=params.max_grad_norm, max_steps=params.max_steps,
        bf16=params.dtype == "bfloat16", fp16=params.dtype == "float16", logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=params.seed, dataloader_num_workers=0,
        remove_unused_columns=False, use_cpu=not cuda)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = InOrder(model=model, args=args, train_dataset=samples, data_collator=collator, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # one dict per step on stdout; the losses are in the row
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if cuda else None
    times = clock.times
    steady_s = times[-1] - times[1] if len(times) > 2 else None
    steady_tokens = sum(per_step_tokens[1:])
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    row = {"stack": "trainer", "steps": len(times) - 1, "samples": len(samples), "tokens": sum(per_step_tokens),
           "tokens_per_second": steady_tokens / steady_s if steady_s else None,
           "samples_per_second": (len(samples) - opt_batch) / steady_s if steady_s else None,
           "steady_steps": len(times) - 2, "steady_tokens": steady_tokens, "steady_seconds": steady_s,
           "warmup_seconds": times[1] - times[0] if len(times) > 1 else None, "train_seconds": times[-1] - times[0],
           "overall_tokens_per_second": sum(per_step_tokens) / (times[-1] - times[0]) if len(times) > 1 else None,
           "peak_memory_gib": _gib(peak), "losses": losses, "micro_batch": params.batch_size,
           "speed": {"bf16": args.bf16, "fp16": args.fp16, "optim": str(args.optim)}}
    del trainer, model
    return row


def run_experiment_bench(path, *, steps: int = 3, random_weights: bool = False, task: str | None = None,
                         device: str | None = None, stacks: tuple[str, ...] = ("loralab", "trainer"),
                         workdir=None, log=print) -> dict:
    """One experiment folder's recipe, ``steps`` optimizer steps, through ``loralab run``'s own
    path and through transformers' ``Trainer`` + peft, one after the other in this process on one
    device (see ``bench_copy``, ``_loralab_run_row``, ``_trainer_row``).

    Returns {experiment, model_id, random_weights, task, steps, optimizer_batch, device, rows,
    ratio}: one row per stack with real (non-pad) tokens, steady-state tokens/s and samples/s,
    warm-up seconds, peak memory (GiB, CUDA) and per-step losses; ``ratio`` = loralab / trainer
    steady tokens/s. ``steps`` must be >= 2 (step 1 is warm-up for both stacks). Raises
    ConfigError for a bad folder, BenchError (a ValueError) for bad arguments.
    """
    import tempfile
    from pathlib import Path

    from loralab.config import ConfigError

    if steps < 2:
        raise BenchError(f"--steps = {steps}: at least 2 (the first step is warm-up for both stacks)")
    unknown = [s for s in stacks if s not in ("loralab", "trainer")]
    if unknown:
        raise BenchError(f"stacks {unknown}: allowed loralab, trainer")
    with contextlib.ExitStack() as stack:
        root = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loralab-bench-")))
        exp = bench_copy(path, root, steps=steps, random_weights=random_weights, task=task, device=device)
        params = exp.params
        from loralab.train import pick_device

        dev = pick_device(params.device)  # attention backends as torch picks them (no cuDNN switch, unlike the preset rows)
        rows = []
        for name in stacks:
            _clean(dev.type)
            log(f"bench --experiment {exp.name}: {name} stack, {steps} steps of "
                f"{params.batch_size} x {params.gradient_accumulation_steps} on {dev} ({params.model_id}, {params.dtype})")
            allocated = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
            try:
                row = _loralab_run_row(exp, root) if name == "loralab" else _trainer_row(exp, root, log)
            except (ConfigError, BenchError):
                raise
            except Exception as exc:  # noqa: BLE001 - one stack's failure is a row; the other stack still runs
                import traceback

                traceback.print_exc()
                row = {"stack": name, "steps": 0, "samples": 0, "tokens": 0, "tokens_per_second": None,
                       "samples_per_second": None, "peak_memory_gib": None, "losses": [],
                       "error": f"{type(exc).__name__}: {str(exc).strip()[:400]}"}
            row["allocated_gib_at_start"] = _gib(allocated)  # left over from the stack before (should be ~0)
            rows.append(row)
            log(format_experiment_row(row))
        _clean(dev.type)
    by = {r["stack"]: r for r in rows}
    ratio = None
    if "loralab" in by and "trainer" in by and by["loralab"]["tokens_per_second"] and by["trainer"]["tokens_per_second"]:
        ratio = by["loralab"]["tokens_per_second"] / by["trainer"]["tokens_per_second"]
    return {"experiment": exp.name, "source": str(path), "model_id": params.model_id, "random_weights": random_weights,
            "task": params.task, "dtype": params.dtype, "steps": steps,
            "batch_size": params.batch_size, "gradient_accumulation_steps": params.gradient_accumulation_steps,
            "optimizer_batch": params.batch_size * params.gradient_accumulation_steps, "max_length": params.max_length,
            "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "rows": rows, "ratio": ratio}


def format_experiment_row(row: dict) -> str:
    tps = "—" if row.get("tokens_per_second") is None else f"{row['tokens_per_second']:,.0f} tokens/s"
    mem = "—" if row.get("peak_memory_gib") is None else f"{row['peak_memory_gib']:.1f} GiB"
    return (f"{row['stack']:<8} {row['samples']:>6} samples {row['tokens']:>9,} tokens {tps:>18} {mem:>10} "
            f"warm-up {row.get('warmup_seconds') or 0:.1f} s" + (f"  FAILED {row['error']}" if row.get("error") else ""))


def experiment_table(result: dict) -> str:
    """Markdown table of ``run_experiment_bench``'s result (one row per stack, ratio on loralab's)."""
    head = (f"{result['experiment']}: {result['model_id']} ({result['dtype']}"
            f"{', random weights' if result['random_weights'] else ''}), task {result['task']}, "
            f"{result['steps']} steps x {result['batch_size']} x {result['gradient_accumulation_steps']} = "
            f"{result['steps'] * result['optimizer_batch']} samples, max_length {result['max_length']}, "
            f"{result['gpu'] or result['device']}")
    lines = [head, ("steady state: `loralab run`'s own (steps after the first that captured no new CUDA graph: "
                    "compile, capture and the micro-batch probe are warm-up); Trainer: steps 2..N (step ends "
                    "synchronised). Peak memory: torch.cuda.max_memory_allocated over training."), "",
             "| stack | samples | real tokens | steady steps | steady tokens/s | steady samples/s | peak memory | warm-up | step-1 loss | loralab/trainer |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in result["rows"]:
        tps = "—" if r.get("tokens_per_second") is None else f"{r['tokens_per_second']:,.0f}"
        sps = "—" if r.get("samples_per_second") is None else f"{r['samples_per_second']:,.2f}"
        mem = "—" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.1f} GiB"
        loss = f"{r['losses'][0]:.4f}" if r.get("losses") else "—"
        ratio = f"{result['ratio']:.2f}x" if r["stack"] == "loralab" and result.get("ratio") else ""
        name = "`loralab run`" if r["stack"] == "loralab" else "transformers Trainer + peft"
        lines.append(f"| {name} | {r['samples']} | {r['tokens']:,} | {r.get('steady_steps')} | {tps} | {sps} | {mem} | "
                     f"{r.get('warmup_seconds') or 0:.1f} s | {loss} | {ratio} |")
    lines += [f"{r['stack']} failed: {r['error']}" for r in result["rows"] if r.get("error")]
    return "\n".join(lines)
