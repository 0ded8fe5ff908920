"""CorDA preprocessing at scale: loralab's attach_corda_eigens against peft's preprocess_corda.

Side by side in one process, on Llama shapes built from their configs (random weights, bf16):
covariance collection + decomposition wall time and peak GPU memory (torch.cuda.max_memory_allocated,
model weights included) for 256 samples x 512 tokens, all seven projections, r=32.
peft runs its documented recipe (batch size 1, one covariance per module, fp32, full SVD); ours
uses padded batches, one covariance per distinct input, TF32-exact products on bf16 inputs and a
partial decomposition (randomized for IPA, fp64 Gram eigh for KPA). The agreement with peft is
reported as the relative Frobenius difference of U S V^T (the adapter's B A) on sampled layers.

    python benchmarks/bench_corda.py --models llama-3.2-1b llama-3-8b --peft-models llama-3.2-1b \\
        --out results/corda/bench_corda_h100.json
    python benchmarks/bench_corda.py --tiny            # CPU smoke test of the script itself
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

CONFIGS = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False),
}
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_QUOTED = {"llama-3.2-1b": (56.0, 9.4), "llama-3-8b": (354.0, 56.3)}  # issue 5: peft 0.21, H100


def build(name: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**CONFIGS[name]))
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def lora_config(r: int, method: str):
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig

    return LoraConfig(r=r, lora_alpha=r, target_modules=PROJ, init_lora_weights="corda",
                      corda_config=CordaConfig(corda_method=method))


def take_eigens(model, keep: set[str]) -> dict:
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "eigens"):
            if name in keep:
                e = m.eigens
                out[name] = ((e.U_WC.float() * e.S_WC.float()) @ e.V_WC.float().t()).cpu()
            del m.eigens
    return out


def measure(fn, device: str) -> tuple[float, float]:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return seconds, peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["llama-3.2-1b", "llama-3-8b"], choices=list(CONFIGS))
    p.add_argument("--peft-models", nargs="*", default=["llama-3.2-1b"], help="models on which peft is run too")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--r", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["ipm", "kpm", "ipm:gram"],
                   help="ours: MODE[:SOLVER], MODE ipm (IPA) or kpm (KPA), SOLVER auto|svd|gram|lowrank")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny config, 8 samples x 32 tokens")
    p.add_argument("--out", default="results/corda/bench_corda.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.peft_models, args.samples, args.seqlen, args.batch_size = ["tiny"], ["tiny"], 8, 32, 4
    from peft.tuners.lora.corda import preprocess_corda

    from loralab.decomposition import attach_corda_eigens

    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "samples": args.samples, "seqlen": args.seqlen, "r": args.r,
              "batch_size": args.batch_size, "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def log(row):
        record["rows"].append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps(record, indent=2))

    for name in args.models:
        model = build(name, device)
        vocab = CONFIGS[name]["vocab_size"]
        gen = torch.Generator().manual_seed(233)
        ids = torch.randint(0, vocab, (args.samples, args.seqlen), generator=gen)
        n_layers = CONFIGS[name]["num_hidden_layers"]
        keep = {f"model.layers.{i}.{blk}.{pr}" for i in (0, n_layers - 1) for blk, prs in
                (("self_attn", PROJ[:4]), ("mlp", PROJ[4:])) for pr in prs}
        reference = {}
        if name in args.peft_models:
            cfg = lora_config(args.r, "ipm")

            def run_model():
                for i in range(args.samples):
                    model(input_ids=ids[i : i + 1].to(device))

            sec, peak = measure(lambda: preprocess_corda(model, cfg, run_model=run_model), device)
            reference["ipm"] = take_eigens(model, keep)
            log({"model": name, "impl": "peft preprocess_corda", "mode": "ipm", "seconds": round(sec, 2),
                 "peak_gib": round(peak, 2), "source": "measured"})
        elif name in PEFT_QUOTED:
            sec, peak = PEFT_QUOTED[name]
            log({"model": name, "impl": "peft preprocess_corda", "mode": "ipm", "seconds": sec, "peak_gib": peak,
                 "source": "quoted from issue 5 (peft 0.21, H100), not re-run"})
        mask = torch.ones_like(ids)
        batches = [{"input_ids": ids[i : i + args.batch_size], "attention_mask": mask[i : i + args.batch_size]}
                   for i in range(0, args.samples, args.batch_size)]
        for spec in args.modes:
            mode, _, solver = spec.partition(":")
            cfg = lora_config(args.r, mode)
            opts = {"normalisation": "count", "progress": False, "solver": solver or "auto"}
            sec, peak = measure(lambda: attach_corda_eigens(model, cfg, batches, options=opts), device)
            mine = take_eigens(model, keep)
            row = {"model": name, "impl": f"loralab attach_corda_eigens (solver {solver or 'auto'})", "mode": mode, "seconds": round(sec, 2),
                   "peak_gib": round(peak, 2), "source": "measured"}
            if mode in reference:
                diffs = [((mine[k] - reference[mode][k]).norm() / reference[mode][k].norm()).item() for k in mine]
                row["rel_diff_vs_peft_max"] = max(diffs)
                row["rel_diff_vs_peft_median"] = sorted(diffs)[len(diffs) // 2]
            log(row)
        del model
        gc.collect()
    print()
    print("| model | implementation | mode | seconds | peak GiB | source |")
    print("|---|---|---|---|---|---|")
    for row in record["rows"]:
        print(f"| {row['model']} | {row['impl']} | {row['mode']} | {row['seconds']} | {row['peak_gib']} | {row['source']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
