"""Adaptation methods, composed of three variation points (ARCHITECTURE.md point 1):

- the **layer**: ``lora``, ``rslora``, ``dora``, ``dora_magnitude_only``;
- the **initialisation**: ``kaiming`` (LoRA's default), ``gaussian``, ``pissa``, ``olora``,
  ``corda``, ``milora``, ``eva``, ``lora_ga``, seed 003's ``svd_lorafa``,
  ``svd_lorafa_corrected``, ``lorafa_qr``, and ``loftq`` (NF4 base only);
- the **optimizer**: ``adamw``, ``lorafa``, ``loraplus``.

Each part lives in its method's file as a record (``parts.Layer`` / ``Init`` / ``Optimizer``) and is
one line in ``LAYERS`` / ``INITS`` / ``OPTIMIZERS`` below. A configuration selects one part of each
kind: the layer from adapter_config.json (``use_dora``, ``use_rslora``) and training_parameters
``magnitude_only_modules``; the init from adapter_config ``init_lora_weights`` (peft's inits) or
training_parameters ``init`` (inits peft lacks), never both; the optimizer from ``optimizer``.
The allowed values of ``init`` and ``optimizer`` (``PARAM_INITS``, ``PARAM_OPTIMIZERS``; checked by ``experiment.registry_problems``) are
derived from these dicts. A pair of parts that does not compose is declared by either part
(``refuses``) and is a config error naming both keys; every other combination is in the test
matrix (``combinations()``; tests/test_methods_matrix.py).

Under the method, the frozen base may be quantised (QLoRA, training_parameters ``quantization:
"nf4"``; ``qlora.py``; or FP8, ``quantization: "fp8"``; ``fp8base.py``): recorded as ``parts["base"]``.

``choose_method(cfg, params)`` returns a ``Method``: ``NAME`` (recorded: the non-default parts
joined by ``+``, e.g. ``pissa+lorafa``; ``lora`` when all are LoRA's; ``qlora`` / ``nf4+...`` on
an NF4 base, ``fp8+...`` on an FP8 base), ``parts`` ({layer, init, optimizer, base}), ``check(model, cfg, params) -> problems``, ``apply(model, cfg, params, ctx) ->
(model, saver | None)`` (which sets ``init_cost``), ``make_optimizer(model, cfg, params)``.
Without an adapter_config.json the method is ``full`` fine-tuning.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

from loralab.methods import (
    corda,
    dora,
    eva,
    fp8base,
    full,
    loftq,
    lora,
    lora_ga,
    lorafa,
    loraplus,
    milora,
    olora,
    pissa,
    qlora,
    rslora,
    svd_lorafa,
)
from loralab.methods.parts import option_problems
from loralab.speed_settings import FP8_ONLY_SPEED, Speed

LAYERS = {p.name: p for p in (lora.LAYER, rslora.LAYER, dora.LAYER, dora.MAGNITUDE_ONLY)}
INITS = {
    p.name: p
    for p in (
        lora.KAIMING, lora.GAUSSIAN, pissa.INIT, olora.INIT, corda.INIT, milora.INIT, eva.INIT, lora_ga.INIT,
        svd_lorafa.AS_WRITTEN, svd_lorafa.CORRECTED, svd_lorafa.QR, loftq.INIT,
    )
}
OPTIMIZERS = {p.name: p for p in (lora.ADAMW, lorafa.OPTIMIZER, loraplus.OPTIMIZER)}

PARAM_INITS = (None,) + tuple(n for n, p in INITS.items() if p.key == "init")
"""Allowed training_parameters ``init`` values (checked by ``experiment.registry_problems``)."""
PARAM_OPTIMIZERS = tuple(OPTIMIZERS)
"""Allowed training_parameters ``optimizer`` values (checked by ``experiment.registry_problems``)."""
PEFT_INIT_VALUES = tuple(v for p in INITS.values() if p.key == "init_lora_weights" for v in p.values)
DEFAULTS = {"layer": "lora", "init": "kaiming", "optimizer": "adamw"}


def _reason(a_kind: str, a, b_kind: str, b) -> str | None:
    """Why parts a and b (of different kinds) do not compose, as either declares it, or None.
    ``"kind:*"`` refuses every part of that kind except the default."""
    reason = a.refuses.get(f"{b_kind}:{b.name}") or b.refuses.get(f"{a_kind}:{a.name}")
    if reason is None and b.name != DEFAULTS[b_kind]:
        reason = a.refuses.get(f"{b_kind}:*")
    if reason is None and a.name != DEFAULTS[a_kind]:
        reason = b.refuses.get(f"{a_kind}:*")
    return reason


def _pairs(chosen: dict):
    kinds = list(chosen)
    for i, a in enumerate(kinds):
        for b in kinds[i + 1 :]:
            yield a, chosen[a], b, chosen[b]


def refusal(layer: str, init: str, optimizer: str) -> str | None:
    """Why this combination does not compose (the first reason a part gives), or None."""
    chosen = {"layer": LAYERS[layer], "init": INITS[init], "optimizer": OPTIMIZERS[optimizer]}
    return next((r for pair in _pairs(chosen) if (r := _reason(*pair))), None)


def combinations(base: str = "float") -> list[tuple[str, str, str]]:
    """Every (layer, init, optimizer) that composes on a ``float``, ``nf4`` or ``fp8`` base: the test matrix."""
    return [
        c for c in itertools.product(LAYERS, INITS, OPTIMIZERS)
        if refusal(*c) is None and INITS[c[1]].base in ("any", base)
    ]


def _layer_of(cfg, params):
    found = [p for p in LAYERS.values() if p.selects(cfg, params)]
    return found[0] if len(found) == 1 else None


def _init_of(cfg, params):
    """(init part or None, problems)."""
    value = getattr(cfg, "init_lora_weights", True)
    peft_init = next((p for p in INITS.values() if p.key == "init_lora_weights" and p.matches(value)), None)
    problems = []
    if peft_init is None:
        problems.append(
            f"adapter_config.json 'init_lora_weights' = {value!r} is not supported; supported: "
            + ", ".join(repr(v) for v in PEFT_INIT_VALUES)
            + " (and training_parameters 'init': " + ", ".join(repr(v) for v in PARAM_INITS if v) + ")"
        )
    if params.init is None:
        return peft_init, problems
    ours = INITS.get(params.init)
    if peft_init is not None and peft_init.name != "kaiming":
        problems.append(
            f"'init' = {params.init!r} with adapter_config.json 'init_lora_weights' = {value!r}: two initialisations; "
            f"set one of them (keep 'init_lora_weights' true for 'init' = {params.init!r})"
        )
        return None, problems
    return ours, problems


def _key_text(kind: str, part, cfg, params) -> str:
    if kind == "optimizer":
        return f"'optimizer' = {params.optimizer!r}"
    if kind == "init":
        if part.key == "init":
            return f"'init' = {params.init!r}"
        return f"adapter_config.json 'init_lora_weights' = {getattr(cfg, 'init_lora_weights', True)!r} (init {part.name!r})"
    return f"layer {part.name!r} ({part.keys})"


class Method:
    """One run's composed method: a layer, an init and an optimizer (or ``full`` fine-tuning)."""

    def __init__(self, cfg, params):
        self.cfg_given = cfg
        self.layer = self.init = None
        self.optimizer = OPTIMIZERS.get(params.optimizer)
        self.selection_problems: list[str] = []
        self.init_cost: dict | None = None
        self.base_fallback: dict = {}
        self.base = qlora.quantization(params)
        if cfg is None:
            return
        self.layer = _layer_of(cfg, params)
        if self.layer is None and params.magnitude_only_modules and not getattr(cfg, "use_dora", False):
            self.selection_problems.append(
                f"'magnitude_only_modules' = {params.magnitude_only_modules!r} needs adapter_config.json 'use_dora': true"
            )
        self.init, problems = _init_of(cfg, params)
        self.selection_problems += problems

    # ---- what is recorded ---------------------------------------------------------------------
    @property
    def is_full(self) -> bool:
        return self.cfg_given is None

    @property
    def parts(self) -> dict:
        """{"layer", "init", "optimizer"}: the composition, recorded with the result."""
        if self.is_full:
            return {"layer": "full", "init": None, "optimizer": "adamw", "base": self.base or "float"}
        init = None
        if self.init is not None:
            init = self.init.variant(self.cfg_given, None) if self.init.variant else self.init.name
        return {
            "layer": self.layer.name if self.layer else None,
            "init": init,
            "optimizer": self.optimizer.name if self.optimizer else None,
            "base": self.base or "float",
        }

    @property
    def NAME(self) -> str:  # noqa: N802  the name the run's record holds
        if self.is_full:
            return full.NAME
        parts = self.parts
        named = [parts[k] for k in ("layer", "init", "optimizer") if parts[k] not in (DEFAULTS[k], None)]
        name = "+".join(named) or "lora"
        if self.base == "nf4":
            return "qlora" if name == "lora" else f"nf4+{name}"
        if self.base == "fp8":
            return f"fp8+{name}"
        return name

    def __repr__(self) -> str:
        return f"Method({self.NAME!r}, {self.parts})"

    # ---- the interface the run path uses (loralab.run.build) -----------------------------------
    def conflicts(self, cfg, params) -> list[str]:
        """Selection and composition problems, without the model: each names both keys."""
        defaults = Speed().record()  # an FP8-only key away from its defaults (today's and earlier ones) needs the FP8 base;
        olds = {f.name: f.metadata.get("old_defaults", ()) for f in dataclasses.fields(Speed)}  # "auto" fits the base
        fp8_only = [] if self.base == "fp8" else [
            f"'speed.{key}' = {params.speed[key]!r} acts on an FP8 base only; it needs 'quantization': 'fp8' "
            f"(here {self.base or 'null'}): remove it" for key in FP8_ONLY_SPEED
            if params.speed.get(key, defaults[key]) not in (defaults[key], *olds[key], "auto")]
        if self.is_full:
            problems = list(fp8_only)
            if params.optimizer != "adamw":
                problems.append(f"'optimizer' = {params.optimizer!r} needs an adapter (adapter_config.json); full fine-tuning uses adamw")
            if params.init is not None:
                problems.append(f"'init' = {params.init!r} needs an adapter (adapter_config.json)")
            if params.magnitude_only_modules:
                problems.append("'magnitude_only_modules' needs a DoRA adapter (adapter_config.json 'use_dora': true)")
            if self.base is not None:
                problems.append(f"'quantization' = {self.base!r} needs an adapter (adapter_config.json): the quantised base is frozen")
            return problems + option_problems(params, lora.ADAMW)
        problems = list(self.selection_problems) + fp8_only
        if self.optimizer is not None:
            problems += option_problems(params, self.optimizer)
        if self.layer is None or self.init is None or self.optimizer is None:
            return problems
        problems += qlora.check(params, self.init)
        packed = {"nf4": "packed NF4", "fp8": "FP8 codes with per-channel scales"}.get(self.base)
        if self.base == "nf4" and self.layer.name.startswith("dora") and params.speed.get("fast_dora", False):
            problems.append(  # the FP8 base has its own fast norm (speed/fast_dora: codes times per-channel scales)
                f"'quantization' = {self.base!r} with layer {self.layer.name!r} needs 'speed.fast_dora': false "
                f"(the fast DoRA forward reads the base weight, which is {packed} here)"
            )
        if packed and params.speed.get("fused_lora", False):
            problems.append(f"'quantization' = {self.base!r} with 'speed.fused_lora' = true: the fused LoRA matmul reads the base "
                            f"weight, which is {packed} here; set 'speed.fused_lora': false")
        chosen = {"layer": self.layer, "init": self.init, "optimizer": self.optimizer}
        for kind, part, other_kind, other in _pairs(chosen):
            reason = _reason(kind, part, other_kind, other)
            if reason:
                problems.append(
                    f"{_key_text(other_kind, other, cfg, params)} with {_key_text(kind, part, cfg, params)} "
                    f"does not compose: {reason}"
                )
        return problems

    def check(self, model, cfg, params) -> list[str]:
        """Every problem of this configuration on this model (conflicts, ranks, shapes), at once."""
        problems = self.conflicts(cfg, params)
        if self.is_full:
            return problems
        for part in (self.layer, self.init):
            if part is not None:
                problems += [p for p in part.check(model, cfg, params) if p not in problems]
        if self.init is not None and self.init.residual:
            problems += tied_residual_problems(model, cfg, self.init.name)
        return problems

    def apply(self, model, cfg, params, ctx):
        """Build the adapted model: layer config → init (calibration included) → layer finish →
        optimizer preparation. Returns (model, saver | None); sets ``init_cost``:
        {"seconds": wall time of the init incl. calibration, "device": "cuda"|"cpu",
        "peak_memory_bytes": peak CUDA memory allocated during the init (CUDA only),
        "memory_before_bytes": CUDA memory allocated before it (CUDA only),
        "peak_rss_bytes": the process's peak resident memory so far (CPU only; not init-specific)};
        with an NF4 or FP8 base the quantisation is part of it (FP8: ``base_fallback`` then holds
        {name: [out, in]} of the layers left in float)."""
        import torch

        from loralab.methods.common import ResidualSaver, freeze_lora_A

        if self.is_full:
            return full.apply(model), None
        device = next(model.parameters()).device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        if self.base == "nf4":  # QLoRA: the frozen base in NF4 before the adapter is built on it
            from loralab.methods.common import linear_names

            names = linear_names(model)
            if self.init.needs_float_weights:
                modules = dict(model.named_modules())
                ctx.float_weights = {n: modules[n].weight.detach().float().clone() for n in names}
            qlora.quantize_linears(model, names)
        if self.base == "fp8":  # the FP8 base likewise (fp8base.py); unfit shapes stay float, recorded
            from loralab.methods.common import linear_names
            from loralab.speed.fp8 import check_kernel

            names = linear_names(model)
            if names:  # no kernel: fails here, naming it
                check_kernel(model.get_submodule(names[0]).weight.device)
            self.base_fallback = fp8base.quantize_linears(model, names)
        build_cfg = self.layer.configure(model, cfg, params)
        peft_model = self.init.build(model, build_cfg, params, ctx)
        if cuda:
            torch.cuda.synchronize(device)
        self.init_cost = {"seconds": time.perf_counter() - start, "device": device.type}
        if cuda:
            self.init_cost.update(peak_memory_bytes=int(torch.cuda.max_memory_allocated(device)), memory_before_bytes=int(before))
        else:
            from loralab.results import peak_rss_bytes

            self.init_cost["peak_rss_bytes"] = peak_rss_bytes()
        self.layer.finish(peft_model, build_cfg, params)
        if self.init.freezes_a:
            freeze_lora_A(peft_model)
        self.optimizer.prepare(peft_model, cfg, params)
        return peft_model, (ResidualSaver(peft_model) if self.init.residual else None)

    def make_optimizer(self, model, cfg, params):
        """The optimizer part's torch optimizer (full fine-tuning: the ``adamw`` part), built from
        the run's optimizer settings (``parts.settings``)."""
        return (lora.ADAMW if self.is_full else self.optimizer).make(model, cfg, params)


