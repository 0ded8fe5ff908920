"""The generation engine (``loralab.engine``) on CPU, with a real model and real data (issue 19, "Tests").

**Exactness.** Greedy completions of the ``engine`` backend are token-identical to the
``transformers`` backend (batched ``model.generate``, the reference) on SmolLM2-135M in float32,
for adapters of LoRA, DoRA, PiSSA, LoRA-FA and LoRA on an NF4 base (QLoRA). Each adapter is built by
``loralab.methods`` exactly as a training run builds it (adapter config -> ``choose_method`` ->
``check`` -> ``apply``) and trained for a few real optimizer steps (the method's own optimizer) on
real GSM8K training rows, so B is non-zero and the completions differ from the fresh adapter's
(asserted). Prompts: 64 real prompts each of GSM8K, MBPP and BoolQ built by the evaluation registry
with each evaluation's own stop strings; the engine runs with fewer slots than prompts, so finished
slots are refilled (asserted from the engine's prefill rounds and its stats). A difference is
allowed only at a near-tie: at the first differing token the reference model's top-2 logits at that
prefix (a plain forward) are within ``TIE``; the assertion message shows them.

**Cost.** This CPU is slow and shared (2 cores), so the matrix runs SmolLM2 truncated to its first
``LAYERS`` (2) decoder layers (real weights, real tokenizer, ``model.model.layers[:LAYERS]``): the
engine runs the same code per layer and every layer holds every adapted projection, so depth adds
cost, not coverage (3 layers took 2 min 50 s in CI, 4 over 3.5 minutes; the suite must stay under 15). Its completions are not fluent, which
does not matter for exactness (near-ties are judged by the model's own logits). Budgets are short
(``NEW_TOKENS``). ``test_full_model_lora`` runs all 30 layers with LoRA on 16 GSM8K prompts x 24
tokens, and ``test_eos_*`` the full model's real end of sequence. torch runs one thread here
(``one_thread``). Measured on this machine with another job on the cores (``--durations``): the
file 2 min 50 s; each matrix case 4-8 s, 10-14 s for a method's first (it builds and trains the
adapter); the full model 25 s; the sampling test 6 s; every other test under 3 s.

**Unit properties.** The model is unchanged by a call (state dict bitwise, adapters' ``merged``
flags, train/eval mode); ``merge=False`` gives the same greedy tokens; a prompt ending in "\\n"
with a stop string beginning with "\\n" generates past its first token (transformers' own
``stop_strings`` matched across the prompt's end); stop strings cut at the first stop; EOS ends a
sequence and is not in the text; ``max_length`` budgets per prompt; sampling reproducible per seed
and independent of batch composition; the global RNG untouched; bad input raises ValueError;
``on_complete`` once per prompt with the stop-truncated completions.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from peft import LoraConfig

import loralab.engine
from loralab import methods
from loralab.config import build_parameters
from loralab.data import collate, pad_id
from loralab.engine import Engine, Sampling
from loralab.methods.common import lora_modules, resolve_config
from loralab.methods.context import MethodContext
from loralab.tasks import evaluate as evals
from loralab.tasks import get_task
from loralab.tasks.generation import GenerationSettings, generate

LAYERS = 2
"""Decoder layers of the truncated SmolLM2 the matrix runs (see the module docstring)."""
TASKS = ("gsm8k", "mbpp", "boolq")
N_PROMPTS = 64
NEW_TOKENS = 8
SLOTS = 24
"""Engine slots in the matrix: fewer than ``N_PROMPTS``, and not a divisor of it, so refills happen."""
BATCH = 16
"""The reference backend's batch size."""
TIE = 1e-4
"""Top-2 logit gap under which the first differing token counts as a near-tie."""
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAIN_STEPS = 2

METHODS = {  # name -> (adapter_config.json keys, training_parameters keys), as an experiment folder gives them
    "lora": ({}, {}),
    "dora": ({"use_dora": True}, {}),
    "pissa": ({"init_lora_weights": "pissa"}, {}),
    "lorafa": ({}, {"optimizer": "lorafa"}),
    "qlora": ({}, {"quantization": "nf4"}),
}
EXPECTED_NAMES = {"lora": "lora", "dora": "dora", "pissa": "pissa", "lorafa": "lorafa", "qlora": "qlora"}


