"""The training bench's peers: transformers + peft as their docs show, and as a careful user runs them.

peer (the docs peer): ``get_peft_model`` (fp32 adapters over the base, peft's default), padded
batches, ``model(**batch).loss``, ``torch.optim.AdamW``.
liger (Llama models, CUDA, when ``liger-kernel`` is importable): the peer with Liger's kernels
(RMSNorm, SwiGLU, RoPE, fused linear cross-entropy; ``liger_options``) applied to the adapted model,
the strongest off-the-shelf stack issue 6 names.
tuned (issue 22): what ``Trainer(bf16=True, optim="adamw_torch_fused", use_liger_kernel=True)``
computes: bf16 autocast around the forward on CUDA (fp16 for an fp16 base; none on CPU, as
``bf16=False``), fused AdamW, Liger where ``liger_available``, and its best micro-batch within
loralab's memory budget, or its measured peak (``bench.runner.tuned_cap``; ``tuned_micro_batch``:
doubling from 1 up to the optimizer batch, as loralab's probe does, until the peak passes the cap or
runs out of memory, keeping the fastest),
with gradient accumulation over the optimizer batch.
trainer (``loralab bench --experiment``): transformers ``Trainer`` + peft with the recipe's
optimisation and the tuned settings (``trainer_row``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import time

import torch

from loralab.bench.workloads import BenchError, Workload, gib, is_seq_cls
from loralab.data import collate
from loralab.run.probe import pending_state_bytes

ROBERTA_TARGETS = r".*encoder.*\.(query|key|value|dense)$"  # all linear layers but the classifier head


def liger_available(w: Workload, device: str) -> bool:
    """Whether the Liger row runs for ``w`` here: a Llama shape on CUDA with ``liger-kernel`` importable."""
    import importlib.util

    return device == "cuda" and w.model.startswith("llama") and importlib.util.find_spec("liger_kernel") is not None


LIGER_DEFAULTS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False, "fused_linear_cross_entropy": True}
"""``apply_liger_kernel_to_llama``'s defaults, which ``Trainer(use_liger_kernel=True)`` applies."""


def liger_options(model) -> dict:
    """The Liger settings a careful user gives ``model`` (a peft model or a plain one).

    Liger's fused linear cross-entropy multiplies the hidden states by ``lm_head.weight`` itself
    (liger_kernel/transformers/model/llama.py, ``lce_maybe_trainable_lm_head``): on a peft LoRA
    layer that is the frozen base weight, so an adapter on the LM head (seed 000's recipes adapt
    ``lm_head``) neither acts in the loss nor gets a gradient, silently (trl's KTO trainer refuses
    that pairing for this reason, huggingface/trl#6277). With the head adapted, the fused loss is
    off and Liger's cross-entropy over the logits is on; otherwise Liger's defaults."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    adapted = head is not None and len(getattr(head, "lora_A", None) or {}) > 0
    return {**LIGER_DEFAULTS, **({"cross_entropy": True, "fused_linear_cross_entropy": False} if adapted else {})}


@contextlib.contextmanager
def liger_patched(model, **options):
    """Liger's kernels on ``model`` for the duration (``options`` over ``LIGER_DEFAULTS``); what
    Liger rebinds outside the instance, the names in transformers' Llama module (RoPE, RMSNorm,
    MLP classes) and ``torch.nn.functional.cross_entropy`` (its ``cross_entropy`` option), is
    put back afterwards, so the rows that follow run plain transformers and torch again."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    cross_entropy = torch.nn.functional.cross_entropy
    try:
        apply_liger_kernel_to_llama(**{**LIGER_DEFAULTS, **options}, model=model)
        yield model
    finally:
        torch.nn.functional.cross_entropy = cross_entropy
        for name, value in saved.items():
            if vars(modeling_llama).get(name) is not value:
                setattr(modeling_llama, name, value)


