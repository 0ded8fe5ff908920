"""Continuous batching over a fixed set of slots: the loop that turns prompts into completions.

Why loralab has its own engine: evaluation is half of every table we reproduce, and the paths
that exist were measured too slow or unusable here (issue 19, one H200, Llama-3-8B shape, LoRA r32
unmerged): transformers' batched ``generate`` 1,064-1,136 new tokens/s, its continuous batching
1,389 at 124 GiB, loralab's old batch-16 loop 205; vLLM pins its own torch/CUDA, merges and
reloads the model from disk and cannot evaluate the live model between training steps. The
engine runs the model's own modules (``DecoderRunner``), so adapters apply exactly as in training,
and spends the GPU on what decode needs: all slots advance one token per step, a finished slot is
refilled at once, decode steps are CUDA graphs (one per slot-count and key-length bucket).

One call (``Engine.generate``):
1. the prompts' longest common token prefix (a few-shot block, a template; >= ``PREFIX_MIN``
   tokens) is prefilled once into the prefix slot and copied into each slot that takes a prompt;
2. free slots take the next requests; their prompts (past the prefix) are prefilled in chunks of
   at most ``prefill_tokens`` tokens per forward, a longer prompt over several forwards; the last
   position's logits give each request its first token;
3. every step decodes one token for slots ``0 .. n-1`` (``n`` the highest live slot, bucketed),
   attending to ``L`` cache positions (the longest live sequence, bucketed); a sequence ends at an
   end-of-sequence token (not kept), at its budget, or when a stop string appears in its generated
   text (checked on a window of the last tokens; the caller cuts the text at the stop string);
4. ``on_finish(request, samples)`` runs as soon as all samples of a request are done; by then
   ``engine.endings[request]`` says how each sample ended (``Ending``: recorded where the host loop
   already decides to end it, so no device sync is added).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from loralab.engine.cache import SlotCache, bytes_per_token, cache_budget, plan_slots
from loralab.engine.model import DecoderRunner, rope_is_static
from loralab.engine.sampling import Sampling, choose, request_seed
from loralab.speed.dora_refresh import refresh_dora_norms
from loralab.speed.fast_dora import reusing_dora_norms

log = logging.getLogger(__name__)

PREFIX_MIN = 16
"""A common prefix shorter than this is prefilled with each prompt (copying it would not pay)."""
LENGTH_BUCKET = 128
"""Decode attends to the cache rounded up to this many positions (one CUDA graph per bucket)."""
REFILL_FRACTION = 8
"""Free slots are refilled once 1/8 of them are free (or the queue is shorter): each prefill forward
then carries many prompts, and the other slots wait at most one prefill per 1/8 of them."""
SLOT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 384, 512, 768, 1024)


def _bucket_slots(n: int, slots: int) -> int:
    return min(next((b for b in SLOT_BUCKETS if b >= n), n), slots)


@dataclass
class StopStrings:
    """Stop strings searched in the generated text only (never across the end of the prompt).

    ``hit(tokens)`` decodes the last ``window`` generated tokens: a stop string of ``m`` characters
    lies within its last ``m`` non-empty tokens, so ``window`` = twice the longest stop string plus 8
    covers tokens that decode to nothing alone (partial UTF-8 bytes). A miss only delays stopping:
    the caller still cuts the full text at the first stop string."""
    tokenizer: object
    stops: list[str]
    window: int = field(init=False)

    def __post_init__(self):
        self.window = 2 * max((len(s) for s in self.stops), default=0) + 8

    def hit(self, tokens: list[int]) -> bool:
        if not self.stops:
            return False
        text = self.tokenizer.decode(tokens[-self.window:], skip_special_tokens=True)
        return any(s in text for s in self.stops)


@dataclass(frozen=True)
class Ending:
    """How one sample ended: ``reason`` "eos" (``eos`` the end-of-sequence id generated, not kept in
    the tokens), "stop" (a stop string seen by ``StopStrings.hit``, checked before the budget) or
    "length" (its budget of new tokens reached)."""
    reason: str
    eos: int | None = None


@dataclass
class _Seq:
    request: int
    sample: int
    prompt: list[int]
    budget: int
    generator: torch.Generator | None
    out: list[int] = field(default_factory=list)

    @property
    def position(self) -> int:
        """Cache position of the token fed at the next decode step (the last one generated)."""
        return len(self.prompt) + len(self.out) - 1


class Engine:
    """Generation over ``model`` (a transformers causal LM or a peft model on one), unchanged by use.

    ``max_slots``: sequences decoded together (fewer when the cache budget holds fewer);
    ``memory_fraction``: of the device's free memory for the cache (``cache.cache_budget``);
    ``prefill_tokens``: tokens per prefill forward; ``cuda_graphs``: None = on CUDA when the
    model's position tables allow; ``merge``: adapters merged into copies of the projections for
    the call (``DecoderRunner.merge_copies``; the model itself is never changed). Fast DoRA layers it calls as modules
    (a base the copies do not take, FP8 or NF4, or ``merge=False``) read weight norms computed once per call
    (``speed/dora_refresh.refresh_dora_norms``; ``stats["dora_norms_once"]`` counts them), where each forward would
    read W again for its own; the same tokens on CPU (tests/test_engine_dora_norms.py), the speed not measured.
    Raises ValueError for a model the engine cannot run (``model.unsupported_reason``)."""

    def __init__(self, model, *, max_slots: int = 512, memory_fraction: float = 0.9, prefill_tokens: int = 8192,
                 cuda_graphs: bool | None = None, merge: bool = True):
        if max_slots < 1 or prefill_tokens < 1:
            raise ValueError(f"max_slots ({max_slots}) and prefill_tokens ({prefill_tokens}) must be >= 1")
        self.runner = DecoderRunner(model)
        self.max_slots = max_slots
        self.memory_fraction = memory_fraction
        self.prefill_tokens = prefill_tokens
        self.merge = merge
        on_cuda = self.runner.device.type == "cuda"
        self.cuda_graphs = (on_cuda and rope_is_static(model)) if cuda_graphs is None else (cuda_graphs and on_cuda)
        self.stats: dict = {}
        self.endings: list[list[Ending | None]] = []

    # -- the public call ---------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], budgets: list[int], *, sampling: Sampling = Sampling(),
                 n_samples: int = 1, eos_ids: set[int] | frozenset = frozenset(), stop: StopStrings | None = None,
                 request_ids: list[int] | None = None,
                 on_finish: Callable[[int, list[list[int]]], None] | None = None) -> list[list[list[int]]]:
        """Token ids of ``n_samples`` completions per prompt: ``[len(prompts)][n_samples][tokens]``.

        ``prompts``: token ids (special tokens included as the model expects); ``budgets``: new
        tokens per prompt (>= 1); ``request_ids``: each prompt's index in the whole evaluation (seeds
        sampling, default ``0..N-1``); ``on_finish(i, samples)`` with ``i`` an index into ``prompts``.
        Raises ValueError for mismatched lengths or a budget < 1, MemoryError when the cache cannot
        hold the longest sequence. How each sample ended: ``self.endings`` ``[len(prompts)][n_samples]``
        of ``Ending`` (a request's are set before its ``on_finish``)."""
        if len(budgets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(budgets)} budgets")
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        if empty:
            raise ValueError(f"prompt(s) {empty[:5]} have no tokens: a completion needs a token to continue")
        small = [(i, b) for i, b in enumerate(budgets) if b < 1]
        if small:
            raise ValueError(f"budget(s) below one new token (prompt, budget): {small[:5]}")
        if not prompts:
            return []
        request_ids = list(range(len(prompts))) if request_ids is None else request_ids
        runner = self.runner
        model = runner.model
        was_training = model.training
        model.eval()
        started = time.perf_counter()
        try:
            # autocast off: a training loop's autocast would cache cast weights that a captured graph
            # outlives; the engine computes in the model's own dtype (merged copies in the base's)
            with torch.no_grad(), torch.autocast(runner.device.type, enabled=False):
                merged = self.runner.merge_copies() if self.merge else 0
                # fast DoRA layers called as modules (a base the copies do not merge: FP8, NF4; or merge=False): their
                # weight norms once for the call, as the training step takes them once per optimizer step, where
                # every forward (each decode step) would read W again for its norm (speed/dora_refresh.py)
                norms = refresh_dora_norms(model)
                self.stats = {"merged_projections": merged, "dora_norms_once": norms}
                with reusing_dora_norms() if norms else contextlib.nullcontext():
                    return self._generate(prompts, budgets, sampling, n_samples, set(eos_ids), stop, request_ids,
                                          on_finish)
        finally:
            model.train(was_training)
            self.stats["seconds"] = time.perf_counter() - started
            # the cache and graphs belong to one call: a live model trains on between calls
            self._cache = None
            self._graphs = {}
            self.runner.release()

    # -- internals ---------------------------------------------------------------------------------
    def _generate(self, prompts, budgets, sampling, n_samples, eos_ids, stop, request_ids, on_finish):
        runner = self.runner
        device = runner.device
        max_len = max(len(p) + b for p, b in zip(prompts, budgets))
        max_len = -(-max_len // LENGTH_BUCKET) * LENGTH_BUCKET
        token_bytes = bytes_per_token(len(runner.layers), runner.kv_heads, runner.head_dim, runner.dtype)
        slots = plan_slots(wanted=len(prompts) * n_samples, max_len=max_len, token_bytes=token_bytes,
                           budget=cache_budget(device, self.memory_fraction), max_slots=self.max_slots)
        cache = self._cache = SlotCache.allocate(layers=len(runner.layers), slots=slots, kv_heads=runner.kv_heads,
                                                 max_len=max_len, head_dim=runner.head_dim, dtype=runner.dtype, device=device)
        self._graphs = {}
        self._tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self._positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.stats = {**self.stats, "slots": slots, "max_len": max_len, "decode_steps": 0, "prefill_tokens": 0, "new_tokens": 0,
                      "cuda_graphs": self.cuda_graphs, "graphs": 0, "prefill_rounds": 0,
                      "prefill_s": 0.0, "decode_s": 0.0}
        prefix = self.stats["prefix_tokens"] = self._common_prefix(prompts)
        if prefix:
            self._prefill([(cache.prefix_slot, 0, prompts[0][:prefix])], want_logits=False)
        queue = collections.deque(
            _Seq(i, s, prompts[i], budgets[i],
                 None if sampling.greedy else torch.Generator(device=device).manual_seed(request_seed(sampling.seed, request_ids[i], s)))
            for i in range(len(prompts)) for s in range(n_samples))
        live: list[_Seq | None] = [None] * slots
        results: list[list[list[int] | None]] = [[None] * n_samples for _ in prompts]
        self.endings = [[None] * n_samples for _ in prompts]
        remaining = [n_samples] * len(prompts)
        refill_at = max(1, slots // REFILL_FRACTION)

        def finish(slot: int, ending: Ending) -> None:
            seq = live[slot]
            live[slot] = None
            results[seq.request][seq.sample] = seq.out
            self.endings[seq.request][seq.sample] = ending
            self.stats["new_tokens"] += len(seq.out)
            remaining[seq.request] -= 1
            if remaining[seq.request] == 0 and on_finish is not None:
                on_finish(seq.request, results[seq.request])

        def accept(slot: int, token: int) -> None:
            """Add ``token`` to the sequence in ``slot``; end it when it is done."""
            seq = live[slot]
            if token in eos_ids:
                finish(slot, Ending("eos", token))
                return
            seq.out.append(token)
            # the stop string first (vLLM's order): a stop in the last token of the budget is a stop
            if stop is not None and stop.hit(seq.out):
                finish(slot, Ending("stop"))
            elif len(seq.out) >= seq.budget:
                finish(slot, Ending("length"))

        while queue or any(s is not None for s in live):
            free = [i for i, s in enumerate(live) if s is None]
            # refill in batches: a prefill forward of a few prompts costs as much as one of many
            if free and queue and (len(free) >= min(refill_at, len(queue)) or len(free) == slots):
                placed = []
                for slot in free[:len(queue)]:
                    live[slot] = queue.popleft()
                    placed.append(slot)
                t = time.perf_counter()
                self.stats["prefill_rounds"] += 1
                cache.copy_prefix(torch.tensor(placed, device=device), prefix)
                logits = self._prefill([(slot, prefix, live[slot].prompt[prefix:]) for slot in placed], want_logits=True)
                tokens = choose(logits, sampling, [live[s].generator for s in placed]).tolist()
                self.stats["prefill_s"] += time.perf_counter() - t
                for slot, token in zip(placed, tokens):
                    accept(slot, token)
                continue  # refill any slot that ended at its first token before decoding
            active = [i for i, s in enumerate(live) if s is not None]
            # buckets only where a CUDA graph is replayed per shape; eager steps take the exact sizes
            n = _bucket_slots(active[-1] + 1, slots) if self.cuda_graphs else active[-1] + 1
            positions = [0] * n
            tokens = [0] * n
            for i in active:
                positions[i] = live[i].position
                tokens[i] = live[i].out[-1]
            length = max(positions) + 1
            if self.cuda_graphs:
                length = min(max_len, -(-length // LENGTH_BUCKET) * LENGTH_BUCKET)
            self._positions[:n].copy_(torch.tensor(positions), non_blocking=True)
            self._tokens[:n].copy_(torch.tensor(tokens), non_blocking=True)
            t = time.perf_counter()
            logits = self._decode(n, length)
            nxt = choose(logits, sampling, [live[i].generator if live[i] else None for i in range(n)]).tolist()
            self.stats["decode_s"] += time.perf_counter() - t
            self.stats["decode_steps"] += 1
            for i in active:
                accept(i, nxt[i])
        return results

    def _common_prefix(self, prompts: list[list[int]]) -> int:
        """Tokens shared by every prompt, leaving each at least one token of its own (0 if < PREFIX_MIN)."""
        if len(prompts) < 2:
            return 0
        first = prompts[0]
        n = min(len(p) for p in prompts) - 1
        for p in prompts[1:]:
            i = 0
            while i < n and p[i] == first[i]:
                i += 1
            n = i
            if n < PREFIX_MIN:
                return 0
        return n

    def _prefill(self, rows: list[tuple[int, int, list[int]]], want_logits: bool) -> torch.Tensor | None:
        """Write each row's tokens (slot, first position, ids) into the cache; the logits of each row's
        last token [len(rows), vocab] fp32 when ``want_logits``. Rows are cut into pieces of at most
        ``prefill_tokens`` and packed into forwards of at most ``prefill_tokens`` (padded) tokens."""
        runner = self.runner
        limit = self.prefill_tokens
        pieces = [[(slot, start + k, ids[k:k + limit]) for k in range(0, len(ids), limit)] for slot, start, ids in rows]
        last_hidden: list[torch.Tensor | None] = [None] * len(rows)
        for depth in range(max(len(p) for p in pieces)):
            todo = sorted(((r, p[depth]) for r, p in enumerate(pieces) if depth < len(p)), key=lambda item: len(item[1][2]))
            # rows sorted by length: a group padded to its last (longest) row, cut where it would pass the limit
            groups: list[list] = [[]]
            for item in todo:
                if groups[-1] and len(item[1][2]) * (len(groups[-1]) + 1) > limit:
                    groups.append([])
                groups[-1].append(item)
            for group in groups:
                self.stats["prefill_tokens"] += sum(len(x[1][2]) for x in group)
                hidden = self._prefill_forward([x[1] for x in group])
                for b, (r, (_, _, ids)) in enumerate(group):
                    if depth == len(pieces[r]) - 1:
                        last_hidden[r] = hidden[b, len(ids) - 1]
        if not want_logits:
            return None
        return runner.logits(torch.stack(last_hidden))

    def _prefill_forward(self, rows: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        runner = self.runner
        device = runner.device
        width = max(len(ids) for _, _, ids in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for b, (_, _, row) in enumerate(rows):
            ids[b, :len(row)] = torch.tensor(row)
        slots = torch.tensor([s for s, _, _ in rows], device=device)
        starts = torch.tensor([st for _, st, _ in rows], device=device)
        lengths = torch.tensor([len(r) for _, _, r in rows], device=device)
        positions = starts[:, None] + torch.arange(width, device=device)[None, :]
        attend = runner.prefill_attend(self._cache, slots, starts, lengths, width)
        return runner.forward(ids.to(device), positions, attend)

    def _decode_eager(self, n: int, length: int) -> torch.Tensor:
        runner = self.runner
        positions = self._positions[:n]
        attend = runner.decode_attend(self._cache, n, positions, length)
        hidden = runner.forward(self._tokens[:n, None], positions[:, None], attend)
        return runner.logits(hidden[:, 0])

    def _decode(self, n: int, length: int) -> torch.Tensor:
        """Logits [n, vocab] fp32 of one decode step over slots ``0 .. n-1`` (a CUDA graph per (n, length))."""
        if not self.cuda_graphs:
            return self._decode_eager(n, length)
        key = (n, length)
        if key not in self._graphs:
            self._graphs[key] = self._capture(n, length)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _capture(self, n: int, length: int):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (allocator, lazy inits, cuBLAS handles)
                self._decode_eager(n, length)
        torch.cuda.current_stream().wait_stream(stream)
        if not hasattr(self, "_pool"):
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._decode_eager(n, length)
        self.stats["graphs"] = self.stats.get("graphs", 0) + 1
        return graph, out

