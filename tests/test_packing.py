"""Packing as the training step packs (``loralab.run.step.Step``): the packed loss equals the
unpacked loss on the same samples, and no token attends across samples; grouping helpers cover
every sample once."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from loralab.data import collate
from loralab.run.step import Step
from loralab.speed.packing import length_grouped_batches, pack_groups
from loralab.speed.step import causal_lm_loss


def packed(features, max_length=None, pad_id=0, bucket=False):
    """The packed micro-batches the training step builds from ``features`` (one forward; rows of
    ``max_length`` tokens, default: all samples in one row; ``bucket``: CUDA-graph shapes)."""
    width = max_length or sum(len(f["input_ids"]) for f in features)
    step = Step(torch.nn.Module(), None, kind="causal_lm", normalization="tokens", micro_batch=None, packing=True,
                max_length=width, pad_to=None, pad_id=pad_id, device=torch.device("cpu"), graphs=bucket,
                max_grad_norm=0.0)
    return step.plan(features)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(smollm2_path)


def _gsm8k_features(data_dir, tokenizer, n=3):
    features = []
    with open(data_dir / "gsm8k" / "train.jsonl") as fh:
        for line in list(fh)[:n]:
            row = json.loads(line)
            prompt = tokenizer(f"Question: {row['question']}")["input_ids"][:24] + tokenizer("\nAnswer:")["input_ids"]
            answer = tokenizer(" " + row["answer"])["input_ids"][:16]
            features.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return features


def test_packed_loss_equals_unpacked_loss(smollm2, data_dir):
    model, tokenizer = smollm2
    features = _gsm8k_features(data_dir, tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for f in features:  # one sample at a time: no padding, no packing
            batch = {"input_ids": torch.tensor([f["input_ids"]]), "labels": torch.tensor([f["labels"]])}
            loss, n = causal_lm_loss(model, batch, chunked=False)
            total += loss.item() * n.item()
            count += n.item()
        (batch,) = packed(features)  # weighted by 1 / labelled tokens: the weighted sum is the mean
        loss, n = causal_lm_loss(model, batch)
    assert batch["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in features))
    assert n.item() == count
    assert loss.item() == pytest.approx(total / count, rel=1e-4)


def test_packed_samples_do_not_attend_across_boundaries():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    a, b, c = ({"input_ids": torch.randint(0, 100, (n,)).tolist()} for n in (7, 5, 9))
    changed = {"input_ids": [(t + 7) % 100 for t in a["input_ids"]]}
    with torch.no_grad():
        logits = [model(**{k: v for k, v in packed(fs)[0].items() if k in ("input_ids", "position_ids")},
                        use_cache=False).logits[0] for fs in ([a, b, c], [changed, b, c])]
        alone = model(input_ids=torch.tensor([b["input_ids"]]), use_cache=False).logits[0]
    assert not torch.allclose(logits[0][:7], logits[1][:7])  # sample a itself changed
    torch.testing.assert_close(logits[0][7:], logits[1][7:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[0][7:12], alone, rtol=1e-5, atol=1e-5)  # own positions restart at 0


def test_packing_masks_each_first_label_restarts_positions_and_truncates():
    features = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}, {"input_ids": [1] * 12}]
    (batch,) = packed(features, max_length=9, pad_id=0)  # the third sample is cut to 9 tokens, its own row
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0, 0], [1] * 9]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100, -100], [-100] + [1] * 8]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], list(range(9))]
    assert (batch["loss_weights"][0, 5:] == 0).all()  # the filler carries no loss


def test_packing_for_cuda_graphs_fills_rows_of_max_length_and_a_power_of_two_row_count():
    features = [{"input_ids": list(range(3, 3 + n))} for n in (20, 30, 9, 20, 30, 9, 40)]
    (batch,) = packed(features, max_length=64, bucket=True)
    assert batch["input_ids"].shape == (4, 64)  # 3 rows of samples, one zero-weight filler row
    assert (batch["loss_weights"][3] == 0).all()
    assert batch["position_ids"][0].tolist()[:60] == list(range(20)) + list(range(30)) + list(range(9)) + [0]


def test_pack_groups_fill_the_token_budget_and_cover_every_sample():
    lengths = [int(x) for x in torch.randint(1, 300, (500,), generator=torch.Generator().manual_seed(0))]
    groups = pack_groups(lengths, max_tokens=1024, seed=3)
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in g) <= 1024 for g in groups)
    assert sum(lengths) / (len(groups) * 1024) > 0.8  # little budget left unused


def test_length_grouped_batches_and_dynamic_padding():
    lengths = [int(x) for x in torch.randint(3, 60, (1000,), generator=torch.Generator().manual_seed(0))]
    batches = length_grouped_batches(lengths, batch_size=32, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded < 1.1 * sum(lengths)  # nearly no padding, against ~2x for random batches
    batch = collate([{"input_ids": [1, 2, 3], "labels": 1}, {"input_ids": [4] * 10, "labels": 0}], 0, multiple_of=8)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist() == [3, 10]
    assert batch["labels"].tolist() == [1, 0]


def test_plain_causal_batches_use_unmasked_causal_attention(smollm2, data_dir):
    """A batch with neither padding nor packing runs through SDPA's is_causal path (no mask built,
    also inside a CUDA graph capture) and gives the loss of the masked computation."""
    from loralab.speed.attention import CAUSAL_SDPA

    model, tokenizer = smollm2
    features = _gsm8k_features(data_dir, tokenizer, n=2)
    width = min(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"][:width] for f in features])
    labels = torch.tensor([f["labels"][:width] for f in features])
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_hook(
        lambda module, args, out: seen.append(module.config._attn_implementation))
    try:
        with torch.no_grad():
            plain, _ = causal_lm_loss(model, {"input_ids": ids, "labels": labels})
            masked, _ = causal_lm_loss(model, {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    finally:
        hook.remove()
    assert seen == [CAUSAL_SDPA, "sdpa"]
    assert model.config._attn_implementation == "sdpa"  # restored
    assert plain.item() == pytest.approx(masked.item(), rel=1e-5)
