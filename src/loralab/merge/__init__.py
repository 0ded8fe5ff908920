"""Merging adapters into their base, and PiSSA/CorDA adapters into plain LoRA.

``merge_adapter``: base (a residual model for PiSSA/CorDA, the original one for LoRA/DoRA) plus
a peft adapter -> one plain transformers checkpoint, through peft's ``merge_and_unload``
(W' = W + s B A; DoRA rescales by its magnitude vector). The model class comes from the
adapter's ``task_type`` (``TASK_CLASSES``: ``SEQ_CLS`` -> ``AutoModelForSequenceClassification``
with ``num_labels`` read from the saved head, ``CAUSAL_LM`` -> ``AutoModelForCausalLM``, ...), so
a classification adapter's trained head (``modules_to_save``: classifier, pooler) becomes part of
the checkpoint and ``AutoModelForSequenceClassification.from_pretrained(out)`` gives the unmerged
model's logits (issue 12: the head used to be dropped). An adapter without ``task_type`` and
without saved modules merges into the base checkpoint's own architecture. What cannot be merged faithfully raises
``MergeError`` naming the problem: an unknown ``task_type`` (or none, with saved modules), a prompt-learning adapter
(nothing to merge into weights), base weights that loading had to initialise at random and that
the adapter does not carry (the merged model would not be the trained one), a base that does not
fit the adapter.

Exact for every base variation and for tied weights (issue 21), or refused:
- **The base the adapter trained on.** loralab saves ``loralab_base.json`` beside
  adapter_config.json (``methods/qlora.py``: ``BASE_FILE``). For an NF4 base (QLoRA, LoftQ) the
  merge loads the float checkpoint, quantises the recorded modules exactly as training did, checks
  the packed codes against the recorded fingerprints, dequantises, and merges there: the trained
  model computed with the dequantised NF4 weights, not the float ones (merging into the float base
  changed 1-4 argmax tokens in 64). Missing bitsandbytes, or a base that quantises to other codes,
  is a ``MergeError``. An FP8 base (``methods/fp8base.py``) is reproduced the same way: the
  recorded modules re-quantised by the same rule (per-channel amax/448, float8_e4m3fn), their codes
  and scales checked against the fingerprints, and the merge made into codes · scale (the trained
  model's weights exactly; its FP8 activation rounding is not part of a merged checkpoint). A
  folder without the file (a plain peft adapter) trained on a float base.
- **Tied weights.** SmolLM2's ``lm_head`` shares ``embed_tokens``' tensor; a merge writes its delta
  into both. A module the adapter touches (a LoRA layer's base, a ``modules_to_save`` module) whose
  weight is shared gets its own copy first, and the written config says
  ``tie_word_embeddings: false``.
- **Precision.** The merge runs in float32 (the base loaded in the dtype it trained in, then
  upcast); ``--dtype`` only casts the written checkpoint.

``merged_copy(peft_model)`` is the same merge for a model in memory (the vLLM generation path): the
adapter's state and config are lifted off a copy, its base is dequantised and untied, and the
adapter is put back and merged, so a fast forward patch, a residual base (PiSSA, ...) or a
modules_to_save copy are all reproduced as trained.

``convert_to_lora`` (``loralab merge --to-lora``, in ``merge.convert``): a trained PiSSA/CorDA adapter
and its initial one -> the rank-2r LoRA that gives the trained model on the original base.

``quiet_corda_config()``: loading a saved CorDA adapter, peft warns that its ``corda_config`` "will be
ignored"; loralab's loads (merge, eval) silence that one warning.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from loralab.merge.convert import _load_adapter, convert_to_lora, delta_as_lora  # noqa: F401 - this module's API

TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}
"""peft ``task_type`` -> the transformers class whose checkpoint the merge writes."""
LABEL_HEADS = ("classifier", "score")


class MergeError(ValueError):
    """The adapter cannot be merged into a faithful checkpoint; the message says why."""


def _num_labels(weights: dict) -> int | None:
    """Rows of the saved head's output layer (``classifier``/``score``, BERT's or RoBERTa's)."""
    candidates = [(k, v) for k, v in weights.items() if k.endswith(".weight") and v.ndim == 2
                  and any(f".{h}." in f".{k}" for h in LABEL_HEADS) and "lora_" not in k]
    if not candidates:
        return None
    out_proj = [v for k, v in candidates if k.endswith("out_proj.weight")]  # RoBERTa: classifier.dense, then out_proj
    return int((out_proj or [candidates[-1][1]])[0].shape[0])


