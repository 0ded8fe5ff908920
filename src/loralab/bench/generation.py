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

Rows and token counting: ``loralab.bench.generation_rows``; the decode-step bound of the card and
the table: ``loralab.bench.generation_table``.
"""

from __future__ import annotations

import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from loralab.bench.generation_rows import (
    RowSkipped,
    Workload,
    clean,
    engine_row,
    generate_batch_row,
    peak_gib,
    transformers_row,
)
from loralab.bench.generation_table import decode_bound

ROWS = ("engine", "transformers", "generate_batch")
STOPPING = ("auto", "budget", "source")
REAL_MODEL = "packaged:smollm2-135m"
GSM8K_TEST = 1319
"""GSM8K test problems (openai/gsm8k main test)."""


@dataclass
class EvalBenchSettings:
    model: str = "random:llama-3-8b"
    """``random:<shape>`` (a shape of ``loralab.shapes.MODELS``) or a real model id."""
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
        clean(settings.device)
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
            row.setdefault("peak_gib", peak_gib(settings.device))
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
    """``results/eval-bench/<model id>--<results.stamp(created_at)>.json``."""
    from loralab.results import stamp

    stem = model_id.replace(":", "-").replace("/", "--")
    return Path("results") / "eval-bench" / f"{stem}--{stamp(created_at)}.json"
