"""Text generation for the generative evaluations: one call, two backends, identical semantics.

- ``vllm``: used when vLLM is importable and CUDA is available (``backend="auto"``), as CorDA's and
  seed 000's GSM8K/MATH scripts do. vLLM needs a model on disk, so an in-memory (peft) model is
  merged into a copy and saved to a temporary folder first.
- ``transformers``: batched ``model.generate`` with **left padding** (decoder-only models must
  continue right after the prompt), prompts sorted by length so each batch pads little.

Both return only the new text (the prompt is not repeated, as vLLM's ``output.text``), and both
cut every completion at the first stop string, the stop string itself excluded (vLLM's
``stop=...`` semantics, and bigcode's ``_stop_at_stop_token``). The transformers backend also stops
generating early once every sequence of a batch holds a stop string, via transformers'
``stop_strings``; the truncation after generation is what defines the result in both backends.

``max_length`` (bigcode's ``max_length_generation``: prompt + completion tokens) gives each prompt
its own budget of ``max_length - len(prompt)`` new tokens.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from loralab import distributed

BACKENDS = ("auto", "transformers", "vllm")


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    max_length: int | None = None
    """Prompt + completion budget in tokens (bigcode); when set it bounds max_new_tokens per prompt."""
    temperature: float = 0.0
    """0 = greedy (or beam search when num_beams > 1)."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k filtering (bigcode's default)."""
    num_beams: int = 1
    n_samples: int = 1
    stop: list[str] = field(default_factory=list)
    batch_size: int = 16
    backend: str = "auto"
    seed: int = 0


def truncate_at_stop(text: str, stop: list[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1 and i < cut:
            cut = i
    return text[:cut]


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"generation backend {backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if importlib.util.find_spec("vllm") is not None:
        import torch

        if torch.cuda.is_available():
            return "vllm"
    return "transformers"


def generate(model, tokenizer, prompts: list[str], settings: GenerationSettings, progress: str | None = None) -> list[list[str]]:
    """``settings.n_samples`` completions for each prompt, stop strings applied."""
    backend = resolve_backend(settings.backend)
    run = _generate_vllm if backend == "vllm" else _generate_transformers
    outputs = run(model, tokenizer, prompts, settings, progress)
    return [[truncate_at_stop(c, settings.stop) for c in sample] for sample in outputs]


def _generate_transformers(model, tokenizer, prompts, settings: GenerationSettings, progress):
    import torch
    from tqdm import tqdm

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[list[str]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sampling = settings.temperature > 0
    kwargs = {"do_sample": sampling, "num_beams": settings.num_beams, "num_return_sequences": settings.n_samples,
              "pad_token_id": tokenizer.pad_token_id}
    if sampling:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    else:  # explicit, so a model's own generation_config cannot switch sampling on
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if settings.stop:
        kwargs.update(stop_strings=list(settings.stop), tokenizer=tokenizer)
    torch.manual_seed(settings.seed)
    batches = [order[i:i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    batches = distributed.share(batches)  # under DDP each rank generates its share (greedy: same outputs)
    try:
        for batch in tqdm(batches, desc=progress or "generate", disable=progress is None or not distributed.is_main()):
            budgets = [_budget(len(encoded[i]), settings) for i in batch]
            padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(device)
            with torch.no_grad():
                out = model.generate(**padded, max_new_tokens=max(budgets), **kwargs)
            new = out[:, padded["input_ids"].shape[1]:]
            for row, i in enumerate(batch):
                for s in range(settings.n_samples):
                    tokens = new[row * settings.n_samples + s][: budgets[row]]
                    results[i].append(tokenizer.decode(tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return distributed.merge_shared(results)


def _budget(prompt_tokens: int, settings: GenerationSettings) -> int:
    if settings.max_length is None:
        return settings.max_new_tokens
    return max(1, min(settings.max_new_tokens, settings.max_length - prompt_tokens))


def _generate_vllm(model, tokenizer, prompts, settings: GenerationSettings, progress):
    """vLLM on a merged on-disk copy of ``model`` (untested here: the CPU machines have no vLLM)."""
    import copy
    import tempfile

    from vllm import LLM, SamplingParams

    with tempfile.TemporaryDirectory(prefix="loralab-vllm-") as folder:
        merged = copy.deepcopy(model)
        if hasattr(merged, "merge_and_unload"):
            merged = merged.merge_and_unload()
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del merged
        llm = LLM(model=folder, gpu_memory_utilization=0.8, seed=settings.seed)
        params = []
        for p in prompts:
            n_prompt = len(tokenizer(p)["input_ids"])
            params.append(SamplingParams(
                n=settings.n_samples, temperature=settings.temperature, top_p=settings.top_p,
                top_k=settings.top_k if settings.top_k > 0 else -1, max_tokens=_budget(n_prompt, settings),
                stop=list(settings.stop) or None, seed=settings.seed,
            ))
        if settings.num_beams > 1:
            raise ValueError("beam search (num_beams > 1) is only implemented in the transformers backend")
        outputs = llm.generate(prompts, params)
        return [[o.text for o in out.outputs] for out in outputs]
