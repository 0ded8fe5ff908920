"""A model's skeleton: the architecture ``models.load_model`` would build for a ``model_id``, built from its
transformers config alone on the meta device (``torch.device("meta")``), so no weight is read, downloaded or
allocated (tens of milliseconds, an 8B shape included). The checks that need only module names and layer shapes
(``target_modules`` names, ``null`` and ``all-linear`` resolution, ranks, tied weights) run on it when an
experiment is read (``experiment.skeleton_problems``), before ``loralab run`` loads the weights.

Where the config cannot be had cheaply, there is no skeleton (None) and those checks wait for the load, as
before: a GGUF file that has not been converted yet (its conversion reads the weights; reading the config from
its header alone takes seconds), a hub id that is neither reachable nor in the Hugging Face cache, or any config
or architecture transformers cannot build. A ``random:<shape>`` id is built from the shape table
(``shapes.MODELS``) without its tokenizer: the vocabulary and special token ids, which ``models.random_config``
fits to the tokenizer, shape no layer a check reads (embeddings and ``lm_head`` keep their hidden size).
"""

from __future__ import annotations

from loralab.models import RANDOM_PREFIX, hub_offline_reason, is_hub_id, random_config, resolve_model_path


def model_config(model_id: str, kind: str, num_labels: int = 2):
    """The transformers config ``load_model(model_id, kind, num_labels)`` builds its model from (head size and
    problem type of a ``seq_cls`` model included), read without weights and without waiting on the network; None
    where it cannot be had so (see the module's docstring). Never raises."""
    from transformers import AutoConfig

    labels = {} if kind != "seq_cls" else {
        "num_labels": num_labels, "problem_type": "regression" if num_labels == 1 else "single_label_classification"}
    try:
        if model_id.startswith(RANDOM_PREFIX):
            return random_config(model_id, kind, num_labels, fit_tokenizer=False)
        path = resolve_model_path(model_id, convert=False)
        if path is None:
            return None
        offline = is_hub_id(path) and hub_offline_reason() is not None
        return AutoConfig.from_pretrained(path, **labels, **({"local_files_only": True} if offline else {}))
    except Exception:  # noqa: BLE001 - no config cheaply: the load reads it (and reports its own error)
        return None


def build_skeleton(model_id: str, kind: str, num_labels: int = 2):
    """The model ``load_model(model_id, kind, num_labels)`` returns, every parameter and buffer on the meta
    device (shapes, names and tied weights as loaded; no values, no memory). ``kind``: ``seq_cls`` or
    ``causal_lm``. None where ``model_config`` has no config or transformers cannot build the class; never raises."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = model_config(model_id, kind, num_labels)
    cls = {"seq_cls": AutoModelForSequenceClassification, "causal_lm": AutoModelForCausalLM}.get(kind)
    if config is None or cls is None:
        return None
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except Exception:  # noqa: BLE001 - an architecture transformers cannot build: the load says why
        return None
