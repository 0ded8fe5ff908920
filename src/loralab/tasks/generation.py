r"""Text generation for the generative evaluations: one call, three backends, identical semantics.

- ``engine``: loralab's own generation engine (``loralab.engine``): continuous batching over a
  slot KV cache, CUDA graphs for the decode step, the model's own (peft) modules. ``backend="auto"``
  picks it whenever the model is one it runs and no beam search is asked for.
- ``transformers``: batched ``model.generate`` with **left padding** (decoder-only models must
  continue right after the prompt), prompts sorted by length so each batch pads little. The
  reference backend, and the one beam search (``num_beams > 1``) runs on.
- ``vllm``: only when asked (it pins its own torch/CUDA and needs a model on disk: an in-memory
  peft model is merged into a copy and saved to a temporary folder first).

All return only the new text (the prompt is not repeated, as vLLM's ``output.text``), and all cut
every completion at the first stop string, the stop string itself excluded (vLLM's ``stop=...``
semantics, and bigcode's ``_stop_at_stop_token``). Stop strings are searched in the **generated
text only**: transformers' own ``stop_strings`` also match across the end of the prompt (a prompt
ending in "\n" with a stop string "\nclass" stopped after one token), so the transformers backend
stops early through ``_generated_stop`` instead. The truncation after generation is what defines
the result in every backend.

Randomness: the engine samples with a generator per request and sample (seeded from ``seed``, the
request's index and the sample's); the transformers backend seeds inside ``torch.random.fork_rng``.
Neither reads or advances the caller's global random state, so evaluating during training
(``eval_steps``) leaves the training run as it would have been without it.

Why each completion ended (``finish``: ``finish_reason`` "stop" / "length", ``stop_reason``,
``new_tokens``; ``loralab.tasks.finish``) comes from what each backend knows at the end, by one rule
on the uncut text: the engine's ``Ending`` per sample; transformers' first EOS in the row, or the step
its stop criterion first fired; vLLM's own ``finish_reason``. Greedy rows of the engine and
transformers carry identical values.

``max_length`` (bigcode's ``max_length_generation``: prompt + completion tokens) gives each prompt
its own budget of ``max_length - len(prompt)`` new tokens.

Under DDP each rank generates its share of the prompts (``distributed.share``) and every rank gets
all completions in input order; sampling seeds follow the prompt's index in the whole call, so the
completions are those of one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loralab import distributed
from loralab.tasks.finish import eos_text, finish_fields, row_ending, vllm_finish
from loralab.tasks.progress import Progress, note  # noqa: F401  (note: re-exported for evaluate)

BACKENDS = ("auto", "engine", "transformers", "vllm")


@dataclass
class GenerationSettings:
    """How to generate: the budget, decoding, stop strings and the backend's own knobs.

    Decoding: ``temperature`` 0 is greedy (beam search when ``num_beams`` > 1, transformers only);
    above 0 it samples with ``top_p`` / ``top_k`` (0 = off) from a generator seeded by ``seed``, the
    prompt's index and the sample's. ``n_samples`` completions per prompt (pass@k; with greedy
    decoding they are identical, and ``generate`` warns). ``stop``: strings that end a completion,
    matched in the generated text only and cut from it (a single string is taken as one stop
    string). Backend knobs: ``batch_size`` is the transformers backend's batch; ``slots`` and
    ``memory_fraction`` are the engine's. No chat template is applied: the prompt is the text
    given. Raises ValueError for a value out of range (the field, the value, what is allowed)."""
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
    slots: int = 512
    """Engine: sequences decoded together (fewer when the KV-cache budget holds fewer)."""
    memory_fraction: float = 0.9
    """Engine: fraction of the GPU's free memory the KV cache may take."""

    def __post_init__(self):
        if isinstance(self.stop, str):  # one stop string, not its characters
            self.stop = [self.stop]
        problems = [f"{name} = {value!r}: {rule}" for name, value, rule in setting_problems(vars(self))]
        if problems:
            raise ValueError("generation settings: " + "; ".join(problems))


