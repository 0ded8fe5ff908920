"""What every low-rank method shares: target resolution, the classification head, rank checks,
building the peft model, and saving residual-init adapters in a form plain peft loads.

Seed 000 adapts "all linear layers except the classifier head". What the head is depends on the
architecture: RoBERTa's ``classifier`` has its own dense layer, while BERT models (MiniLM) feed the
classifier through ``pooler.dense``; leaving that pooler frozen (or low-rank) leaves a one-layer
regressor on frozen features, which fails STS-B at seed 000's learning rate. So the head, pooler
included, trains fully (peft ``modules_to_save``) and is saved with the adapter.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from loralab.config import ConfigError, suggest

HEAD_NAMES = ("classifier", "score", "pooler")
OUTPUT_NAMES = ("lm_head",)


def head_modules(model) -> list[str]:
    """Top-level-ish names of the modules that form a classification head, which train fully."""
    names = []
    for name, module in model.named_modules():
        leaf = name.split(".")[-1]
        if leaf in ("classifier", "score") and name.count(".") == 0:
            names.append(leaf)
        elif leaf == "pooler" and module is not None and any(True for _ in module.parameters()):
            names.append("pooler")
    return sorted(set(names))


def linear_names(model, exclude_heads: bool = True) -> list[str]:
    """Qualified names of every nn.Linear outside the head (and outside lm_head)."""
    heads = head_modules(model) if exclude_heads else []
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parts = name.split(".")
        if any(p in heads for p in parts) or parts[-1] in OUTPUT_NAMES:
            continue
        out.append(name)
    return out


def peft_default_targets(model) -> list[str]:
    """What peft adapts where ``target_modules`` is null: its table by model type
    (``peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``; Llama: q_proj, v_proj; BERT and
    RoBERTa: query, value), as ``get_peft_model`` reads it. Raises ConfigError naming the model type where the
    table has none (peft raises there too)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULTS:
        raise ConfigError([f"adapter_config.json 'target_modules' is null and peft has no default for model type "
                           f"{model_type!r}: name the modules, e.g. \"all-linear\" or [\"q_proj\", \"v_proj\"]"],
                          "adapter_config.json")
    return list(DEFAULTS[model_type])


def resolve_config(model, peft_config, kind: str):
    """A copy of the peft config with ``all-linear`` expanded to explicit names and the head saved.

    ``target_modules`` null means what it means to peft: peft's default modules for the model type
    (``peft_default_targets``), not every linear layer. Explicit names are needed anyway by peft's CorDA
    preprocessing, and they make the saved adapter_config say exactly which layers were adapted. Raises
    ConfigError where ``target_modules`` is null and peft has no default for the model.
    """
    cfg = copy.deepcopy(peft_config)
    if cfg.target_modules in ("all-linear", {"all-linear"}):
        cfg.target_modules = linear_names(model)
    elif cfg.target_modules is None:
        cfg.target_modules = peft_default_targets(model)
    if kind == "seq_cls":
        heads = head_modules(model)
        cfg.modules_to_save = sorted(set(list(cfg.modules_to_save or []) + heads))
        cfg.task_type = "SEQ_CLS"
    elif kind == "causal_lm" and cfg.task_type is None:
        cfg.task_type = "CAUSAL_LM"
    return cfg


def targeted_linears(model, cfg) -> dict[str, nn.Linear]:
    """The modules peft will wrap, found with peft's own matching rule."""
    from peft.tuners.tuners_utils import check_target_module_exists

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and check_target_module_exists(cfg, name)
    }


