"""The GLUE evaluation's ``loss``: the loss the head trains with, on the dev rows (seed 003's per-epoch val_loss
curve), the number transformers' own head computes from the same batch."""

import pytest
import torch

from loralab.models import load_model, load_tokenizer
from loralab.tasks.glue import TASKS, score_dev


@pytest.mark.parametrize("task,num_labels", [("glue/rte", 2), ("glue/stsb", 1)])
def test_dev_loss_is_the_heads_own_loss(minilm_path, data_dir, task, num_labels):
    torch.manual_seed(0)
    model = load_model(str(minilm_path), "seq_cls", num_labels).eval()
    tok = load_tokenizer(str(minilm_path))
    metrics = score_dev(TASKS[task], model, tok, data_dir, max_samples=6, batch_size=6)
    rows, _ = TASKS[task].read("dev", data_dir)
    texts, labels = zip(*rows[:6])  # rows: (texts, label)
    batch = tok(*map(list, zip(*texts)), padding=True, truncation=True, max_length=128, return_tensors="pt")
    labels = torch.tensor(labels, dtype=torch.float32 if num_labels == 1 else torch.long)
    with torch.no_grad():
        expected = model(**batch, labels=labels).loss.item()  # MSELoss for one label, cross-entropy else
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["headline"] == TASKS[task].metrics[0] and metrics["rows"] == 6
