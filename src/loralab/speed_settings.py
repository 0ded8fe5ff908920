"""Speed settings (``training_parameters.json``'s ``speed``): their defaults, checks and what "auto" means per
device, task and base dtype, in one place (``Speed``). ``loralab.config`` holds them as one nested key of the
training parameters and checks them through ``Speed.problems``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

GRAD_REDUCE = ("ddp", "after_backward")  # speed.grad_reduce's values (see Speed)
FP8_QUANTIZE_KERNELS = ("torch", "triton")  # speed.fp8_quantize_kernel's: torch ops (speed/fp8.py) or speed/fp8_kernels
FUSED_AND = ("'speed.{key}' = true with 'speed.fused_lora' = true: both rewrite LoRA's forward; "
             "set {key} to \"auto\" or false, or fused_lora to false")  # key: lora_scale_at_rank, lora_shared_input
FP8_FAST_ACCUM = ("none", "forward", "all")  # speed.fp8_fast_accum's: which FP8 GEMMs accumulate fast (speed/fp8.py)
FP8_REFRESH_KERNELS = ("cublas", "triton")  # speed.fp8_refresh_kernel's (besides "auto"): speed/dora_refresh.use_refresh_kernel
FP8_ONLY_SPEED = ("fp8_transpose_cache", "fp8_quantize_kernel", "fp8_fast_accum", "fp8_fused_qkv",
                  "fp8_refresh_kernel")  # on an FP8 base only


ACTIVATION_BUDGET = 0.8  # speed.activation_memory_budget "auto" where layers compile: 8B shape, H100, 2 x 512 rows:
# 0.983x tokens/s, 1.52 GiB less, so bf16 LoRA's probe takes micro-batch 2 (results/bench-actbudget-h100)
LOSS_CHUNK = 1024
"""``speed.loss_chunk_size`` "auto": tokens per loss chunk, unless the probe shrinks it (run/probe.py)."""


@dataclass
class Speed:
    """How a run computes its steps (``training_parameters.json``'s ``speed``): defaults, checks and
    what ``"auto"`` means per device, task kind and base dtype (``resolve``), in one place. An
    explicit value always wins; the resolved values go into the record's ``train_info.speed``.
    None of them changes the optimizer batch; the exact rewrites do not change the numbers either."""

    fast_dora: bool = True  # exact: peft's DoRA forward swapped for speed/fast_dora (same adapter format)
    chunked_loss: bool = True  # exact: fused LM head + chunked cross-entropy, no full logits (speed/losses)
    cuda_graphs: bool | str = "auto"  # exact; auto: on CUDA (no kernel-launch overhead; widths bucketed), off on CPU
    fused_lora: bool = False  # exact, but 2.6 % slower than compiled peft layers on Llama-3-8B (H100)
    autocast: str | None = "auto"  # auto: the base dtype on CUDA with a bf16/fp16 base (adapters stay fp32), else null
    compile: bool | str = "auto"  # auto: CUDA causal LMs (regional, +29 % on Llama-3-8B); classification is launch-bound
    packing: bool | str = "auto"  # auto: causal LMs (exact per-token weights, no pad tokens)
    micro_batch: int | str | None = "auto"  # samples (packed: rows) per forward; auto: probed on CUDA, batch_size on CPU
    group_by_length: bool = False  # changes which samples share an optimizer batch: opt in
    memory_fraction: float = field(default=0.25, metadata={"added": True})  # auto micro-batch: the probed peak's cap, share of
    # the GPU; 0.25 = 35.1 GiB of an H200, under the tuned peer's 37.7 GiB at its best (8B LoRA, 8 x 512, issue 22)
    grad_reduce: str = field(default="ddp", metadata={"added": True})  # more than one DDP process: "ddp" (DDP's
    # bucketed all-reduce during the backward; CUDA graphs off) or "after_backward" (one summed all-reduce of the
    # gradients after the last micro-batch, outside any capture, so CUDA graphs stay on: run/reduce.py, issue 23)
    fp8_transpose_cache: float | str = field(default="auto", metadata={"added": True, "old_defaults": (0.0,)})  # FP8
    # base: share of its weight bytes kept column-major for the backward, largest first (speed/fp8.py cache_transposes);
    # auto: what the probed micro-batch leaves of the budget (run/spare_memory.py; 1.055x FP8 LoRA, all cached, H100)
    fp8_quantize_kernel: str = field(default="torch", metadata={"added": True})  # FP8 base: "torch" ops or speed/fp8_kernels
    fp8_fast_accum: str = field(default="all", metadata={"added": True})  # FP8 base: GEMMs without Hopper's float32 promotion
    # (speed/fp8.py use_fast_accum; not exact: <= 3.3e-3 from the rule): 1.053x FP8 LoRA on an H100 (results/bench-speedab-h100)
    fp8_fused_qkv: bool = field(default=True, metadata={"added": True})  # FP8 base: q/k/v as one GEMM (speed/fp8_qkv.py;
    # not bitwise: the input gradient's rows quantise as one)
    fp8_refresh_kernel: str = field(default="auto", metadata={"added": True})  # FP8 base, fast DoRA: the norm refresh's
    # W·Aᵀ by "cublas" (speed/fp8.weights_times) or "triton" (speed/fp8_kernels.weights_times_triton: 1.27x the refresh,
    # 1.014x FP8 DoRA's step, H100); auto: triton on CUDA where it runs (speed/dora_refresh.use_refresh_kernel)
    lora_scale_at_rank: bool | str = field(default="auto", metadata={"added": True, "old_defaults": (False,)})
    # exact: B(s·Ax) for B(Ax)·s (speed/rank_scaling); auto: on unless fused_lora is, or the adapters compute in
    # float16 (where it would take peft's forward); 1.028x, 1.027x FP8 LoRA at the 8B shape: results/bench-fair-h100
    lora_shared_input: bool | str = field(default="auto", metadata={"added": True, "old_defaults": (False,)})  # one GEMM
    # for the LoRA/fast DoRA A's of the projections reading one input (q/k/v, gate/up: speed/shared_input; not bitwise: dx's terms
    # sum in another order); auto: on CUDA for causal LMs unless fused_lora is
    dora_norm_per_step: bool = field(default=True, metadata={"added": True})  # fast DoRA's weight norm once per
    # optimizer step, not per micro-batch (speed/fast_dora refresh_dora_norms; bitwise without autocast, float32 products
    # under it; off under FSDP): 1.119x bf16, 1.035x FP8-base DoRA at the 8B shape, results/bench-dora-h100
    foreach_grad_add: bool | str = field(default="auto", metadata={"added": True, "old_defaults": (False,)})  # exact
    # (bitwise): the graphed step takes a micro-batch's gradients by torch.autograd.grad and adds them into its fixed
    # buffers with one foreach add per dtype, where autograd adds each with a kernel of its own (speed/graphs.backward_into);
    # auto: where the trainable tensors hold at most 1/8 of the model's bytes (adapters, not full fine-tuning, whose
    # gradients would be alive together until the add; the micro-batch probe's trial does not hold them): 1.005x FP8
    # LoRA (within the readings' spread), 1.007x FP8 DoRA at the 8B shape, micro-batch 4, one H100, three alternating
    # readings each (results/bench-foreach-h100; other bases not measured)
    micro_batch_probe: dict | None = field(default=None, metadata={"code_only": True})  # what make_step chose and why
    fp8_transposes_cached: dict | None = field(default=None, metadata={"code_only": True})  # what prepare_model cached
    lora_scaled_at_rank: dict | None = field(default=None, metadata={"code_only": True})  # layers it took (of all)
    lora_shared_inputs: dict | None = field(default=None, metadata={"code_only": True})  # groups it made, their layers
    fp8_qkv_trios: dict | None = field(default=None, metadata={"code_only": True})  # q/k/v trios fp8_fused_qkv fused
    masked_width_guard: bool | None = field(default=None, metadata={"code_only": True})  # speed/attention.MaskedWidths
    compile_backend: str = field(default="inductor", metadata={"code_only": True})  # set by code, not by experiments
    activation_memory_budget: float | str = field(default="auto", metadata={"added": True})  # compiled layers: torch's
    # memory-budget partitioner (speed/step.py; 1.0: its min-cut); auto: ACTIVATION_BUDGET; 1.0 where no layer compiles
    loss_chunk_size: int | str = field(default="auto", metadata={"added": True, "old_defaults": (LOSS_CHUNK,)})
    # tokens per chunk of the fused LM-head loss (speed/losses; exact at any size), ~10 bytes a token and word on the
    # step's peak; auto: LOSS_CHUNK, or 128 where the probe finds a micro-batch fits only so (run/probe.py)

    @classmethod
    def experiment_keys(cls) -> list[str]:
        """The keys an experiment's ``speed`` holds (every field but the code-only ones)."""
        return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("code_only")]

    @staticmethod
    def problems(speed: dict[str, Any]) -> list[str]:
        """Every problem of an experiment's ``speed`` dict (all keys present), one line each."""
        types = {f.name: f.type for f in dataclasses.fields(Speed) if not f.metadata.get("code_only")}
        problems = [f"'speed.{k}' = {speed[k]!r} must be true or false"
                    for k, t in types.items() if t == "bool" and not isinstance(speed[k], bool)]
        problems += [f"'speed.{k}' = {speed[k]!r} must be true, false or \"auto\"" for k, t in types.items()
                     if t == "bool | str" and not (isinstance(speed[k], bool) or speed[k] == "auto")]
        if speed["autocast"] not in (None, "auto", "bfloat16", "float16"):
            problems.append(f"'speed.autocast' = {speed['autocast']!r} is not allowed; allowed: auto, null, bfloat16, float16")
        for k, auto in (("memory_fraction", ""), ("activation_memory_budget", '"auto" or ')):
            if not (type(speed[k]) in (int, float) and 0 < speed[k] <= 1 or auto and speed[k] == "auto"):
                problems.append(f"'speed.{k}' = {speed[k]!r} must be {auto}a number in (0, 1]")
        if speed["compile"] is False and speed["activation_memory_budget"] not in (1, "auto"):
            problems.append(f"'speed.activation_memory_budget' = {speed['activation_memory_budget']!r} with 'speed.compile' "
                            "= false: the budget acts on compiled layers; set compile to true, or the budget to \"auto\"")
        if not (type(cache := speed["fp8_transpose_cache"]) in (int, float) and 0 <= cache <= 1 or cache == "auto"):
            problems.append(f"'speed.fp8_transpose_cache' = {cache!r} must be \"auto\" or a number in [0, 1] (of the FP8 bytes)")
        for key, allowed in (("grad_reduce", GRAD_REDUCE), ("fp8_quantize_kernel", FP8_QUANTIZE_KERNELS),
                             ("fp8_fast_accum", FP8_FAST_ACCUM), ("fp8_refresh_kernel", ("auto", *FP8_REFRESH_KERNELS))):
            if speed[key] not in allowed:
                problems.append(f"'speed.{key}' = {speed[key]!r} is not allowed; allowed: {', '.join(allowed)}")
        if speed["foreach_grad_add"] is True and speed["cuda_graphs"] is False:
            problems.append("'speed.foreach_grad_add' = true with 'speed.cuda_graphs' = false: it adds into the graphed "
                            "step's fixed gradient buffers; set cuda_graphs to true or \"auto\", or foreach_grad_add "
                            "to false or \"auto\"")
        problems += [FUSED_AND.format(key=k) for k in ("lora_scale_at_rank", "lora_shared_input")
                     if speed["fused_lora"] is True and speed[k] is True]
        for k, unit in (("loss_chunk_size", " (tokens per chunk)"), ("micro_batch", "")):
            if not (speed[k] == "auto" or (isinstance(speed[k], int) and not isinstance(speed[k], bool) and speed[k] > 0)):
                problems.append(f"'speed.{k}' = {speed[k]!r} must be \"auto\" or a positive integer{unit}")
        return problems

    def resolve(self, *, device_type: str, kind: str, base_dtype: str) -> Speed:
        """A copy with every ``"auto"`` replaced for this run: ``device_type`` ``cuda``/``cpu``, task
        ``kind`` ``causal_lm``/``seq_cls``, the experiment's ``dtype``. ``micro_batch`` stays "auto" on CUDA, and with
        it a causal LM's ``loss_chunk_size``; ``fp8_transpose_cache`` stays "auto" on CUDA (an explicit micro-batch is
        measured once for it): only a memory probe with the built model settles them (``loralab.run.micro_batch``)."""
        cuda, causal = device_type == "cuda", kind == "causal_lm"
        auto = {"cuda_graphs": cuda, "autocast": base_dtype if cuda and base_dtype in ("bfloat16", "float16") else None,
                "compile": cuda and causal, "packing": causal, **({} if cuda else {"micro_batch": None}),
                "fp8_transpose_cache": "auto" if cuda else 0.0,  # CPU: no measured memory, nothing spare
                "fp8_refresh_kernel": "auto" if cuda else "cublas"}  # CUDA: prepare_model settles it from the layers
        out = dataclasses.replace(self, **{k: v for k, v in auto.items() if getattr(self, k) == "auto"})
        out.cuda_graphs = bool(out.cuda_graphs and cuda)  # an explicit true on CPU: nothing to capture
        if not out.cuda_graphs:  # no graphed step: autograd's own accumulation (else make_step settles "auto")
            out.foreach_grad_add = False
        if out.loss_chunk_size == "auto" and not (cuda and causal and out.chunked_loss and out.micro_batch == "auto"):
            out.loss_chunk_size = LOSS_CHUNK  # else the probe settles it (loralab.run.micro_batch)
        if out.activation_memory_budget == "auto" or not out.compile:  # no compiled layer: nothing to partition
            out.activation_memory_budget = ACTIVATION_BUDGET if out.compile else 1.0
        if out.lora_scale_at_rank == "auto":
            out.lora_scale_at_rank = out.fused_lora is not True and "float16" not in (base_dtype, out.autocast)
        if out.lora_shared_input == "auto":
            out.lora_shared_input = cuda and causal and out.fused_lora is not True
        return out

    def record(self) -> dict[str, Any]:
        """The experiment keys and values as the record holds them, plus what code set (``micro_batch_probe``,
        ``fp8_transposes_cached``, ``lora_scaled_at_rank``, ``lora_shared_inputs``) once set."""
        found = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.type == "dict | None" and getattr(self, f.name)}
        return {**{k: getattr(self, k) for k in self.experiment_keys()}, **found}


def _speed_defaults() -> dict[str, Any]:
    return Speed().record()
