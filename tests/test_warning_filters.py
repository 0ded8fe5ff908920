"""The test run's warning filters (issue 24.6: 216, later 668, harmless library warnings were the
last thing the suite printed): each filter names a third-party message and category with its reason,
and none can hide a warning loralab itself raises."""

import ast
import re
import tomllib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = ROOT / "pyproject.toml"


def filters() -> list[str]:
    return tomllib.loads(SECTION.read_text())["tool"]["pytest"]["ini_options"]["filterwarnings"]


def loralab_warning_texts() -> list[str]:
    """The literal text of every warning src/loralab raises (f-strings with their fields blank)."""
    texts = []
    for path in (ROOT / "src" / "loralab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "warn" and node.args:
                parts = [v.value for v in ast.walk(node.args[0]) if isinstance(v, ast.Constant) and isinstance(v.value, str)]
                texts.append("".join(parts))
    return texts


def test_each_filter_ignores_one_message_and_category_with_a_reason():
    lines = SECTION.read_text().splitlines()
    for entry in filters():
        action, message, category = entry.split(":")
        assert action == "ignore" and len(message) >= 30  # a message, not a whole category
        assert category in ("FutureWarning", "DeprecationWarning", "UserWarning")
        at = next(i for i, line in enumerate(lines) if f'"{entry}"' in line)
        above = lines[at - 1].strip()
        assert above.startswith("#") or lines[at - 1].strip().startswith('"ignore:'), entry  # a group under its reason


def test_no_filter_hides_a_loralab_warning():
    texts = loralab_warning_texts()
    assert len(texts) >= 3
    for entry in filters():
        message = entry.split(":")[1]
        assert not [t for t in texts if re.match(message, t, re.IGNORECASE)], entry


@pytest.mark.parametrize("text, category, hidden", [
    ("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, True),
    ("The PEFT config's `base_model_name_or_path` was renamed from 'a' to 'b'.", UserWarning, True),
    ("`is_gradient_checkpointing` is deprecated", UserWarning, False),  # the category counts too
    ("n_samples = 4 with greedy decoding (temperature 0) gives identical samples", UserWarning, False),
])
def test_filters_apply_to_the_tests(text, category, hidden):
    with warnings.catch_warnings(record=True) as seen:
        for entry in filters():  # as pytest applies them to every test
            _, message, name = entry.split(":")
            warnings.filterwarnings("ignore", message, {"FutureWarning": FutureWarning, "UserWarning": UserWarning,
                                                        "DeprecationWarning": DeprecationWarning}[name])
        warnings.warn(text, category)
    assert (not seen) is hidden
