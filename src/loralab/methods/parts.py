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
    the init (e.g. LoRA-FA freezes A); ``make(model, cfg, params)`` returns a torch optimizer, or
    None for the run's default AdamW over every trainable parameter."""

    name: str
    summary: str
    make: Callable = lambda model, cfg, params: None
    prepare: Callable = lambda peft_model, cfg, params: None
    freezes_a: bool = False
    refuses: dict = field(default_factory=dict)