def wrap(model, w: Workload, method: str):
    """``model`` adapted as the peft docs show: ``get_peft_model`` with a LoRA (``dora``: DoRA) of the
    workload's rank and alpha on all linear layers (roberta: every encoder linear, not the head);
    ``full``: every parameter trainable, the model itself."""
    if method == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    seq_cls = "roberta" in w.model
    config = LoraConfig(r=w.rank, lora_alpha=w.alpha, lora_dropout=0.0, use_dora=method == "dora",
                        target_modules=ROBERTA_TARGETS if seq_cls else "all-linear",
                        task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM")
    return get_peft_model(model, config)


def peer_batch(w: Workload, feats: list[dict], pad_id: int) -> dict:
    """The peer's padded batch: to ``seq_len`` (``peer_pad_to_max``), else to the longest sample
    (classification: rounded up to 8, as transformers' collators do)."""
    if is_seq_cls(w):
        return collate(feats, pad_id, w.seq_len if w.peer_pad_to_max else None, multiple_of=8)
    return collate(feats, pad_id)


def peer_step(model, opt, batch) -> None:
    """One peer optimizer step: ``model(**batch).loss``, backward, ``opt.step()``, zero grads."""
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def tuned_settings(w: Workload, device: str) -> dict:
    """The tuned peer's settings on ``device``: ``autocast`` (CUDA: float16 for an fp16 base, else
    bfloat16, as ``Trainer(bf16=True)``; CPU: None), ``optim`` (fused AdamW, ``adamw_torch_fused``)
    and ``liger`` (``liger_available``)."""
    autocast = None if device != "cuda" else "float16" if w.dtype == "float16" else "bfloat16"
    return {"autocast": autocast, "optim": "adamw_torch_fused", "liger": liger_available(w, device)}


def _autocast(device: str, autocast: str | None):
    return torch.autocast(device, dtype=getattr(torch, autocast)) if autocast else contextlib.nullcontext()


def tuned_chunks(w: Workload, feats: list[dict], pad_id: int, micro_batch: int, device: str) -> list[tuple[dict, float]]:
    """One optimizer batch for the tuned peer: ``micro_batch`` samples per padded forward (on
    ``device``), each with its share of the batch's loss (labelled tokens, classification:
    samples), so the accumulated gradient is the whole batch's token mean, as the Trainer's
    ``num_items_in_batch``."""
    groups = [feats[k:k + micro_batch] for k in range(0, len(feats), micro_batch)]
    weight = (lambda g: len(g)) if is_seq_cls(w) else (lambda g: sum(len(f["input_ids"]) - 1 for f in g))
    total = sum(weight(g) for g in groups)
    return [({k: v.to(device) for k, v in peer_batch(w, g, pad_id).items()}, weight(g) / total) for g in groups]


def tuned_step(model, opt, chunks: list[tuple[dict, float]], device: str, autocast: str | None) -> None:
    """One tuned-peer optimizer step: per chunk, ``model(**batch).loss`` under autocast, scaled by
    its share, backward; then ``opt.step()`` and zero grads."""
    for batch, share in chunks:
        with _autocast(device, autocast):
            loss = model(**batch).loss * share
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def tuned_micro_batch(model, w: Workload, feats: list[dict], pad_id: int, device: str, autocast: str | None,
                      budget_gib: float | None, limit: int, held: float = 0.0,
                      budget_from: str | None = None) -> tuple[int, dict]:
    """The tuned peer's best micro-batch (``search_micro_batch``) for the longest sample in
    ``feats`` repeated m times, padded as the peer pads, m up to ``limit`` (the optimizer batch);
    ``held``: its optimizer's state bytes still to come; ``budget_from``: where ``budget_gib`` came from."""
    longest = max(feats, key=lambda f: len(f["input_ids"]))

    def make_batch(m):
        return {k: v.to(device) for k, v in peer_batch(w, [longest] * m, pad_id).items()}

    return search_micro_batch(model, make_batch, device=device, autocast=autocast, budget_gib=budget_gib,
                              limit=limit, row_tokens=len(longest["input_ids"]), held=held, budget_from=budget_from)


def search_micro_batch(model, make_batch, *, device: str, autocast: str | None, budget_gib: float | None,
                       limit: int, row_tokens: int, held: float = 0.0,
                       budget_from: str | None = None) -> tuple[int, dict]:
    """A peer's best micro-batch, found as loralab's probe finds its own
    (``loralab.run.probe.probe_sizes``): one untimed and two timed forward+backward passes, the
    fastest counting (``run.probe.measure_trial``; ``model(**batch).loss`` under ``autocast``) of
    ``make_batch(m)`` (the worst case, on ``device``) for m = 1, 2, 4, ... up to ``limit``, a size
    with more than ``run.probe.RETIME_DROP`` fewer tokens/s than the one before measured once more;
    it stops when the peak passes ``budget_gib`` (loralab's budget or peak; None: no cap), at an
    out-of-memory error, or when a doubling is not faster (gain threshold 0), keeping the fastest
    size within the memory; ``held``: the bytes of optimizer state the peer's first step will add
    (``run.probe.pending_state_bytes``), counted beside each peak as loralab's probe counts its own.
    Peaks are measured on CUDA only; rates count real tokens (classification: samples). Gradients
    are dropped. ``budget_from``: where the cap came from, recorded (default "loralab's measured
    peak"; None without a cap).
    Returns (micro-batch, ``probe_record`` with ``budget_from``)."""
    from loralab.run.probe import Trial, measure_trial, probe_record, probe_sizes

    budget = None if budget_gib is None else budget_gib * 2**30

    def measure(m: int) -> Trial:
        batch = make_batch(m)
        labels = batch.get("labels")
        tokens = int(batch["attention_mask"].sum()) if labels is not None and labels.dim() == 2 else m

        def run_pass():
            with _autocast(device, autocast):
                loss = model(**batch).loss
            loss.backward()

        trial = measure_trial(m, tokens, run_pass, device)
        batch = None
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        return trial

    decision, trials, _, _ = probe_sizes(measure, limit=limit, budget=budget, held=held, min_gain=0.0)
    record = probe_record(trials, decision, budget=budget, memory_fraction=None, row_tokens=row_tokens, min_gain=0.0,
                          held=held)
    record["budget_from"] = (budget_from or "loralab's measured peak") if budget is not None else None
    return decision.micro_batch, record


def require_causal_lm(task_name: str) -> None:
    """BenchError unless ``task_name`` is a causal-LM task, the only kind ``trainer_row`` runs."""
    from loralab.tasks import get_task

    kind = get_task(task_name).kind
    if kind != "causal_lm":
        raise BenchError(f"the Trainer peer covers causal-LM recipes; task {task_name!r} is {kind} "
                         "(bench an encoder's speed with loralab bench --preset, e.g. its roberta rows)")


def trainer_row(exp, workdir, log, budget_gib: float | None = None) -> dict:
    """transformers ``Trainer`` + peft as a careful user runs the recipe: the same model (same
    random weights for ``random:`` ids), ``get_peft_model`` with the recipe's adapter config
    (``all-linear`` expanded as loralab does), the recipe's optimizer batch, lr, scheduler,
    warm-up, weight decay, max_grad_norm and seed, ``DataCollatorForSeq2Seq`` padding, and the very
    samples ``loralab run`` trained on, in its order (``loralab.run.loop.epoch_batches``;
    sequential sampler); tuned as issue 22 asks: on CUDA ``bf16=True`` (``fp16`` for an fp16
    base; on CPU neither), ``optim="adamw_torch_fused"``, ``use_liger_kernel`` where Liger imports
    (CUDA; ``liger_options``: the fused loss off when the recipe adapts the LM head), and the best
    ``per_device_train_batch_size`` within ``budget_gib`` (loralab's measured
    peak; ``search_micro_batch`` over powers of two dividing the optimizer batch) with
    ``gradient_accumulation_steps`` keeping the optimizer batch.
    Step times come from a callback that synchronises the GPU at every optimizer step's end; the
    steady state is steps 2..N (step 1 carries CUDA/cuBLAS initialisation and allocator growth).
    """
    from transformers import DataCollatorForSeq2Seq

    from loralab.data import pad_id as _pad_id
    from loralab.methods.common import resolve_config
    from loralab.models import load_model, load_tokenizer
    from loralab.run.build import pick_device
    from loralab.run.loop import epoch_batches
    from loralab.tasks import get_task

    params = exp.params
    device = pick_device(params.device)
    task = get_task(params.task)  # a causal LM: run_experiment_bench checks it first (require_causal_lm)
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
    liger = device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    liger_config = liger_options(model) if liger else None
    with contextlib.ExitStack() as patches:
        if liger:  # what Trainer(use_liger_kernel=True, liger_kernel_config=...) applies, applied for the search too
            patches.enter_context(liger_patched(model.get_base_model() if hasattr(model, "get_base_model") else model,
                                                **liger_config))
        return _train_with_trainer(exp, workdir, log, budget_gib, model, samples, collator, device,
                                   liger_config)


def _train_with_trainer(exp, workdir, log, budget_gib, model, samples, collator, device, liger_config) -> dict:
    """``trainer_row``'s search and timed run, with Liger (``liger_config``; None: off) already applied."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from loralab.run.build import warmup_steps

    params = exp.params
    liger = liger_config is not None
    opt_batch = params.batch_size * params.gradient_accumulation_steps
    per_step_tokens = [sum(len(f["input_ids"]) for f in samples[k * opt_batch:(k + 1) * opt_batch])
                       for k in range(params.max_steps)]
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    bf16, fp16 = cuda and params.dtype != "float16", cuda and params.dtype == "float16"
    longest = max(samples, key=lambda f: len(f["input_ids"]))
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]  # adamw_torch_fused's state, counted as the run's
    held = pending_state_bytes(torch.optim.AdamW(trainable, fused=True)) if cuda else 0
    micro, probe = search_micro_batch(
        model, lambda m: {k: v.to(device) for k, v in collator([longest] * m).items()}, device=device.type,
        autocast="bfloat16" if bf16 else "float16" if fp16 else None, budget_gib=budget_gib,
        limit=opt_batch & -opt_batch, row_tokens=len(longest["input_ids"]), held=held)  # limit: largest power of 2 dividing it
    log(f"trainer: per-device batch {micro} x accumulation {opt_batch // micro} ({probe['reason']})")

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
        output_dir=str(workdir / "trainer"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=opt_batch // micro, learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler, warmup_steps=warmup_steps(params.warmup_ratio, params.max_steps),
        weight_decay=params.weight_decay, max_grad_norm=params.max_grad_norm, max_steps=params.max_steps,
        bf16=bf16, fp16=fp16, optim="adamw_torch_fused", use_liger_kernel=liger, liger_kernel_config=liger_config,
        logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=params.seed, dataloader_num_workers=0,
        remove_unused_columns=False, use_cpu=not cuda)
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
           "peak_memory_gib": gib(peak), "losses": losses, "micro_batch": micro,
           "gradient_accumulation_steps": opt_batch // micro, "micro_batch_probe": probe,
           "speed": {"bf16": args.bf16, "fp16": args.fp16, "optim": getattr(args.optim, "value", str(args.optim)),
                     "liger": liger, **({"liger_kernel_config": liger_config} if liger else {})}}
    del trainer, model
    return row
