"""Issues 13 and 23's measurements; ``scripts/gpu_distributed.sh`` and ``scripts/gpu_two_gpus.sh`` run
it, plain or under torchrun.

  speed   a ``--shape`` of ``loralab.shapes.MODELS`` (default Llama-3-8B; random bf16 weights;
          ``--layers`` cuts the decoder for a CPU dry run), LoRA r32 on every linear layer of the
          decoder, the step ``loralab run`` builds (``loralab.run.step.make_step`` with the adamw
          optimizer part): every ``speed`` setting at its default (on CUDA: bf16 autocast, regional
          compile, packing, CUDA graphs on one GPU, the micro-batch probed) unless a flag says
          otherwise (``--no-graphs``, ``--no-compile``, ``--micro-batch N``, ``--grad-reduce``).
          ``--batch`` is the optimizer batch of all ranks (rows of ``--length`` tokens). Tokens/s
          over the ``--steps`` after ``--warmup`` (compile, captures and the probe not timed).
          Runs on CPU too (gloo; ``--device cpu``) for a dry run of the script.
  fsdp    Llama-3-8B shape full fine-tuning: fp32 weights, bf16 compute (FSDP2 gathers in bf16,
          reduces in fp32), AdamW; FSDP2 over every rank (``distributed.wrap``). Per-GPU peak memory.
  corda   CorDA's calibration statistics (input covariances of every linear layer) of MiniLM-L6
          over 256 real SST-2 sentences, one process or data-parallel
          (``decomposition.parallel.collect_input_stats``), saved to ``--save``.
One JSON line on stdout (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from loralab import distributed
from loralab.decomposition import parallel
from loralab.run.step import Step, make_step
from loralab.shapes import LLAMA3_8B, MODELS


def llama_8b(dtype: torch.dtype, device: torch.device, shape: str = "llama-3-8b", layers: int | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(MODELS[shape])  # MODELS["llama-3-8b"] is LLAMA3_8B
    if layers:
        spec["num_hidden_layers"] = layers
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def rows(n: int, length: int, seed: int, vocab: int = LLAMA3_8B["vocab_size"]) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g).tolist()
    return [{"input_ids": r, "labels": r} for r in ids]


def peaks(device) -> list[float | None]:
    """Peak allocated GiB of every rank (rank order); None on CPU."""
    mine = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if not distributed.current().distributed:
        return [mine]
    out = [None] * distributed.current().world_size
    torch.distributed.all_gather_object(out, mine)
    return out


def timed(step: Step, batch: int, length: int, warmup: int, steps: int, device, vocab: int = LLAMA3_8B["vocab_size"]) -> dict:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for k in range(warmup):
        step(rows(batch, length, seed=k, vocab=vocab))
    sync()
    distributed.barrier()
    t0 = time.perf_counter()
    losses = []
    for k in range(steps):
        losses.append(step(rows(batch, length, seed=warmup + k, vocab=vocab)).loss)
    sync()
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": batch * length * steps / seconds, "step_s": seconds / steps,
            "losses": [float(x) for x in losses]}


def speed(args, launch, device) -> dict:
    from peft import LoraConfig, get_peft_model

    from loralab.config import build_parameters
    from loralab.methods.lora import ADAMW

    model = llama_8b(torch.bfloat16, device, args.shape, args.layers)
    vocab = model.config.vocab_size
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=targets))
    optimizer = ADAMW.make(model, None, build_parameters({"learning_rate": 1e-5, "weight_decay": 0.0}))  # the run's
    settings = {"grad_reduce": args.grad_reduce}  # the rest: loralab run's defaults, resolved for this device
    if args.no_graphs:
        settings["cuda_graphs"] = False
    if args.no_compile:
        settings["compile"] = False
    if args.micro_batch != "auto":
        settings["micro_batch"] = int(args.micro_batch)
    probe_rows = rows(args.batch, args.length, seed=10_000, vocab=vocab)  # the probe's samples (not timed)
    step, resolved = make_step(model, optimizer, speed=settings, kind="causal_lm", dtype="bfloat16", device=device,
                               features=probe_rows, batch_size=args.batch // launch.world_size, limit=args.batch // launch.world_size,
                               max_length=args.length, pad_id=0, max_grad_norm=1.0, launch=launch,
                               log=print if launch.is_main else (lambda s: None))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the probe's own peaks are in its record
    out = timed(step, args.batch, args.length, args.warmup, args.steps, device, vocab)
    record = resolved.record()
    return {**out, "speed": record, "cuda_graphs": step.trainer.graphed and step.trainer.graphs > 0,
            "graphs_captured": step.trainer.graphs, "compile": record["compile"], "micro_batch_per_rank": step.micro_batch,
            "ddp_wrapper": step.wrapped is not None, "peak_gib": peaks(device)}


def fsdp(args, launch, device) -> dict:
    if not launch.distributed:
        raise SystemExit("fsdp: run under torchrun with 2 or more processes")
    model = llama_8b(torch.float32, device)  # fp32 master weights: 16 B/param with AdamW, 128 GB at 8B
    model.requires_grad_(True)

    def adamw():  # over the DTensors make_step's FSDP2 wrap leaves
        params = [p for p in model.parameters() if p.requires_grad]
        try:
            return torch.optim.AdamW(params, lr=1e-5, fused=True)
        except (RuntimeError, TypeError):  # fused AdamW without DTensor support
            return torch.optim.AdamW(params, lr=1e-5, foreach=True)

    settings = {"autocast": "bfloat16", "compile": False, "cuda_graphs": False, "packing": False,
                "micro_batch": "auto" if args.micro_batch == "auto" else int(args.micro_batch)}
    step, _ = make_step(model, None, speed=settings, kind="causal_lm", dtype="float32", device=device, features=[],
                        batch_size=args.batch, limit=args.batch, max_length=args.length, pad_id=0, max_grad_norm=1.0,
                        launch=launch, remake_optimizer=adamw, log=print if launch.is_main else (lambda s: None))
    optimizer, params = step.optimizer, [p for p in model.parameters() if p.requires_grad]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    out = timed(step, args.batch, args.length, args.warmup, args.steps, device)
    return {**out, "parameters": sum(p.numel() for p in params), "optimizer": type(optimizer).__name__,
            "fused": bool(optimizer.defaults.get("fused")), "peak_gib": peaks(device)}


def corda(args, launch, device) -> dict:
    from loralab.models import load_model, load_tokenizer

    model = load_model("packaged:minilm-l6", "seq_cls", 2, "float32").to(device)
    tok = load_tokenizer("packaged:minilm-l6")
    path = os.path.join(os.environ.get("LORALAB_DATA_DIR", ".devdata"), "glue", "SST-2", "train.tsv")
    with open(path) as fh:
        sentences = [line.split("\t")[0] for _, line in zip(range(257), fh)][1:]  # 256 real sentences
    batches = []
    for k in range(0, len(sentences), 32):
        enc = tok(sentences[k:k + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n}
    t0 = time.perf_counter()
    stats = parallel.collect_input_stats(model, modules, batches, progress=False)
    seconds = time.perf_counter() - t0
    if launch.is_main and args.save:
        torch.save({"|".join(st.names): (st.cov.cpu(), st.samples) for st in stats}, args.save)
    return {"groups": len(stats), "samples": stats[0].samples, "seconds": seconds}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("speed", "fsdp", "corda"))
    parser.add_argument("--batch", type=int, default=64, help="optimizer batch (rows)")
    parser.add_argument("--micro-batch", default="auto", help="rows per forward, per rank (speed: auto = the run's "
                        "probe; fsdp: give a number)")
    parser.add_argument("--grad-reduce", default="ddp", choices=("ddp", "after_backward"), help="speed.grad_reduce")
    parser.add_argument("--shape", default="llama-3-8b", help="a loralab.shapes.MODELS name (speed)")
    parser.add_argument("--layers", type=int, help="decoder layers (a cut shape for a CPU dry run)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-graphs", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--save")
    args = parser.parse_args()
    launch = distributed.init(args.device, "fsdp" if args.mode == "fsdp" else "ddp")
    device = distributed.device_for(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        result = {"speed": speed, "fsdp": fsdp, "corda": corda}[args.mode](args, launch, device)
        if launch.is_main:
            print(json.dumps({"mode": args.mode, "world_size": launch.world_size, "backend": launch.backend,
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              **vars(args), **result}), flush=True)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