_POSITIVE = (lambda v: isinstance(v, int) and v >= 1, "must be a positive whole number")
RULES = {
    "max_new_tokens": _POSITIVE,
    "max_length": (lambda v: v is None or v >= 2, "must be None or >= 2"),
    "temperature": (lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "top_k": (lambda v: v >= 0, "must be >= 0 (0 = off)"),
    "num_beams": _POSITIVE,
    "n_samples": _POSITIVE,
    "batch_size": _POSITIVE,
    "slots": _POSITIVE,
    "memory_fraction": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "stop": (lambda v: all(isinstance(s, str) and s for s in v), "must be non-empty strings"),
    "backend": (lambda v: v in BACKENDS, f"allowed: {', '.join(BACKENDS)}"),
}
"""The one check of each ``GenerationSettings`` field: (ok, what is allowed); the settings and
``loralab eval``'s flags both read it."""


def setting_problems(values: dict) -> list[tuple[str, object, str]]:
    """``(field, value, rule)`` for each value in ``values`` (field -> value) that ``RULES`` refuses, a value of
    the wrong type included (a string where a number goes, true/false where a count goes)."""
    def ok(name, value):
        if isinstance(value, bool) and name != "stop":
            return False
        try:
            return bool(RULES[name][0](value))
        except TypeError:
            return False

    return [(name, value, RULES[name][1]) for name, value in values.items() if name in RULES and not ok(name, value)]


def truncate_at_stop(text: str, stop: list[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1 and i < cut:
            cut = i
    return text[:cut]


def resolve_backend(backend: str, model=None, settings: GenerationSettings | None = None) -> str:
    """The backend that runs: ``backend`` unless it is ``auto``, which picks ``engine`` when the engine
    runs ``model`` (any model when ``model`` is None) and no beam search is asked for, else
    ``transformers``. Raises ValueError for an unknown backend, or for ``engine`` asked for a model it
    cannot run or with beam search (the message says why and names the ``transformers`` backend)."""
    if backend not in BACKENDS:
        raise ValueError(f"generation backend {backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
    reason = auto_reason(model, settings)
    if backend == "engine" and reason:
        hint = "; or set num_beams 1 (e.g. loralab eval --options '{\"<task>\": {\"num_beams\": 1}}')" if "beam" in reason else ""
        raise ValueError(f"generation backend 'engine' cannot run this: {reason}; use backend 'transformers'{hint}")
    if backend == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ValueError("generation backend 'vllm' is not installed here (pip install vllm, where it installs "
                             "against your torch); the default backend 'engine' needs nothing more")
    if backend != "auto":
        return backend
    return "transformers" if reason else "engine"


def auto_reason(model, settings: GenerationSettings | None) -> str | None:
    """Why ``auto`` does not pick the engine for ``model`` and ``settings`` (None when it does)."""
    if settings is not None and settings.num_beams > 1:
        return f"beam search (num_beams = {settings.num_beams}) runs on transformers"
    if model is None:
        return None
    from loralab.engine import unsupported_reason

    return unsupported_reason(model)


def generate(model, tokenizer, prompts: list[str], settings: GenerationSettings, progress: str | None = None,
             on_complete=None, stats: dict | None = None, finish: list | None = None) -> list[list[str]]:
    """``settings.n_samples`` completions for each prompt, stop strings applied: ``[len(prompts)][n_samples]``.

    ``on_complete(i, completions)``, when given, is called once per prompt ``i`` (an index into
    ``prompts``) as soon as its samples are finished and cut at the stop strings (the engine: in the
    order prompts finish; transformers: batch by batch; under DDP only for this rank's prompts).
    ``stats``, when given, receives the engine's counters of this rank (``new_tokens``, ``slots``,
    ``decode_steps``, ``prefill_tokens``, ``prefill_s``, ``decode_s``, ``graphs``, ...).
    ``finish``, when given (a list), is set to why each completion ended, ``[len(prompts)][n_samples]`` dicts
    ``{"finish_reason", "stop_reason", "new_tokens"}`` (``loralab.tasks.finish``), every rank's under DDP.
    Raises ValueError for an unknown backend or one that cannot run the model (``resolve_backend``)."""
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"prompt(s) {empty[:5]} of {len(prompts)} are empty: a completion needs text to continue")
    if settings.n_samples > 1 and settings.temperature == 0 and settings.num_beams == 1:
        import warnings

        warnings.warn(f"n_samples = {settings.n_samples} with greedy decoding (temperature 0) gives identical samples; "
                      "set a temperature > 0 for pass@k", stacklevel=2)
    backend = resolve_backend(settings.backend, model, settings)
    run = {"engine": _generate_engine, "vllm": _generate_vllm, "transformers": _generate_transformers}[backend]
    done = None
    if on_complete is not None:
        def done(i, pairs):
            on_complete(i, [truncate_at_stop(c, settings.stop) for c, _ in pairs])
    # each backend: [prompt][sample] -> (text not yet cut at the stop strings, its finish fields)
    outputs = run(model, tokenizer, prompts, settings, progress, done, **({"stats": stats} if backend == "engine" else {}))
    if finish is not None:
        finish[:] = [[f for _, f in sample] for sample in outputs]
    return [[truncate_at_stop(c, settings.stop) for c, _ in sample] for sample in outputs]


def eos_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids as transformers' ``generate`` takes them: the model's generation config,
    else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _generate_engine(model, tokenizer, prompts, settings: GenerationSettings, progress, done, stats=None):
    """The engine on this rank's share of ``prompts``; every rank returns all (text, finish) pairs."""
    from loralab.engine import Engine, Sampling, StopStrings

    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    mine = distributed.share(list(range(len(prompts))))
    results: list[list[tuple]] = [[] for _ in prompts]
    if stats is not None:
        stats["problems"] = len(mine)  # this rank's share (all of them for one process)
    if not mine:
        return distributed.merge_shared(results)
    launch = distributed.current()
    where = (f"of {len(prompts)} on rank {launch.rank}'s engine ({launch.world_size} ranks share them)"
             if len(mine) < len(prompts) else "on loralab's engine")
    merged = " (adapters merged into copies of the layers first)" if getattr(model, "peft_config", None) else ""
    note(f"{len(mine)} problem{'s' if len(mine) != 1 else ''} {where}{merged}", progress)
    engine = Engine(model, max_slots=settings.slots, memory_fraction=settings.memory_fraction)
    started = time.perf_counter()

    def live() -> str:  # what the engine is doing, also while no problem has finished
        stats = getattr(engine, "stats", None) or {}
        if not stats:
            return "merging adapters"
        steps = stats.get("decode_steps", 0)
        if not steps:
            return "prefill"
        # each decode step adds one token to every unfinished sequence
        return f"decode step {steps} ({steps / max(time.perf_counter() - started, 1e-9):.2f}/s)"

    with Progress(len(mine), progress, distributed.is_main(), live=live) as bar:
        def finished(k, samples):
            i = mine[k]
            texts = [tokenizer.decode(s, skip_special_tokens=True) for s in samples]
            results[i] = [(t, finish_fields(t, settings.stop, eos_text(tokenizer, e.eos), len(s)))
                          for t, s, e in zip(texts, samples, engine.endings[k])]
            bar.done(1, sum(len(s) for s in samples))
            if done is not None:
                done(i, results[i])

        sampling = Sampling(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k, seed=settings.seed)
        engine.generate([encoded[i] for i in mine], [_budget(len(encoded[i]), settings) for i in mine],
                        sampling=sampling, n_samples=settings.n_samples, eos_ids=eos_ids(model, tokenizer),
                        stop=StopStrings(tokenizer, list(settings.stop)) if settings.stop else None,
                        request_ids=mine, on_finish=finished)
    if stats is not None:
        stats.update(engine.stats)  # beside this rank's problem count, set above
    return distributed.merge_shared(results)


def _generate_transformers(model, tokenizer, prompts, settings: GenerationSettings, progress, done=None):
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[list[tuple]] = [[] for _ in prompts]
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
    batches = [order[i:i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    batches = distributed.share(batches)  # under DDP each rank generates its share (greedy: same outputs)
    devices = [device] if device.type == "cuda" else []
    eos = eos_ids(model, tokenizer)
    current = {"batch": 0}
    bar = Progress(sum(len(b) for b in batches), progress, distributed.is_main(),
                   live=lambda: f"batch {current['batch']}/{len(batches)}")
    try:
        # sampling seeds inside a fork of the global random state: the caller's (a training run's) is left as it was
        with bar, torch.random.fork_rng(devices=devices):
            torch.manual_seed(settings.seed)
            for number, batch in enumerate(batches, 1):
                current["batch"] = number
                budgets = [_budget(len(encoded[i]), settings) for i in batch]
                padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(device)
                stopped: dict[int, int] = {}  # output row -> its generated length when a stop string was first seen
                if settings.stop:
                    kwargs["stopping_criteria"] = _generated_stop(tokenizer, settings.stop, padded["input_ids"].shape[1],
                                                                  stopped if settings.num_beams == 1 else None)
                with torch.no_grad():
                    out = model.generate(**padded, max_new_tokens=max(budgets), **kwargs)
                new = out[:, padded["input_ids"].shape[1]:]
                generated = 0
                for row, i in enumerate(batch):
                    for s in range(settings.n_samples):
                        tokens = new[row * settings.n_samples + s][: budgets[row]].tolist()
                        count, end = row_ending(tokens, eos, stopped.get(row * settings.n_samples + s),
                                                 tokenizer.pad_token_id if settings.stop and settings.num_beams > 1 else None)
                        generated += count
                        text = tokenizer.decode(tokens, skip_special_tokens=True)
                        results[i].append((text, finish_fields(text, settings.stop, eos_text(tokenizer, end), count)))
                    if done is not None:
                        done(i, results[i])
                bar.done(len(batch), generated)
    finally:
        model.train(was_training)
    return distributed.merge_shared(results)


def _generated_stop(tokenizer, stops: list[str], prompt_width: int, stopped: dict | None = None):
    """A transformers ``StoppingCriteriaList`` ending each row once a stop string is in the text it
    generated (the tokens past the padded prompt, ``prompt_width`` wide), never matching across the
    prompt's end. ``stopped`` (row -> generated length), when given, gets each row's length at its first hit."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from loralab.engine import StopStrings

    checker = StopStrings(tokenizer, list(stops))

    class GeneratedStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            rows = input_ids[:, prompt_width:].tolist()
            hits = [checker.hit(r) for r in rows]
            if stopped is not None:
                for r, hit in enumerate(hits):
                    if hit:
                        stopped.setdefault(r, len(rows[r]))
            return torch.tensor(hits, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([GeneratedStop()])


def _budget(prompt_tokens: int, settings: GenerationSettings) -> int:
    if settings.max_length is None:
        return settings.max_new_tokens
    return max(1, min(settings.max_new_tokens, settings.max_length - prompt_tokens))


def _generate_vllm(model, tokenizer, prompts, settings: GenerationSettings, progress, done=None):
    """vLLM on a merged on-disk copy of ``model`` (``merge.merged_copy``: exact for NF4/LoftQ bases
    and tied embeddings, the model untouched; untested here: no vLLM on these machines)."""
    import tempfile

    from vllm import LLM, SamplingParams

    from loralab.merge import merged_copy

    with tempfile.TemporaryDirectory(prefix="loralab-vllm-") as folder:
        note("merging the adapter into a copy of the model and saving it for vLLM", progress)
        merged = merged_copy(model)
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
        eos = eos_ids(model, tokenizer)
        return [[(o.text, vllm_finish(o, eos, tokenizer)) for o in out.outputs] for out in outputs]