# ----------------------------------------------------------------------------- models and data


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread while this file runs: the 2 cores are shared with other jobs, and two OpenMP
    threads contending with them ran a 4-layer case 6-9x slower than one (measured: 27 s vs 4.5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(path, layers: int | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    return model


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="module")
def small_base(smollm2_path):
    """SmolLM2-135M truncated to its first ``LAYERS`` decoder layers, float32."""
    return _load(smollm2_path, LAYERS)


@pytest.fixture(scope="module")
def full_base(smollm2_path):
    return _load(smollm2_path)


@pytest.fixture(scope="module")
def prompts(data_dir) -> dict[str, tuple[list[str], GenerationSettings]]:
    """Per evaluation: its first ``N_PROMPTS`` real prompts and its own settings with short greedy budgets
    (BoolQ's source protocol is 4-beam search, which runs on transformers: greedy here)."""
    out = {}
    for name in TASKS:
        ev = evals.EVALS[name]
        options = evals.resolve_options(name, None)
        problems = ev.load(name, data_dir, N_PROMPTS)
        settings = evals.generation_settings(name, {"max_new_tokens": NEW_TOKENS, "num_beams": 1, "batch_size": BATCH,
                                                    "slots": SLOTS}, options)
        out[name] = ([ev.build_prompt(name, p, options) for p in problems], settings)
        assert len(out[name][0]) == N_PROMPTS
    return out


@pytest.fixture(scope="module")
def train_batches(tokenizer, data_dir):
    """Real GSM8K training rows as the SFT task tokenizes them (answer supervised), in batches of 4."""
    params = build_parameters({"model_id": "packaged:smollm2-135m", "task": "gsm8k", "data_dir": str(data_dir),
                               "max_train_samples": 32, "max_length": 96})
    features = get_task("gsm8k").load(params, tokenizer).train  # rows with no answer token within 96 are dropped
    assert len(features) >= 4 * TRAIN_STEPS
    return [collate(features[i:i + 4], pad_id(tokenizer)) for i in range(0, 4 * TRAIN_STEPS, 4)]


def build_adapter(base, method_name: str, tokenizer, data_dir, *, steps=None, seed: int = 0):
    """``base`` (copied) with the method's adapter, built as ``loralab.run.build`` builds it; then ``steps``
    (batches) of the method's own optimizer, or when None, B set to seeded random values. The fresh
    adapter's weights are kept in ``model.fresh_adapter`` (see ``fresh_adapter``)."""
    adapter, overrides = METHODS[method_name]
    params = build_parameters({"model_id": "packaged:smollm2-135m", "task": "gsm8k", "data_dir": str(data_dir),
                               "learning_rate": 5e-3, "weight_decay": 0.0, **overrides})
    model = copy.deepcopy(base)
    cfg = resolve_config(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, **adapter),
                         "causal_lm")
    method = methods.choose_method(cfg, params)
    assert method.NAME == EXPECTED_NAMES[method_name]
    assert method.check(model, cfg, params) == []
    torch.manual_seed(seed)
    model, _ = method.apply(model, cfg, params, MethodContext(params, [], tokenizer))
    if steps is None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in lora_modules(model):
                b = layer.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
    else:
        model.fresh_adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        optimizer = method.make_optimizer(model, cfg, params)
        model.train()
        for batch in steps:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    if steps is None or steps:
        assert all(layer.lora_B["default"].weight.abs().max() > 0 for _, layer in lora_modules(model))
    return model


@contextlib.contextmanager
def fresh_adapter(model):
    """``model`` with its adapter's weights as they were before training (restored after)."""
    params = dict(model.named_parameters())
    trained = {n: params[n].detach().clone() for n in model.fresh_adapter}
    with torch.no_grad():
        try:
            for n, w in model.fresh_adapter.items():
                params[n].copy_(w)
            yield model
        finally:
            for n, w in trained.items():
                params[n].copy_(w)


# ----------------------------------------------------------------------------- recording what each backend generated


