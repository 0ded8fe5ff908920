"""The three variation points a method is composed of: its **layer**, its **initialisation** and
its **optimizer** (ARCHITECTURE.md point 1). Each method file declares one of these records; the
registry in ``loralab.methods`` derives the allowed configuration values and the combinations.

A record is plain data plus functions; nothing is subclassed. ``refuses`` maps a part of another
kind, written ``"kind:name"`` (e.g. ``"optimizer:lorafa"``), to the reason the two do not compose;
every pair not refused by either side is a combination that the test matrix runs
(``tests/test_methods_matrix.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


def _no_problems(model, cfg, params) -> list[str]:
    return []


@dataclass(frozen=True)
class Layer:
    """How the adapted linear layer computes (peft's LoRA layer, with DoRA / rsLoRA switches).

    ``selects(cfg, params)``: whether this configuration asks for this layer (exactly one layer
    selects any configuration). ``configure(model, cfg, params) -> cfg``: the peft config to build
    with (e.g. magnitude-only DoRA adds its modules). ``finish(peft_model, model, cfg, params)``:
    after the adapter exists (e.g. freeze the magnitude-only factors). ``keys``: the configuration
    keys that select it, for error messages.
    """

    name: str
    summary: str
    selects: Callable
    keys: str
    check: Callable = _no_problems
    configure: Callable = lambda model, cfg, params: cfg
    finish: Callable = lambda peft_model, cfg, params: None
    refuses: dict = field(default_factory=dict)
    trainable: str = "r·(in+out) per layer"


@dataclass(frozen=True)
class Init:
    """How lora_A / lora_B (and, for residual inits, the frozen base weight) start.

    ``key``: ``"init_lora_weights"`` (adapter_config.json, peft's inits) or ``"init"``
    (training_parameters.json, inits peft lacks). ``values``: the values of that key that select
    it (``"pissa_niter_"`` matches as a prefix). ``build(model, cfg, params, ctx) -> peft_model``
    (calibration included). ``residual``: the base weight becomes W − s·B₀A₀ (the model starts at
    W; saved as a rank-2r LoRA on the original base). ``freezes_a``: A is part of the init and
    never trains. ``preserves_output``: the fresh adapter leaves the model's outputs unchanged.
    ``variant(cfg, params) -> str``: the recorded name when one init has modes (CorDA IPA/KPA).
    ``base``: the frozen base it is defined on: ``"any"``, ``"float"`` (it rewrites or reads W in
    full precision: the residual inits) or ``"nf4"`` (LoftQ: its factors fit W − NF4(W)).
    ``needs_float_weights``: on an NF4 base, the original float weights are kept for ``build`` as
    ``ctx.float_weights`` ({module name: (out, in) tensor}).
    """

    name: str
    summary: str
    key: str
    values: tuple
    build: Callable
    check: Callable = _no_problems
    residual: bool = False
    freezes_a: bool = False
    preserves_output: bool = True
    data_driven: bool = False
    variant: Callable | None = None
    refuses: dict = field(default_factory=dict)
    base: str = "any"
    needs_float_weights: bool = False

    def matches(self, value) -> bool:
        for v in self.values:
            if isinstance(v, str) and v.endswith("_") and isinstance(value, str) and value.startswith(v):
                return True
            if value == v and type(value) is type(v):
                return True
        return False


@dataclass(frozen=True)
class Optimizer:
    """How the trainable parameters are updated. ``prepare(peft_model, cfg, params)`` runs after
    the init (e.g. LoRA-FA freezes A); ``make(model, cfg, params)`` returns the torch optimizer,
    built from ``settings(params)`` (every part honours every setting: learning rate, weight decay,
    betas, eps and the ``no_decay`` rule; ``param_groups`` applies them). ``options``: the
    ``optimizer_options`` keys of this part alone, with their defaults (the shared ones are
    ``SHARED_OPTIONS``)."""

    name: str
    summary: str
    make: Callable
    """Always builds the optimizer (the run path has no fallback; the ``adamw`` part builds AdamW)."""
    prepare: Callable = lambda peft_model, cfg, params: None
    freezes_a: bool = False
    refuses: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)


# ---- the optimizer settings every optimizer part honours ------------------------------------------
SHARED_OPTIONS = {"betas": (0.9, 0.999), "eps": 1e-8, "no_decay": ()}
"""``optimizer_options`` keys every optimizer part reads, with their defaults (torch AdamW's betas
and eps; weight decay on every trainable parameter, as seed 000's torch AdamW). ``no_decay``: the
kinds of parameter that get no weight decay, of ``NO_DECAY_KINDS``."""
NO_DECAY_KINDS = ("bias", "norm")
"""``bias``: parameters named ``*.bias``; ``norm``: the parameters of a normalisation module
(LayerNorm, RMSNorm: any module class whose name ends in ``Norm``)."""


@dataclass(frozen=True)
class Settings:
    """The optimizer settings of one run, read once from training_parameters."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    no_decay: tuple[str, ...]
    options: dict  # optimizer_options as given (part-specific keys included)


def settings(params) -> Settings:
    """``learning_rate``, ``weight_decay`` and ``optimizer_options`` (``SHARED_OPTIONS`` defaults)."""
    options = dict(getattr(params, "optimizer_options", None) or {})
    merged = {**SHARED_OPTIONS, **options}
    return Settings(lr=float(params.learning_rate), weight_decay=float(params.weight_decay),
                    betas=tuple(float(b) for b in merged["betas"]), eps=float(merged["eps"]),
                    no_decay=tuple(merged["no_decay"]), options=options)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def option_problems(params, part: Optimizer | None) -> list[str]:
    """Every problem of ``optimizer_options`` for optimizer ``part`` (unknown keys with "did you
    mean", values out of range), at once."""
    from loralab.config import suggest

    options = getattr(params, "optimizer_options", None) or {}
    if not isinstance(options, dict):
        return [f"'optimizer_options' = {options!r} must be a JSON object"]
    allowed = {**SHARED_OPTIONS, **(part.options if part else {})}
    problems = []
    for key, value in options.items():
        where = f"'optimizer_options.{key}' = {value!r}"
        if key not in allowed:
            name = part.name if part else getattr(params, "optimizer", "?")
            problems.append(f"{where} is not an option of optimizer {name!r}{suggest(str(key), allowed)}; "
                            f"allowed: {', '.join(sorted(allowed))}")
        elif key == "betas":
            if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_number(b) and 0 <= b < 1 for b in value)):
                problems.append(f"{where} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        elif key == "no_decay":
            if not (isinstance(value, (list, tuple)) and all(v in NO_DECAY_KINDS for v in value)):
                problems.append(f"{where} must be a list of {', '.join(NO_DECAY_KINDS)} (parameters without weight decay)")
        elif not (_number(value) and value > 0):
            problems.append(f"{where} must be a number > 0")
    return problems


def decayed(model, no_decay) -> dict[str, bool]:
    """{trainable parameter name: whether weight decay applies} under the ``no_decay`` kinds."""
    norm_params = set()
    if "norm" in no_decay:
        for module in model.modules():
            if type(module).__name__.endswith("Norm"):
                norm_params |= {id(p) for p in module.parameters(recurse=False)}
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            exempt = ("bias" in no_decay and name.split(".")[-1] == "bias") or id(p) in norm_params
            out[name] = not exempt
    return out


def param_groups(model, s: Settings, lr_of: Callable = None) -> list[dict]:
    """The trainable parameters grouped by (learning rate, decayed), in ``named_parameters`` order;
    every group states lr, weight_decay, betas and eps. ``lr_of(name, param, model)`` is a part's
    learning-rate rule (LoRA+: λ·lr for B); default: ``s.lr`` for all."""
    decay = decayed(model, s.no_decay)
    groups: dict = {}
    for name, p in model.named_parameters():
        if name not in decay:
            continue
        lr = s.lr if lr_of is None else lr_of(name, p, model)
        key = (lr, decay[name])
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr": lr, "weight_decay": s.weight_decay if decay[name] else 0.0,
                           "betas": s.betas, "eps": s.eps}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def adamw(model, s: Settings, lr_of: Callable = None):
    """torch AdamW over ``param_groups`` (fused on CUDA: one kernel for all tensors)."""
    import torch

    groups = param_groups(model, s, lr_of)
    fused = any(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay, fused=fused)
