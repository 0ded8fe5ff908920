"""Shared fixtures: the real data in ../shared/data and the PyPI-packaged real models."""

import os
from pathlib import Path

import pytest

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


@pytest.fixture(autouse=True)
def _isolated_results(tmp_path, monkeypatch):
    """No test writes into the repository's results folders."""
    monkeypatch.setenv("LORALAB_RESULTS_DIR", str(tmp_path / "loralab-results"))
    monkeypatch.setenv("LORALAB_OUTPUT_DIR", str(tmp_path / "loralab-outputs"))