def unmatched_names(model, names, key: str, linear_only: bool = False) -> list[str]:
    """One problem per name of ``names`` that matches no module of the model (``linear_only``: no nn.Linear),
    with the closest module name as "did you mean". ``key`` names the setting in the message. Names as peft
    matches them (``check_target_module_exists``, ``_set_trainable``): a module's full name or its suffix after
    a dot."""
    kind = "nn.Linear" if linear_only else "module"
    found = [n for n, m in model.named_modules(remove_duplicate=False) if n and (not linear_only or isinstance(m, nn.Linear))]
    leaves = sorted({n.split(".")[-1] for n in found})
    return [f"{key} names {name!r}, which matches no {kind} of the model{suggest(name, leaves)}"
            for name in sorted(set(names)) if not any(n == name or n.endswith("." + name) for n in found)]


def unmatched_targets(model, cfg) -> list[str]:
    """One problem per name of a ``target_modules`` list that matches no module of the model (a typo such as
    "querry" beside "value" would otherwise leave that layer unadapted in silence; peft raises only where no name
    matches). A regex string is peft's own rule and is not split."""
    if isinstance(cfg.target_modules, str):
        return []
    return unmatched_names(model, cfg.target_modules, "adapter_config.json 'target_modules'")


PEFT_HEAD_NAMES = ("classifier", "score")
"""The names peft itself adds to a classification adapter's ``modules_to_save`` (``PeftModelForSequenceClassification``),
whichever the model has: a saved SEQ_CLS adapter's config lists both."""


def name_problems(model, cfg, params) -> list[str]:
    """The names peft and the DoRA layer would skip in silence where another name matches: one problem per name
    of adapter_config.json ``modules_to_save`` that matches no module (peft's own head names of a SEQ_CLS
    adapter, ``PEFT_HEAD_NAMES``, aside), and of training_parameters ``magnitude_only_modules`` (seed 002's
    magnitude-only modules) that matches no nn.Linear, where another of its names does (none matching is the
    DoRA layer's own check). ``cfg``: the resolved peft config (``resolve_config``)."""
    saved = [n for n in cfg.modules_to_save or [] if not (cfg.task_type == "SEQ_CLS" and n in PEFT_HEAD_NAMES)]
    problems = unmatched_names(model, saved, "adapter_config.json 'modules_to_save'")
    wanted = set(params.magnitude_only_modules or [])
    missing = unmatched_names(model, wanted, "'magnitude_only_modules'", linear_only=True)
    return problems + (missing if len(missing) < len(wanted) else [])


def rank_for(cfg, name: str) -> int:
    from peft.utils.other import get_pattern_key

    if cfg.rank_pattern:
        key = get_pattern_key(cfg.rank_pattern.keys(), name)
        if key in cfg.rank_pattern:
            return cfg.rank_pattern[key]
    return cfg.r


def check_ranks(model, cfg) -> list[str]:
    """A rank above min(in, out) cannot be a low-rank factorisation of that layer."""
    problems = []
    targets = targeted_linears(model, cfg)
    if not targets:
        problems.append(f"adapter_config.json 'target_modules' = {cfg.target_modules!r} matches no nn.Linear of the model")
    else:
        problems += unmatched_targets(model, cfg)
    bad = {}
    for name, module in targets.items():
        r = rank_for(cfg, name)
        limit = min(module.in_features, module.out_features)
        if r > limit:
            bad.setdefault((r, limit, module.in_features, module.out_features), []).append(name)
    for (r, limit, i, o), names in bad.items():
        problems.append(
            f"adapter_config.json 'r' = {r} is larger than layer {names[0]} ({i}->{o}) allows "
            f"(at most {limit}); {len(names)} layer(s) affected"
        )
    return problems


def build_peft(model, cfg):
    from peft import get_peft_model

    return get_peft_model(model, cfg, autocast_adapter_dtype=True)