def choose_method(cfg, params) -> Method:
    """The composed method of (resolved adapter config or None, training parameters). Never raises
    for a bad combination: ``Method.check`` lists the problems (loralab.run.build raises ConfigError)."""
    return Method(cfg, params)


def describe() -> list[tuple[str, str, str]]:
    """(kind, name, summary) of every registered part, for ``loralab methods``."""
    rows = [("method", full.NAME, full.SUMMARY)]
    for kind, registry in (("layer", LAYERS), ("init", INITS), ("optimizer", OPTIMIZERS)):
        rows += [(kind, name, part.summary) for name, part in registry.items()]
    rows.append(("base", "nf4", "QLoRA: frozen base in 4-bit NF4 (bitsandbytes), adapter on top (quantization=nf4)"))
    rows.append(("base", "fp8", "frozen base in FP8 e4m3, per-channel weight / per-token activation scales, "
                                "torch._scaled_mm GEMMs (quantization=fp8)"))
    return rows


def nf4_combinations() -> list[tuple[str, str, str]]:
    """The combinations that compose on an NF4 base (QLoRA, LoftQ)."""
    return combinations("nf4")


def fp8_combinations() -> list[tuple[str, str, str]]:
    """The combinations that compose on an FP8 base (those whose init is defined on any base)."""
    return combinations("fp8")


def tied_residual_problems(model, cfg, init: str) -> list[str]:
    """A residual init rewrites W into W − s·B₀A₀; on a weight tied to another module (SmolLM2's
    lm_head shares embed_tokens, tie_word_embeddings) that would silently rewrite the input
    embeddings too, which the rank-2r adapter on the original base cannot undo."""
    import torch

    from loralab.methods.common import targeted_linears

    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter):
            owners.setdefault(id(weight), []).append(name)
    problems = []
    for name, module in targeted_linears(model, cfg).items():
        shared = [n for n in owners.get(id(module.weight), []) if n != name]
        if shared:
            problems.append(f"'init_lora_weights'/'init' = {init!r} rewrites the weight of {name}, which is tied to "
                            f"{shared[0]} (tie_word_embeddings): take {name.split('.')[-1]} out of target_modules "
                            "or use an init that leaves W unchanged")
    return problems
