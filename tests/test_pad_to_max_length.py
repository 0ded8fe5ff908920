"""``pad_to_max_length: true`` (the CorDA reproduction's padding): the tokenizer pads every sample to ``max_length``
itself, and the batches keep its attention mask, so pad tokens are never attended and predictions are those of
dynamic padding."""

import torch

from loralab.config import build_parameters
from loralab.data import collate


def test_collate_keeps_a_samples_own_attention_mask():
    """A sample that arrives padded (the tokenizer's ``padding="max_length"``) keeps its zeros; one without a mask
    gets ones over its tokens; the batch's own padding is zero either way."""
    batch = collate([{"input_ids": [5, 6, 0, 0], "attention_mask": [1, 1, 0, 0], "labels": 1},
                     {"input_ids": [7, 8, 9], "attention_mask": [1, 1, 1], "labels": 0}], pad_id=0)
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    assert collate([{"input_ids": [7, 8], "labels": 0}], pad_id=0, pad_to=3)["attention_mask"].tolist() == [[1, 1, 0]]


def test_minilm_sst2_predictions_are_the_same_padded_to_max_length_or_not(data_dir):
    """Real MiniLM-L6 on real SST-2 sentences: logits with every sample padded to 128 tokens by the tokenizer equal
    those of dynamic padding (before the fix the pad tokens were attended and the logits moved)."""
    from loralab.models import load_model, load_tokenizer
    from loralab.tasks import get_task
    from loralab.tasks.glue import predict

    task, tok = get_task("glue/sst2"), load_tokenizer("packaged:minilm-l6")
    torch.manual_seed(0)
    model = load_model("packaged:minilm-l6", "seq_cls", 2).eval()
    logits = {}
    for padded in (False, True):
        params = build_parameters({"task": "glue/sst2", "data_dir": str(data_dir), "max_length": 128,
                                   "pad_to_max_length": padded, "max_train_samples": 4, "max_eval_samples": 16,
                                   "eval_batch_size": 8})
        data = task.load(params, tok)
        assert all(len(f["input_ids"]) == 128 for f in data.eval) is padded
        logits[padded] = predict(model, tok, data.eval, params)
    assert abs(logits[True] - logits[False]).max() < 1e-4, abs(logits[True] - logits[False]).max()
