"""Does ``speed.lora_shared_input`` train like peft's own forward? Loss curves on CPU with a real pretrained model.

    python scripts/shared_input_loss_cpu.py [--steps 20] [--batch 8] [--length 192] [--layers N] [--output F.json]

``speed.lora_shared_input`` (speed/shared_input.py) is on by default on CUDA and not bitwise: the adapters' input
gradient sums over the joined rank of q/k/v (gate/up) in one GEMM where peft sums three products. This runs the same
LoRA (r 16, alpha 16, every linear layer of the decoder, seed 0) on SmolLM2-135M-Instruct's pretrained weights
(``packaged:smollm2-135m``) over the same optimizer batches of real GSM8K training problems (``--steps`` steps of
``--batch``, at most ``--length`` tokens each, from ``$LORALAB_DATA_DIR/gsm8k/train.jsonl`` as
``fp8_loss_curves.batches`` reads them; AdamW at 2e-4), through ``loralab run``'s step (``run.step.make_step``),
four times: float32 and bf16 (bf16 weights under bf16 autocast, as the step runs a bf16 base on CUDA), each with the
shared product off and on. It reports the largest loss difference at one step between

- shared on and off in bf16 (what the default changes on a GPU's dtype) and in float32 (the summation order alone);
- bf16 and float32 with it off (the yardstick: how far bf16's own rounding moves the same run).

Exact elsewhere: the forward is bit for bit peft's, so the first loss of each pair is equal. CPU: torch's CPU
kernels are deterministic, so two identical runs give the same curve (no run-to-run floor to subtract). Writes one
JSON object (curves, gaps, seconds, the resolved speed settings) to ``--output`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from fp8_loss_curves import batches  # scripts/ is on sys.path: the same GSM8K rows and tokenizer


def curve(dtype: str, shared: bool, rows: list[dict], args, pad_id: int) -> dict:
    from peft import LoraConfig, get_peft_model

    from loralab.config import build_parameters
    from loralab.methods.lora import ADAMW
    from loralab.models import load_model
    from loralab.run.build import seed_everything
    from loralab.run.step import make_step

    seed_everything(0)
    model = load_model("packaged:smollm2-135m", "causal_lm", dtype=dtype)
    if args.layers:
        model.model.layers = model.model.layers[:args.layers]
        model.config.num_hidden_layers = args.layers
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    optimizer = ADAMW.make(model, None, build_parameters({"learning_rate": 2e-4, "weight_decay": 0.0}))
    speed = {"lora_shared_input": shared, "autocast": "bfloat16" if dtype == "bfloat16" else None}
    step, resolved = make_step(model, optimizer, speed=speed, kind="causal_lm", dtype=dtype, device=torch.device("cpu"),
                               features=rows[:args.batch], batch_size=args.batch, limit=args.batch,
                               max_length=args.length, pad_id=pad_id, log=lambda line: None)
    losses, start = [], time.perf_counter()
    for k in range(args.steps):
        losses.append(float(step(rows[k * args.batch:(k + 1) * args.batch]).loss))
    return {"losses": losses, "seconds": round(time.perf_counter() - start, 1), "speed": resolved.record()}


def gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=192)
    parser.add_argument("--layers", type=int, help="decoder layers kept (a cut model; default: all 30)")
    parser.add_argument("--output")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from loralab.models import load_tokenizer

    tokenizer = load_tokenizer("packaged:smollm2-135m")
    rows = [row for step in batches(args.steps, args.batch, args.length) for row in step]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    curves = {}
    for dtype in ("float32", "bfloat16"):
        for shared in (False, True):
            name = f"{'fp32' if dtype == 'float32' else 'bf16'}_{'shared' if shared else 'peft'}"
            curves[name] = curve(dtype, shared, rows, args, pad_id)
            print(name, curves[name]["seconds"], "s", [round(x, 4) for x in curves[name]["losses"]], flush=True)
    out = {"model": "packaged:smollm2-135m", "layers": args.layers or 30, "steps": args.steps, "batch": args.batch,
           "length": args.length, "tokens": sum(len(r["input_ids"]) for r in rows), "torch": torch.__version__,
           "curves": curves,
           "gap_shared_vs_peft_bf16": gap(curves["bf16_shared"]["losses"], curves["bf16_peft"]["losses"]),
           "gap_shared_vs_peft_fp32": gap(curves["fp32_shared"]["losses"], curves["fp32_peft"]["losses"]),
           "gap_bf16_vs_fp32": gap(curves["bf16_peft"]["losses"], curves["fp32_peft"]["losses"])}
    out["first_losses_equal"] = all(curves[f"{d}_shared"]["losses"][0] == curves[f"{d}_peft"]["losses"][0]
                                    for d in ("fp32", "bf16"))
    print(json.dumps({k: v for k, v in out.items() if k != "curves"}, indent=1))
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