@pytest.fixture
def engines(monkeypatch) -> list:
    """The engines the ``engine`` backend builds during a test, each recording the rows every
    prefill round placed (``placed``: the first fill, then refills) and the token ids it returned."""
    made = []

    class Recording(Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.placed: list[int] = []
            self.tokens = None
            made.append(self)

        def generate(self, *args, **kwargs):
            self.tokens = super().generate(*args, **kwargs)
            return self.tokens

        def _prefill(self, rows, want_logits):
            if want_logits:
                self.placed.append(len(rows))
            return super()._prefill(rows, want_logits)

    monkeypatch.setattr(loralab.engine, "Engine", Recording)
    return made


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    return next((tokens[:i] for i, t in enumerate(tokens) if t in eos), tokens)


@contextlib.contextmanager
def transformers_tokens(model, eos: set[int]):
    """Token ids the ``transformers`` backend generated, by prompt ids (up to the first EOS or pad;
    not cut at a per-prompt budget shorter than the batch's)."""
    got: dict[tuple, list[int]] = {}
    original = model.generate

    def recording(**kwargs):
        out = original(**kwargs)
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        for row in range(ids.shape[0]):
            got[tuple(ids[row][mask[row].bool()].tolist())] = _until_eos(out[row, ids.shape[1]:].tolist(), eos)
        return out

    model.generate = recording
    try:
        yield got
    finally:
        del model.generate


def eos_of(model, tokenizer) -> set[int]:
    from loralab.tasks.generation import eos_ids

    return eos_ids(model, tokenizer) | {tokenizer.pad_token_id if tokenizer.pad_token_id is not None else -1}


def run_both(model, tokenizer, texts, settings, engines, **kwargs):
    """(engine texts, engine token ids, transformers texts, transformers token ids) for ``texts``."""
    from dataclasses import replace

    ids = [tuple(tokenizer(t)["input_ids"]) for t in texts]
    engines.clear()
    got = generate(model, tokenizer, texts, replace(settings, backend="engine"), **kwargs)
    assert len(engines) == 1
    got_ids = [s[0] for s in engines[0].tokens]
    with transformers_tokens(model, eos_of(model, tokenizer)) as recorded:
        ref = generate(model, tokenizer, texts, replace(settings, backend="transformers"), **kwargs)
    return got, got_ids, ref, [recorded[i] for i in ids]


def near_tie(model, prompt_ids: list[int], ref: list[int], got: list[int]) -> tuple[bool, str]:
    """Whether ``got`` first departs from ``ref`` at a near-tie of the reference model, and the story."""
    j = next((k for k, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + ref[:j]])).logits[0, -1].float()
    top = logits.topk(2)
    gap = float(top.values[0] - top.values[1])
    story = (f"first difference at new token {j}: reference {ref[j] if j < len(ref) else 'END'}, engine "
             f"{got[j] if j < len(got) else 'END'}; reference top-2 there: ids {top.indices.tolist()} logits "
             f"{[round(v, 6) for v in top.values.tolist()]} gap {gap:.3g} (a near-tie is < {TIE})")
    return gap < TIE, story


def assert_same_greedy(model, tokenizer, texts, got, got_ids, ref, ref_ids, label: str) -> int:
    """Every completion token-identical (and text-identical) to the reference, except at near-ties;
    returns how many near-ties were allowed."""
    ties = 0
    for i, text in enumerate(texts):
        if got_ids[i] == ref_ids[i]:
            assert got[i] == ref[i], f"{label} prompt {i}: same tokens, different texts {got[i]!r} vs {ref[i]!r}"
            continue
        ok, story = near_tie(model, list(tokenizer(text)["input_ids"]), ref_ids[i], got_ids[i])
        assert ok, (f"{label} prompt {i} (...{text[-60:]!r}): engine {got_ids[i]} != transformers {ref_ids[i]}; {story}")
        ties += 1
    return ties


# ----------------------------------------------------------------------------- exactness


