"""Shared fixtures: the real data in ../shared/data and the PyPI-packaged real models."""

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one of pytest-xdist's workers (`-n auto`, as .ci/run runs the suite): one compute thread per worker, and
    # in the processes the tests start, so that two workers on two cores do not each run two threads (the
    # suite took 12 min 2 s so on this project's 2-core machine, 21 min 58 s in one process, results/ci-times.md)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if not torch.cuda.is_available():
    # Triton's CPU interpreter for the FP8 kernel's tests (test_fp8_kernels.py). Triton reads it when
    # it is first imported (its standard library's functions are jitted then), so it is set before
    # any test can import it; without CUDA nothing else here runs Triton kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LORALAB_DATA_DIR", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.exists():
        pytest.fail(f"real data folder {DATA_DIR} is missing (set LORALAB_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from loralab.models import resolve_model_path

    return resolve_model_path("packaged:minilm-l6")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """SmolLM2-135M-Instruct converted once from its GGUF file into a transformers folder."""
    from loralab.models import resolve_model_path

    return resolve_model_path("packaged:smollm2-135m")


SMOLLM2_CUT_LAYERS = 2


@pytest.fixture(scope="session")
def smollm2_cut_path(smollm2_path, tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct cut to its first ``SMOLLM2_CUT_LAYERS`` of 30 decoder layers (real
    weights, real tokenizer, tied head as shipped), saved once as a model folder that ``loralab run``
    takes as ``model_id``. For run-path tests whose property does not depend on depth (every layer
    runs the same code): each of their runs, often in several processes, otherwise pays for the 30
    layers' training steps, generation and the 540 MB file's load and hash."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    model.model.layers = model.model.layers[:SMOLLM2_CUT_LAYERS]
    model.config.num_hidden_layers = SMOLLM2_CUT_LAYERS
    folder = tmp_path_factory.mktemp("smollm2-cut") / f"smollm2-135m-{SMOLLM2_CUT_LAYERS}-layers"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def _isolated_results(tmp_path, monkeypatch):
    """No test writes into the repository's results folders."""
    monkeypatch.setenv("LORALAB_RESULTS_DIR", str(tmp_path / "loralab-results"))
    monkeypatch.setenv("LORALAB_OUTPUT_DIR", str(tmp_path / "loralab-outputs"))


@pytest.fixture
def load_script(monkeypatch):
    """``load_script(name)``: the module of ``scripts/<name>.py``, loaded as ``python scripts/<name>.py`` runs it,
    with ``scripts/`` on ``sys.path`` (the scripts import their shared helpers from there, e.g. kernel_timing)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO / "scripts"))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