def lora_modules(peft_model):
    """(name, LoraLayer) pairs of the peft model."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]


def embeddings_trained(peft_model) -> bool:
    """True only when a base embedding matrix itself trains. peft's ``save_embedding_layers="auto"``
    stores full frozen copies of ``embed_tokens``/``lm_head`` whenever they carry LoRA (1.4 GB for
    Llama-3-8B that never changed); the adapter should hold what trained."""
    hf = peft_model.get_base_model()
    layers = [hf.get_input_embeddings(), hf.get_output_embeddings()]
    return any(getattr(layer, "weight", None) is not None and layer.weight.requires_grad
               for layer in layers if layer is not None)


class ResidualSaver:
    """Saves an adapter whose init changed the base weights (PiSSA, OLoRA, CorDA, ...) as a plain
    LoRA of rank 2r on the original base: ΔW = BA − B₀A₀ = [B | −B₀]·[A ; A₀] (peft's documented
    conversion), so ``PeftModel.from_pretrained(original_base, dir)`` reproduces the trained model.

    We do the concatenation ourselves from an in-memory snapshot of the initial A/B instead of
    peft's ``path_initial_model_for_weight_conversion``: peft 0.21 reloads the initial adapter for
    that, which fails with a KeyError when ``modules_to_save`` holds a BERT pooler.
    """

    def __init__(self, peft_model):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(peft_model)
        self.initial = {k: v.detach().to("cpu", copy=True) for k, v in state.items() if "lora_A" in k or "lora_B" in k}

    def save(self, peft_model, out_dir):
        import json
        from pathlib import Path

        from safetensors.torch import load_file, save_file

        from loralab.merge import delta_as_lora

        peft_model.save_pretrained(out_dir, save_embedding_layers=embeddings_trained(peft_model))
        path = Path(out_dir) / "adapter_model.safetensors"
        cfg_path = Path(out_dir) / "adapter_config.json"
        tensors, cfg = delta_as_lora(load_file(path), self.initial, json.loads(cfg_path.read_text()))
        save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


@torch.no_grad()
def freeze_lora_A(peft_model):
    for name, param in peft_model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)


@torch.no_grad()
def write_factors(layer, A: torch.Tensor, B: torch.Tensor, *, residual: bool) -> None:
    """Write an init's factors into a peft LoRA layer (adapter ``default``).

    ``A``: (r, in_features), ``B``: (out_features, r), any float dtype (cast to the adapter's).
    ``residual=True`` also replaces the frozen base weight W by W − s·B·A (s = the layer's
    scaling), computed in float32 from the factors as stored, so the model starts exactly at W
    (PiSSA/MiLoRA/SVD-LoRA-FA style). Raises ValueError on a shape mismatch.
    """
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    if tuple(A.shape) != tuple(a.shape) or tuple(B.shape) != tuple(b.shape):
        raise ValueError(f"factor shapes A {tuple(A.shape)}, B {tuple(B.shape)}; the layer needs {tuple(a.shape)}, {tuple(b.shape)}")
    a.copy_(A.to(a.dtype))
    b.copy_(B.to(b.dtype))
    if residual:
        W = layer.get_base_layer().weight
        s = layer.scaling["default"]
        W.copy_((W.float() - s * (b.float() @ a.float())).to(W.dtype))


def svd_factors(W: torch.Tensor, r: int, scaling: float, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s·B·A = U_k S_k V_kᵀ for k = the ``largest`` (PiSSA) or ``smallest`` (MiLoRA) r
    singular triplets of W (out×in), split as A = √(S/s)·Vᵀ, B = U·√(S/s) (PiSSA's split, Meng et al.
    2024 eq. 2-3, and peft's ``pissa_init``). Exact SVD in float32."""
    u, sv, vh = torch.linalg.svd(W.float(), full_matrices=False)
    idx = slice(0, r) if which == "largest" else slice(sv.shape[0] - r, sv.shape[0])
    root = (sv[idx] / scaling).sqrt()
    return root[:, None] * vh[idx], u[:, idx] * root


def init_each_layer(peft_model, factors, *, residual: bool) -> None:
    """Apply ``factors(layer) -> (A, B)`` to every LoRA layer and write them (``write_factors``):
    a new decomposition init is this call plus its factor function."""
    for _, layer in lora_modules(peft_model):
        A, B = factors(layer)
        write_factors(layer, A, B, residual=residual)