def greedy_departs(model, prompt_ids: list[int], completion: list[int]) -> bool:
    """Whether ``model``'s greedy choice differs somewhere along ``completion`` (teacher-forced: up to
    the first such position its greedy completion is ``completion``, so there it departs)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + completion])).logits[0, len(prompt_ids) - 1:-1]
    return bool((logits.argmax(-1) != torch.tensor(completion)).any())


@pytest.fixture(scope="module")
def adapted(small_base, tokenizer, data_dir, train_batches, prompts):
    """Method name -> the truncated SmolLM2 with that method's trained adapter (built on first use)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_adapter(small_base, name, tokenizer, data_dir, steps=train_batches)
        return cache[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method_name", list(METHODS))
def test_greedy_engine_equals_transformers(method_name, task, adapted, tokenizer, prompts, engines):
    if method_name == "qlora":
        pytest.importorskip("bitsandbytes")
    model = adapted(method_name)
    texts, settings = prompts[task]
    got, got_ids, ref, ref_ids = run_both(model, tokenizer, texts, settings, engines)
    stats, placed = engines[0].stats, engines[0].placed
    assert stats["slots"] == SLOTS < N_PROMPTS
    assert placed[0] == SLOTS and sum(placed) == N_PROMPTS and len(placed) > 1, placed  # refilled
    assert stats["new_tokens"] == sum(len(t) for t in got_ids)
    if method_name != "qlora":  # an NF4 base keeps the model's own forward (nothing to merge)
        assert stats["merged_projections"] == LAYERS * len(TARGETS)
    assert_same_greedy(model, tokenizer, texts, got, got_ids, ref, ref_ids, f"{method_name}/{task}")
    with fresh_adapter(model):  # the trained adapter changes the output: the fresh one would not generate it
        assert any(greedy_departs(model, tokenizer(t)["input_ids"], c) for t, c in zip(texts, ref_ids))
    assert sum(len(t) for t in got_ids) > N_PROMPTS  # real completions, not empty ones


@pytest.mark.slow
def test_full_model_lora(full_base, tokenizer, data_dir, prompts, engines):
    """All 30 layers, LoRA (seeded random B: training the full model would cost minutes here),
    16 GSM8K prompts x 24 tokens through 6 slots."""
    from dataclasses import replace

    model = build_adapter(full_base, "lora", tokenizer, data_dir, steps=None)
    texts, settings = prompts["gsm8k"]
    texts = texts[:16]
    settings = replace(settings, max_new_tokens=24, slots=6, batch_size=8)
    got, got_ids, ref, ref_ids = run_both(model, tokenizer, texts, settings, engines)
    assert engines[0].stats["slots"] == 6 and len(engines[0].placed) > 1
    assert engines[0].stats["merged_projections"] == full_base.config.num_hidden_layers * len(TARGETS)
    assert_same_greedy(model, tokenizer, texts, got, got_ids, ref, ref_ids, "full/lora/gsm8k")
    with model.disable_adapter():  # the adapter changes the completions: the base would not generate them
        assert any(greedy_departs(model, tokenizer(t)["input_ids"], c) for t, c in zip(texts, ref_ids))


# ----------------------------------------------------------------------------- unit properties

BACKENDS = ("engine", "transformers")


@pytest.fixture(scope="module")
def lora_model(adapted):
    return adapted("lora")


@pytest.fixture(scope="module")
def few(prompts) -> list[str]:
    """Six real GSM8K prompts of different lengths."""
    return prompts["gsm8k"][0][:6]


@pytest.mark.parametrize("backend", BACKENDS)
def test_call_leaves_the_model_unchanged(lora_model, tokenizer, few, backend):
    """Weights bitwise, adapters unmerged, every module's train/eval mode and requires_grad as before."""
    model = lora_model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for training in (True, False):
            model.train(training)
            modes = {n: m.training for n, m in model.named_modules()}
            generate(model, tokenizer, few, GenerationSettings(max_new_tokens=3, backend=backend, slots=2, batch_size=4))
            assert {n: m.training for n, m in model.named_modules()} == modes, f"mode not restored after training={training}"
    finally:
        model.eval()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert not any(layer.merged for _, layer in lora_modules(model))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_unmerged_engine_gives_the_same_greedy_tokens(lora_model, tokenizer, prompts):
    texts = prompts["mbpp"][0][:12]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    merged, plain = Engine(lora_model, max_slots=5), Engine(lora_model, max_slots=5, merge=False)
    a = [s[0] for s in merged.generate(ids, [NEW_TOKENS] * len(ids))]
    b = [s[0] for s in plain.generate(ids, [NEW_TOKENS] * len(ids))]
    assert merged.stats["merged_projections"] == LAYERS * len(TARGETS) and plain.stats["merged_projections"] == 0
    for i, (x, y) in enumerate(zip(b, a)):
        if x != y:
            ok, story = near_tie(lora_model, ids[i], x, y)
            assert ok, f"prompt {i}: merged {y} != unmerged {x}; {story}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_string_is_not_matched_across_the_end_of_the_prompt(lora_model, tokenizer, prompts, backend, engines):
    """An MBPP prompt ends in "\\n"; a stop string "\\n" + the first generated token's text would match
    across the prompt's end after one token (transformers' own ``stop_strings`` did): it must not."""
    prompt = prompts["mbpp"][0][0]
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        first = tokenizer.decode([int(lora_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())])
    stops = ["\n" + first, "\n\n", "\nclass"]
    assert prompt.endswith("\n") and stops[0] in prompt + first  # the case that stopped after one token
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, stop=stops, backend=backend)
    with transformers_tokens(lora_model, eos_of(lora_model, tokenizer)) as recorded:
        out = generate(lora_model, tokenizer, [prompt], settings)[0][0]
    tokens = engines[0].tokens[0][0] if backend == "engine" else recorded[tuple(ids)]
    assert len(tokens) > 1 and out.startswith(first), (tokens, out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_strings_cut_at_the_first_stop_and_on_complete_gets_the_cut_text(lora_model, tokenizer, few, backend):
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, backend=backend, slots=2, batch_size=4)
    full = [c[0] for c in generate(lora_model, tokenizer, few, settings)]
    sample = max(full, key=len)
    stops = [sample[-2:], sample[1:3]]  # the later one listed first: the first in the *text* wins
    calls = []
    out = generate(lora_model, tokenizer, few, GenerationSettings(**{**settings.__dict__, "stop": stops}),
                   on_complete=lambda i, completions: calls.append((i, completions)))

    def cut(text):
        return text[:min([text.find(s) for s in stops if s in text], default=len(text))]

    assert [c[0] for c in out] == [cut(t) for t in full]
    assert any(cut(t) != t for t in full) and not any(s in c[0] for s in stops for c in out)
    assert sorted(i for i, _ in calls) == list(range(len(few)))  # once per prompt
    assert all(completions == out[i] for i, completions in calls)


