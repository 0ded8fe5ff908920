"""The training step: the micro-batch never changes the result. Same gradients for 4x1, 1x4, 2x2,
packed and unpacked, under both loss normalisations, against the textbook loss computed one sample
at a time — on SmolLM2 with real GSM8K rows (and on MiniLM with real RTE pairs). SmolLM2 is cut to
its first 2 decoder layers (conftest's ``smollm2_cut_path``, real weights): padding, packing and the
loss weights act on the sequence at every layer alike, so the 28 others added cost (about 20 s on 2
cores), not coverage. Measured against the textbook: losses within 1.3e-7 relative (5.5e-6 on all 30
layers) and gradients within 2.4e-7 (1.3e-6), tolerances 1e-5 and 1e-4; tokens vs samples differ by
1.5e-2 (9.8e-2), the floor 1e-3."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from loralab.config import build_parameters
from loralab.run.step import Step, sample_weights
from loralab.tasks.instruct import TASKS as INSTRUCT


class GradRecorder(torch.optim.Optimizer):
    """Stands in for AdamW: keeps a copy of the gradients the step produced, changes nothing."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads = None

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]


@pytest.fixture(scope="module")
def smol(smollm2_cut_path, data_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_cut_path, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # B = 0 at init would give A no gradient; make both factors live
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_cut_path)

    task = INSTRUCT["gsm8k"]  # prompt-masked features exactly as the gsm8k training task builds them
    params = build_parameters({"task": "gsm8k", "max_length": 160, "max_train_samples": 16, "data_dir": str(data_dir)})
    data = task.load(params, tokenizer)
    features = sorted(data.train, key=lambda f: len(f["input_ids"]))[:4]  # the 4 shortest real rows
    assert len({len(f["input_ids"]) for f in features}) > 1  # real, unequal lengths
    return model.train(), tokenizer, features


def textbook_grads(model, features, normalization):
    """One sample at a time, no padding, no packing: the loss as the normalisation defines it."""
    model.zero_grad(set_to_none=True)
    per_sample = []
    for f in features:
        ids = torch.tensor([f["input_ids"]])
        labels = torch.tensor([f["labels"]])
        logits = model(input_ids=ids).logits[0, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="none")
        mask = labels[0, 1:] != -100
        per_sample.append((ce[mask].sum(), mask.sum()))
    if normalization == "tokens":
        loss = sum(s for s, _ in per_sample) / sum(n for _, n in per_sample)
    else:
        loss = sum(s / n for s, n in per_sample) / len(per_sample)
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def step_grads(model, features, *, normalization, micro_batch, packing):
    opt = GradRecorder([p for p in model.parameters() if p.requires_grad])
    step = Step(model, opt, kind="causal_lm", normalization=normalization, micro_batch=micro_batch, packing=packing,
                max_length=160, pad_to=None, pad_id=0, device=torch.device("cpu"), graphs=False, max_grad_norm=0.0)
    stats = step(features)
    return stats.loss, opt.grads


def rel(a, b):
    return float(torch.linalg.vector_norm(torch.cat([x.flatten() for x in a]) - torch.cat([x.flatten() for x in b]))
                 / torch.linalg.vector_norm(torch.cat([x.flatten() for x in b])))


@pytest.mark.slow
@pytest.mark.parametrize("normalization", ["tokens", "samples"])
def test_micro_batch_never_changes_the_step(smol, normalization):
    model, _, features = smol
    ref_loss, ref = textbook_grads(model, features, normalization)
    # 1x4 and 2x2 padded, 4x1 and 2x2 packed (one padded 4x1 and one row of 4 packed are both
    # covered by the two cases of the other normalisation)
    cuts = [(1, False), (2, False), (4, True)] if normalization == "tokens" else [(4, False), (2, True), (1, True)]
    for micro, packing in cuts:
        loss, grads = step_grads(model, features, normalization=normalization, micro_batch=micro, packing=packing)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5), (micro, packing)
        assert rel(grads, ref) < 1e-4, (micro, packing, rel(grads, ref))


@pytest.mark.slow
def test_the_two_normalisations_differ_on_unequal_lengths(smol):
    """Not a tautology: on real rows of unequal length the two definitions give different steps."""
    model, _, features = smol
    _, tokens = textbook_grads(model, features, "tokens")
    _, samples = textbook_grads(model, features, "samples")
    assert rel(tokens, samples) > 1e-3


def test_sample_weights_definition():
    feats = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},            # 2 labelled tokens
             {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]},  # 3
             {"input_ids": [1, 2], "labels": [-100, -100]}]                 # none
    assert sample_weights(feats, "tokens") == pytest.approx([1 / 5] * 3)
    assert sample_weights(feats, "samples") == pytest.approx([1 / (2 * 2), 1 / (2 * 3), 0.0])
    with pytest.raises(ValueError, match="tokens, samples"):
        sample_weights(feats, "mean")
@pytest.mark.slow  # over 2 s on 2 cores: the full suite runs it (the fast subset's 2-minute budget)
def test_classification_step_equals_mean_over_samples(minilm_path, data_dir):
    """MiniLM on real RTE pairs (token_type_ids kept): a 3+2+2 cut equals one batch of 7."""

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from loralab.tasks import get_task

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    tok = AutoTokenizer.from_pretrained(minilm_path)
    params = build_parameters({"task": "glue/rte", "max_train_samples": 7, "max_eval_samples": 1,
                               "data_dir": str(data_dir)})
    feats = get_task("glue/rte").load(params, tok).train[:7]
    assert "token_type_ids" in feats[0]
    grads = []
    for micro in (7, 3):
        opt = GradRecorder([p for p in model.parameters() if p.requires_grad])
        Step(model, opt, kind="seq_cls", normalization="tokens", micro_batch=micro, packing=False, max_length=128,
             pad_to=None, pad_id=0, device=torch.device("cpu"), graphs=False, max_grad_norm=0.0)(feats)
        grads.append(opt.grads)
    model.zero_grad(set_to_none=True)
    from loralab.data import collate

    model(**collate(feats, 0)).loss.backward()  # transformers' own mean loss over the 7 pairs
    ref = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    assert rel(grads[0], ref) < 1e-4 and rel(grads[1], ref) < 1e-4


def test_packed_plan_shapes_for_graphs_and_single_sample_rows():
    """Under CUDA graphs packed micro-batches are max_length wide with a power-of-two row count
    (few shapes to capture); rows holding one sample each drop position_ids (plain causal kernel)."""
    feats = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in (100, 90, 80)]
    step = Step(torch.nn.Linear(1, 1), None, kind="causal_lm", normalization="tokens", micro_batch=4, packing=True,
                max_length=128, pad_to=None, pad_id=0, device=torch.device("cpu"), graphs=True, max_grad_norm=0.0)
    (batch,) = step.plan(feats)
    assert batch["input_ids"].shape == (4, 128)  # 3 rows of one sample, one zero-weight filler row
    assert "position_ids" not in batch
    assert batch["loss_weights"][3].sum() == 0
    assert float(batch["loss_weights"].sum()) == pytest.approx(sum(n for n in (100, 90, 80)) / (99 + 89 + 79))
    shared = [{"input_ids": list(range(1, 41)), "labels": list(range(1, 41))}] * 3
    (batch,) = step.plan(shared)  # 3 x 40 tokens share one row: positions restart per sample
    assert batch["input_ids"].shape == (1, 128)
    assert batch["position_ids"][0, :81].tolist() == list(range(40)) * 2 + [0]