CORDA_CONFIG_IGNORED = r"`corda_config` specified but will be ignored when `init_lora_weights` is not 'corda'"
"""peft's warning (``LoraConfig.__post_init__``) on every load of a saved CorDA adapter (a regular expression)."""


@contextlib.contextmanager
def quiet_corda_config():
    """Silence ``CORDA_CONFIG_IGNORED`` (a UserWarning), only that one, inside the block. Harmless where a
    *saved* adapter loads: CorDA's factors are in its weights, which is why it records ``init_lora_weights:
    true``; ``corda_config`` stays in the file as the record of how they were made (``residual_base_problem``
    reads it), and nothing loading needs is ignored. A newcomer read the warning as an error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=CORDA_CONFIG_IGNORED, category=UserWarning)
        yield


def _check_adapter(adapter: str) -> tuple[dict, dict]:
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise MergeError(f"--adapter {adapter!r} holds no adapter_config.json: not a peft adapter folder")
    config, weights = _load_adapter(folder)
    if config.get("peft_type") in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING",
                                   "ADAPTION_PROMPT", "CPT"):
        raise MergeError(f"peft_type {config['peft_type']!r} is a prompt-learning adapter: it adds virtual tokens, "
                         "not weight deltas, so there is nothing to merge; load it with PeftModel.from_pretrained instead")
    task_type = config.get("task_type")
    if task_type is None and config.get("modules_to_save"):
        raise MergeError(f"adapter_config.json has no 'task_type' but saves modules {config['modules_to_save']!r}: cannot "
                         f"tell which model (and head) they belong to; set 'task_type' in {adapter}/adapter_config.json "
                         f"to one of {', '.join(TASK_CLASSES)}")
    if task_type is not None and task_type not in TASK_CLASSES:
        raise MergeError(f"adapter_config.json 'task_type' = {task_type!r} is not one loralab can merge; "
                         f"allowed: {', '.join(TASK_CLASSES)}")
    return config, weights


def residual_base_problem(adapter, base: str | None, flag: str = "--base",
                          named: str = "its base_model_name_or_path") -> str | None:
    """Why ``base``, the base an adapter records (``base_model_name_or_path``, the default of
    ``loralab merge``/``eval``), is not the model a CorDA adapter belongs to, or None.

    An adapter whose config still carries ``corda_config`` (CorDA's initial adapter, or one trained
    from it) belongs to the residual model W - s·B0·A0 the decomposition saved; on the original model
    it silently gives another model (SmolLM2-135M: logits off by up to 28). ``loralab decompose``
    marks its residual folder (``decompose.json``) and records it as the adapter's base; a base
    without the mark (peft's CorDA example records the original model, as loralab did before) is
    refused. Converted adapters (``--to-lora``, ``loralab run``'s) carry no ``corda_config``. ``named`` says
    where ``base`` came from in the message (``loralab run``'s ``init_adapter``: "'model_id'")."""
    from loralab.decomposition.residual import RESIDUAL_MARKER

    path = Path(adapter) / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not an adapter folder: the loaders say so
    if not config.get("corda_config"):
        return None
    if base and (Path(base).expanduser() / RESIDUAL_MARKER).is_file():
        return None
    parent = Path(adapter).resolve().parent
    hint = f" (here: {flag} {parent})" if (parent / RESIDUAL_MARKER).is_file() else ""
    return (f"the adapter in {str(adapter)!r} carries 'corda_config': CorDA's decomposition made it for the residual "
            f"model it saved (loralab decompose --save-path DIR: DIR; peft's CorDA example: its save_path), but "
            f"{named} {base!r} is not such a model (no {RESIDUAL_MARKER} there); on the original model "
            f"the adapter gives another model, not the decomposed one. Pass {flag} with the residual model's folder"
            f"{hint}")


def _model_class(task_type: str | None, path: str):
    """The transformers class to load the base with: the task type's, or (no task type, no saved
    modules) the base checkpoint's own architecture, which keeps every weight the base has."""
    import transformers

    if task_type is not None:
        return getattr(transformers, TASK_CLASSES[task_type])
    architectures = transformers.AutoConfig.from_pretrained(path).architectures or []
    if not architectures or not hasattr(transformers, architectures[0]):
        raise MergeError(f"the adapter has no 'task_type' and the base {path!r} names no known architecture "
                         f"({architectures!r}); set 'task_type' in adapter_config.json to one of {', '.join(TASK_CLASSES)}")
    return getattr(transformers, architectures[0])


def read_base_record(adapter) -> dict:
    """The adapter folder's ``loralab_base.json``, or ``{"base": "float"}`` for a plain peft
    adapter without one. Raises ``MergeError`` for a record loralab cannot reproduce."""
    from loralab.methods.qlora import BASE_FILE, RECORD_FORMAT

    path = Path(adapter) / BASE_FILE
    if not path.is_file():
        return {"base": "float"}
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:
        raise MergeError(f"{path} is not valid JSON ({exc}): cannot tell which base the adapter trained on") from exc
    if record.get("format", RECORD_FORMAT) > RECORD_FORMAT:
        raise MergeError(f"{path} has format {record['format']}, newer than this loralab reads ({RECORD_FORMAT}); upgrade loralab")
    if record.get("base") not in ("float", "nf4", "fp8"):
        raise MergeError(f"{path}: 'base' = {record.get('base')!r} is not one loralab can reproduce; "
                         "allowed: 'float', 'nf4', 'fp8'")
    if record["base"] == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            q = record.get("quantization", {})
            raise MergeError(
                f"the adapter trained on an NF4 base ({path}: {q.get('quant_type', 'nf4')}, blocks of {q.get('blocksize')}, "
                f"bitsandbytes {q.get('version')}): merging it exactly means quantising the base the same way, which "
                "needs the PyPI package 'bitsandbytes' (pip install bitsandbytes); it is not installed") from exc
    return record


def _touched_modules(peft_model) -> list[tuple[str, nn.Module, bool]]:
    """(name, module holding the base weight, is a modules_to_save copy) for everything the adapter changes."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    out = []
    for name, module in peft_model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            out.append((name, module.original_module, True))
        elif isinstance(module, BaseTunerLayer):
            out.append((name, module.get_base_layer(), False))
    return out


@torch.no_grad()
def untie_touched(peft_model) -> list[str]:
    """Give every weight the adapter changes and another module shares (a tied ``lm_head`` /
    ``embed_tokens``) its own copy, so merging leaves the other module as it was. Returns
    "a <-> b" for each tie broken (empty: nothing touched is tied)."""
    owners: dict[int, list[str]] = {}
    for name, module in peft_model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    broken = []
    for name, base, saved_copy in _touched_modules(peft_model):
        for pname, p in list(base.named_parameters(recurse=False)):
            others = [o for o in owners.get(id(p), []) if o != name and not o.startswith(name + ".")]
            if not others:
                continue
            broken.append(f"{_base_name(name)} <-> {_base_name(others[0])}")
            if not saved_copy:  # a modules_to_save copy already holds its own tensor
                setattr(base, pname, nn.Parameter(p.detach().clone(), requires_grad=False))
    return broken


def _base_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")


def _merge_onto(base, config, state: dict):
    """The one merge: ``base`` holds float weights (dequantised where the adapter trained on NF4);
    put the adapter (peft ``config`` + state dict) on it, untie what it touches, merge, unload."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    config = copy.deepcopy(config)
    config.init_lora_weights = True  # the trained factors are loaded below; no init may touch the base
    config.inference_mode = True
    try:
        peft_model = get_peft_model(base, config)
        expected = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
        missing = sorted(expected - set(state))
        if missing:
            raise MergeError(f"the adapter lacks {len(missing)} tensor(s) its config implies (e.g. {missing[:2]})")
        result = set_peft_model_state_dict(peft_model, state)
    except MergeError:
        raise
    except Exception as exc:  # noqa: BLE001 - peft/torch raise many types for a mismatched pair; all mean "refuse"
        raise MergeError(f"the adapter does not fit the base: {type(exc).__name__}: {str(exc)[:500]}") from exc
    if result.unexpected_keys:
        raise MergeError(f"the adapter holds {len(result.unexpected_keys)} tensor(s) the base has no place for "
                         f"(e.g. {result.unexpected_keys[:2]})")
    broken = untie_touched(peft_model)
    try:
        merged = peft_model.merge_and_unload()
    except Exception as exc:  # noqa: BLE001 - e.g. a layer type peft cannot merge
        raise MergeError(f"peft cannot merge this adapter: {type(exc).__name__}: {str(exc)[:500]}") from exc
    if broken:
        for cfg in {id(c): c for c in (merged.config, merged.config.get_text_config())}.values():
            cfg.tie_word_embeddings = False
    return merged


def merged_copy(model, dtype: torch.dtype | None = None):
    """A standalone model computing what the in-memory ``model`` computes: a peft model's active
    adapter merged exactly (NF4 base dequantised, touched tied weights untied, the merge done in
    float32), returned in ``dtype`` (default: the dtype of the base's unquantised weights, e.g.
    float32, or bfloat16 for a bf16 base: then rounded once, after the merge). A model without an
    adapter is deep-copied. ``model`` is left unchanged."""
    from peft import get_peft_model_state_dict

    from loralab.methods.qlora import base_dtype, dequantize_linears

    work = copy.deepcopy(model)
    if not hasattr(work, "peft_config"):
        return work
    name = work.active_adapter
    config = work.peft_config[name]
    if config.is_prompt_learning:
        raise MergeError(f"peft_type {config.peft_type} is a prompt-learning adapter: nothing to merge into weights")
    dtype = dtype or base_dtype(work)
    state = {k: v.detach().clone() for k, v in
             get_peft_model_state_dict(work, adapter_name=name, save_embedding_layers=False).items()}
    base = dequantize_linears(work.unload()).float()
    return _merge_onto(base, config, state).to(dtype)


def merge_adapter(base: str, adapter: str, out_dir: str, dtype: str = "float32") -> Path:
    """Load ``base`` (folder, hub id or ``packaged:<name>``) as the adapter's ``task_type`` says and
    as it trained (``loralab_base.json``: float, or NF4 / FP8 re-quantised and dequantised), apply the peft
    adapter in ``adapter``, merge in float32, save to ``out_dir`` in ``dtype`` (weights, config,
    tokenizer).

    Raises ``MergeError`` (see the module docstring) before writing anything when the result would
    not be the trained model."""
    import transformers
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    from loralab.methods import fp8base, qlora
    from loralab.models import resolve_model_path

    config, weights = _check_adapter(adapter)
    record = read_base_record(adapter)
    task_type = config.get("task_type")
    path = resolve_model_path(base)
    kwargs = {}
    if task_type in ("SEQ_CLS", "TOKEN_CLS"):
        num_labels = _num_labels(weights)
        if num_labels is None:
            raise MergeError(f"task_type {task_type} but the adapter saves no classification head (modules_to_save = "
                             f"{config.get('modules_to_save')!r}): the head it was trained with is lost, so no merged "
                             "checkpoint can reproduce it")
        kwargs["num_labels"] = num_labels
        if task_type == "SEQ_CLS":
            kwargs["problem_type"] = "regression" if num_labels == 1 else "single_label_classification"
    cls = _model_class(task_type, path)
    trained_dtype = getattr(torch, record.get("dtype", "float32"))
    model, info = cls.from_pretrained(path, dtype=trained_dtype, output_loading_info=True, **kwargs)
    saved = set(config.get("modules_to_save") or [])
    unsaved = [k for k in info["missing_keys"] if not any(part in saved for part in k.split("."))]
    if unsaved:
        raise MergeError(f"loading {base!r} as {cls.__name__} initialised {len(unsaved)} weight(s) at random "
                         f"that the adapter does not carry (e.g. {unsaved[:3]}); the merged model would not be the "
                         f"trained one. modules_to_save = {sorted(saved)!r}")
    model = model.float()
    if record["base"] == "nf4":
        q = record.get("quantization", {})
        if q.get("device") == "cuda" and torch.cuda.is_available():
            model = model.to("cuda")  # bitsandbytes quantises on the weights' device, as training did
        problems = qlora.quantize_as_recorded(model, record)
        if problems:
            raise MergeError(f"the adapter trained on an NF4 base that {base!r} does not reproduce bit for bit: "
                             + "; ".join(problems))
        model = qlora.dequantize_linears(model)
    elif record["base"] == "fp8":
        problems = fp8base.quantize_as_recorded(model, record)
        if problems:
            raise MergeError(f"the adapter trained on an FP8 base that {base!r} does not reproduce bit for bit: "
                             + "; ".join(problems))
        model = fp8base.dequantize_linears(model)
    with quiet_corda_config():
        merged = _merge_onto(model, PeftConfig.from_pretrained(adapter), load_peft_weights(adapter, device="cpu"))
    out = Path(out_dir)
    merged.to(device="cpu", dtype=getattr(torch, dtype)).save_pretrained(out)
    try:
        transformers.AutoTokenizer.from_pretrained(path).save_pretrained(out)
    except (OSError, ValueError):  # a weights-only folder has no tokenizer to copy
        pass
    return out