def test_eos_ends_a_sequence_and_is_not_in_the_text(full_base, tokenizer, engines):
    """The full SmolLM2-Instruct answers a chat prompt and ends with <|im_end|> well within its budget."""
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in ("What is 2+2? Answer with one number.", "What is the capital of France? Answer with one word.")]
    settings = GenerationSettings(max_new_tokens=24, slots=1)
    got, got_ids, ref, ref_ids = run_both(full_base, tokenizer, chat, settings, engines)
    assert got == ref and got_ids == ref_ids
    eos = tokenizer.eos_token_id
    assert all(len(t) < 24 and eos not in t for t in got_ids), got_ids
    assert not any(tokenizer.eos_token in c[0] for c in got)
    # any EOS id ends the sequence where it is generated and is not kept: a plain token as EOS
    ids = tokenizer(chat[0])["input_ids"]
    stop_at = got_ids[0][2]
    assert stop_at not in got_ids[0][:2]
    assert Engine(full_base).generate([ids], [24], eos_ids={stop_at}) == [[got_ids[0][:2]]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_length_budgets_each_prompt(lora_model, tokenizer, prompts, backend, engines):
    texts = sorted(prompts["mbpp"][0][:16], key=lambda t: len(tokenizer(t)["input_ids"]))
    texts = [texts[0], texts[len(texts) // 2], texts[-1]]
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    max_length = lengths[1] + 3
    budgets = [8, 3, 1]  # min(max_new_tokens, max_length - prompt), at least 1
    assert lengths[1] - lengths[0] >= 5 and lengths[2] > max_length, lengths
    settings = GenerationSettings(max_new_tokens=8, max_length=max_length, backend=backend)
    with transformers_tokens(lora_model, eos_of(lora_model, tokenizer)) as recorded:
        out = generate(lora_model, tokenizer, texts, settings)
    if backend == "engine":
        assert [len(s[0]) for s in engines[0].tokens] == budgets
    else:
        raw = [recorded[tuple(tokenizer(t)["input_ids"])] for t in texts]
        assert all(len(r) >= b for r, b in zip(raw, budgets))
        assert [c[0] for c in out] == [tokenizer.decode(r[:b], skip_special_tokens=True) for r, b in zip(raw, budgets)]


@pytest.mark.slow
def test_sampling_is_reproducible_and_independent_of_batch_composition(lora_model, tokenizer, prompts, engines):
    from dataclasses import replace

    from loralab.tasks.generation import eos_ids

    few = prompts["mbpp"][0][:5]
    settings = GenerationSettings(max_new_tokens=4, temperature=0.9, top_p=0.95, top_k=50, n_samples=3, seed=7,
                                  backend="engine", slots=4)
    first = generate(lora_model, tokenizer, few, settings)
    tokens = engines[0].tokens
    assert generate(lora_model, tokenizer, few, settings) == first  # same call, same samples
    assert any(len(set(samples)) > 1 for samples in first)  # it does sample
    assert generate(lora_model, tokenizer, few[:1], replace(settings, slots=1)) == first[:1]  # alone
    assert generate(lora_model, tokenizer, few, replace(settings, slots=16)) == first  # other slot counts
    assert generate(lora_model, tokenizer, few, replace(settings, seed=8)) != first
    # another order: a request keeps its seed (its index in the evaluation) wherever it is placed
    order = [3, 0, 4, 1, 2]
    ids = [tokenizer(t)["input_ids"] for t in few]
    shuffled = Engine(lora_model, max_slots=3).generate(
        [ids[k] for k in order], [4] * len(order), n_samples=3, eos_ids=eos_ids(lora_model, tokenizer),
        sampling=Sampling(temperature=0.9, top_p=0.95, top_k=50, seed=7), request_ids=order)
    assert shuffled == [tokens[k] for k in order]


def test_transformers_sampling_is_reproducible(lora_model, tokenizer, few):
    settings = GenerationSettings(max_new_tokens=4, temperature=0.9, n_samples=2, seed=3, backend="transformers")
    assert generate(lora_model, tokenizer, few[:3], settings) == generate(lora_model, tokenizer, few[:3], settings)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("backend", BACKENDS)
def test_global_rng_state_is_untouched(lora_model, tokenizer, few, backend, temperature):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    generate(lora_model, tokenizer, few[:3], GenerationSettings(max_new_tokens=3, temperature=temperature, backend=backend))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_prompt_is_a_value_error_naming_it(lora_model, tokenizer, few, backend):
    # the transformers backend used to turn it into an all-pad row and continue silently
    with pytest.raises(ValueError, match=r"prompt\(s\) \[1\] of 2 are empty"):
        generate(lora_model, tokenizer, [few[0], ""], GenerationSettings(max_new_tokens=2, backend=backend))
    with pytest.raises(ValueError, match=r"prompt\(s\) \[0\] of 1 are empty"):
        generate(lora_model, tokenizer, [""], GenerationSettings(max_new_tokens=2, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_budget_is_a_value_error(lora_model, tokenizer, few, backend):
    with pytest.raises(ValueError, match="budget|max_new_tokens"):
        generate(lora_model, tokenizer, few[:2], GenerationSettings(max_new_tokens=0, backend=backend))


def test_unknown_backend_and_beams_on_the_engine_are_value_errors(lora_model, tokenizer, few):
    with pytest.raises(ValueError, match="backend = 'vlm': allowed: auto, engine, transformers, vllm"):
        generate(lora_model, tokenizer, few[:1], GenerationSettings(backend="vlm"))
    with pytest.raises(ValueError, match=r"beam search \(num_beams = 4\).*transformers"):
        generate(lora_model, tokenizer, few[:1], GenerationSettings(num_beams=4, backend="engine"))


def test_sharded_parameters_send_auto_to_transformers(tmp_path):
    """The kind behind CI's FSDP failure: a model whose weights are DTensor shards (FSDP2) is not
    whole on one device, so the engine refuses it by name and ``auto`` resolves to transformers."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    from transformers import LlamaConfig, LlamaForCausalLM

    from loralab.engine import unsupported_reason
    from loralab.tasks.generation import resolve_backend

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config)
    assert unsupported_reason(model) is None and resolve_backend("auto", model) == "engine"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        proj = model.model.layers[0].mlp.up_proj
        proj.weight = torch.nn.Parameter(distribute_tensor(proj.weight.data, mesh))
        assert "sharded" in unsupported_reason(model)
        assert resolve_backend("auto", model) == "transformers"
        with pytest.raises(ValueError, match="sharded"):
            resolve_backend("engine", model)
    finally:
        dist.destroy_process_group()
