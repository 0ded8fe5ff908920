"""CUDA-graph training (speed/graphs.py): bucketed padding keeps the loss, the step object follows
the plain training loop (accumulation, clipping, schedule), the optimizer-state preparation moves
nothing, and (on a GPU) replayed graphs give the same weights as eager steps."""

import copy
import csv

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

from loralab.config import build_parameters
from loralab.data import collate
from loralab.speed.graphs import FOREACH_GRAD_SHARE, GraphedTraining, backward_into, bucket_width, takes_foreach_grads
from loralab.speed.step import PLAIN, prepare_model, seq_cls_loss


def micro_batch(feats, kind, params, pad_id, pad_to, device, bucket=False):
    """A padded micro-batch (the runner's Step pads the same way), optionally to a bucketed width."""
    width = pad_to or (bucket_width(max(len(f["input_ids"]) for f in feats)) if bucket else None)
    return {k: v.to(device) for k, v in collate(feats, pad_id, width).items()}


def batch_loss(kind):
    return lambda model, batch: seq_cls_loss(model, batch)[0]


def test_bucket_width_bounds_padding_and_shapes():
    widths = [bucket_width(n) for n in range(1, 2049)]
    assert all(w >= n for n, w in zip(range(1, 2049), widths))
    assert widths == sorted(widths)
    assert all(w - n < (16 if n <= 128 else 64 if n <= 1024 else 256) for n, w in zip(range(1, 2049), widths))
    assert len(set(widths[:128])) == 8 and len(set(widths[:512])) == 14  # few shapes to capture
    with pytest.raises(ValueError):
        bucket_width(0)


def sst2_features(data_dir, tokenizer, n, offset=0):
    with open(data_dir / "glue" / "SST-2" / "train.tsv") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1 + offset:1 + offset + n]
    enc = tokenizer([r[0] for r in rows], truncation=True, max_length=128)
    return [{"input_ids": ids, "attention_mask": m, "labels": int(r[1])}
            for ids, m, r in zip(enc["input_ids"], enc["attention_mask"], rows)]


def lora_minilm(path, dora=False, dropout=None):
    kwargs = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    torch.manual_seed(0)
    # fp32 whatever the stored dtype (the GPU box carries an fp16 copy of MiniLM)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32, **kwargs)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], use_dora=dora,
                        modules_to_save=["classifier"])
    return get_peft_model(base, config)


def test_bucketed_padding_keeps_the_loss(minilm_path, data_dir):
    tok = AutoTokenizer.from_pretrained(minilm_path)
    model = lora_minilm(minilm_path).eval()
    params = build_parameters({"task": "glue/sst2"})
    feats = sst2_features(data_dir, tok, 16)
    natural = micro_batch(feats, "seq_cls", params, tok.pad_token_id, None, "cpu")
    bucketed = micro_batch(feats, "seq_cls", params, tok.pad_token_id, None, "cpu", bucket=True)
    longest = max(len(f["input_ids"]) for f in feats)
    assert natural["input_ids"].shape[1] == longest
    assert bucketed["input_ids"].shape[1] == bucket_width(longest) > longest  # real padding was added
    with torch.no_grad():
        torch.testing.assert_close(seq_cls_loss(model, bucketed)[0], seq_cls_loss(model, natural)[0], atol=1e-5, rtol=1e-5)


def _plain_loop(model, batches, params, steps_groups):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=params["lr"], weight_decay=0.01)
    sched = get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=len(steps_groups))
    for group in steps_groups:
        n = sum(batches[i]["input_ids"].shape[0] for i in group)
        for i in group:
            loss = model(**batches[i]).loss
            (loss * batches[i]["input_ids"].shape[0] / n).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], params["clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def _graphed_loop(model, batches, params, steps_groups, enabled, prepare_state=False):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=params["lr"], weight_decay=0.01)
    sched = get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=len(steps_groups))
    trainer = GraphedTraining(model, opt, batch_loss("seq_cls"), max_grad_norm=params["clip"], enabled=enabled)
    if prepare_state:  # what a GPU run does before capturing; on CPU without `capturable`
        for p in trainer.params:
            p.grad = torch.zeros_like(p)
        trainer._prepare_optimizer(torch.device("cpu"), capturable=False)
    losses = []
    for group in steps_groups:
        n = sum(batches[i]["input_ids"].shape[0] for i in group)
        for i in group:
            losses.append(trainer.micro(batches[i], batches[i]["input_ids"].shape[0] / n))
        trainer.step()
        sched.step()
    return trainer, losses


@pytest.mark.parametrize("prepare_state", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["eager", "prepared-optimizer-state"])  # the fast subset keeps one case
def test_step_object_follows_the_plain_loop(minilm_path, data_dir, prepare_state):
    """Accumulation weights, clipping, the LR schedule and (prepared) AdamW state give the same
    weights as the textbook loop."""
    tok = AutoTokenizer.from_pretrained(minilm_path)
    params = build_parameters({"task": "glue/sst2"})
    feats = sst2_features(data_dir, tok, 40)
    sizes = [8, 8, 8, 8, 5, 3]  # uneven micro-batches: the weights matter
    batches, start = [], 0
    for s in sizes:
        batches.append(micro_batch(feats[start:start + s], "seq_cls", params, tok.pad_token_id, None, "cpu"))
        start += s
    groups = [[0, 1], [2, 3], [4, 5]]
    cfg = {"lr": 2e-3, "clip": 0.5}
    ref = lora_minilm(minilm_path, dropout=0.0).train()
    ours = copy.deepcopy(ref)
    _plain_loop(ref, batches, cfg, groups)
    _graphed_loop(ours, batches, cfg, groups, enabled=True, prepare_state=prepare_state)  # CPU: runs eagerly
    moved = 0
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, atol=2e-6, rtol=1e-5, msg=name)
        moved += a.requires_grad
    assert moved > 0


def _bitwise_same_gradients(ref, ours) -> int:
    """How many trainable parameters of ``ref`` there are, each asserted to hold a gradient bitwise ``ours``'s."""
    compared = 0
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        if a.requires_grad:
            assert a.grad is not None and torch.equal(b.grad, a.grad), name
            compared += 1
    return compared


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_backward_into_adds_the_same_bits_as_autograds_accumulation(minilm_path, data_dir, dora):
    """The graphed step's gradient add (one foreach add into the fixed buffers) against ``backward()`` over two
    weighted micro-batches: every parameter's gradient bitwise the same (DoRA's magnitudes among them); a
    parameter the loss never reaches keeps its buffer untouched; a reached parameter without a buffer is named."""
    tok = AutoTokenizer.from_pretrained(minilm_path)
    params = build_parameters({"task": "glue/sst2"})
    feats = sst2_features(data_dir, tok, 12, offset=200)
    batches = [micro_batch(feats[:8], "seq_cls", params, tok.pad_token_id, None, "cpu"),
               micro_batch(feats[8:], "seq_cls", params, tok.pad_token_id, None, "cpu")]
    ref = lora_minilm(minilm_path, dora=dora, dropout=0.0).train()
    ours = copy.deepcopy(ref)
    unused = torch.nn.Parameter(torch.full((3,), 0.25))  # a trainable tensor the loss does not read
    ours_params = [p for p in ours.parameters() if p.requires_grad] + [unused]
    for p in ours_params:
        p.grad = torch.zeros_like(p)
    unused.grad.fill_(7.0)  # what an earlier micro-batch would have left there
    for batch, weight in zip(batches, (8 / 12, 4 / 12)):
        (seq_cls_loss(ref, batch)[0] * weight).backward()
        backward_into(seq_cls_loss(ours, batch)[0] * weight, ours_params)
    compared = _bitwise_same_gradients(ref, ours)
    assert compared == len(ours_params) - 1 and (not dora or any("magnitude" in n for n, _ in ref.named_parameters()))
    assert torch.equal(unused.grad, torch.full((3,), 7.0))
    first = next(p for p in ours.parameters() if p.requires_grad)
    first.grad = None
    with pytest.raises(ValueError, match=r"no gradient buffer"):
        backward_into(seq_cls_loss(ours, batches[0])[0], [first])


def test_foreach_grads_only_where_the_trainable_tensors_are_small(minilm_path):
    """The graphed step holds a micro-batch's gradients together (``backward_into``) for adapters, not for full
    fine-tuning, whose gradients alive together would double their memory."""
    lora = lora_minilm(minilm_path)
    lora_params = [p for p in lora.parameters() if p.requires_grad]
    assert takes_foreach_grads(lora, lora_params)
    full = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2, dtype=torch.float32)
    assert not takes_foreach_grads(full, list(full.parameters()))
    # the rule is the share of bytes: LoRA's factors and the classifier sit far under it, a layer's worth over it
    share = sum(p.numel() for p in lora_params) / sum(p.numel() for p in lora.parameters())
    assert share < FOREACH_GRAD_SHARE < 1


def test_foreach_grad_add_setting_is_checked_and_resolved():
    """``speed.foreach_grad_add``: true, false or "auto" (the default); true refused beside cuda_graphs false (naming
    both keys); nothing graphed (CPU, or graphs off) resolves it to false; on CUDA an explicit value stays and "auto"
    waits for the model (make_step settles it by ``takes_foreach_grads``)."""
    from loralab.speed_settings import Speed

    base = Speed().record()
    assert Speed.problems({**base, "foreach_grad_add": "auto"}) == []
    assert Speed.problems({**base, "foreach_grad_add": "yes"}) == [
        "'speed.foreach_grad_add' = 'yes' must be true, false or \"auto\""]
    (problem,) = Speed.problems({**base, "foreach_grad_add": True, "cuda_graphs": False})
    assert "'speed.foreach_grad_add' = true with 'speed.cuda_graphs' = false" in problem
    resolve = {"kind": "causal_lm", "base_dtype": "bfloat16"}
    for value in (True, "auto"):
        assert Speed(foreach_grad_add=value).resolve(device_type="cpu", **resolve).foreach_grad_add is False
        assert Speed(foreach_grad_add=value).resolve(device_type="cuda", **resolve).foreach_grad_add == value
    assert Speed(foreach_grad_add=True, cuda_graphs=False).resolve(device_type="cuda", **resolve).foreach_grad_add is False
    assert Speed().resolve(device_type="cuda", **resolve).foreach_grad_add == "auto"  # the default: the size rule
    # the old default (false) hashes as the new one, so an experiment that set it keeps its train_params_sha
    from loralab.config import build_parameters
    from loralab.experiment import hashed_parameters

    for value, hashed_as in ((False, None), ("auto", None), (True, True)):
        assert hashed_parameters(build_parameters({"speed": {"foreach_grad_add": value}}))["speed"].get(
            "foreach_grad_add") == hashed_as


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_cuda_backward_into_adds_the_same_bits_as_autograds_accumulation(dora):
    """On the GPU, where the grouped foreach add runs multi-tensor kernels: the same gradients, bitwise, as
    ``backward()`` over two weighted micro-batches of a small random Llama with LoRA or DoRA on every linear layer
    (bf16 base, fp32 adapters, as the step trains them; attention by the math kernel: flash and efficient
    attention's backward may add in a varying order, so two backward passes would differ before any add)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import LlamaConfig, LlamaForCausalLM

    from loralab.speed.step import causal_lm_loss

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, attn_implementation="sdpa")
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    ref = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora))
    for p in ref.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ref = ref.cuda().train()
    ours = copy.deepcopy(ref)
    ours_params = [p for p in ours.parameters() if p.requires_grad]
    assert len({p.dtype for p in ours.parameters()}) == 2  # two dtypes: the foreach add's groups
    for p in ours_params:
        p.grad = torch.zeros_like(p)
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": (ids := torch.randint(3, 500, (n, 32), generator=gen).cuda()), "labels": ids.clone()}
               for n in (3, 2)]
    with sdpa_kernel(SDPBackend.MATH), torch.autocast("cuda", dtype=torch.bfloat16):
        for batch, weight in zip(batches, (3 / 5, 2 / 5)):
            (causal_lm_loss(ref, batch)[0] * weight).backward()
            backward_into(causal_lm_loss(ours, batch)[0] * weight, ours_params)
    compared = _bitwise_same_gradients(ref, ours)
    assert compared == len(ours_params) and (not dora or any("magnitude" in n for n, _ in ref.named_parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_cuda_graph_replay_equals_eager(minilm_path, data_dir, dora):
    """Several padded widths (one graph each), accumulation, clipping, schedule: replayed graphs
    end at the same weights and losses as eager steps (fp32, so kernels agree to 1e-5)."""
    tok = AutoTokenizer.from_pretrained(minilm_path)
    params = build_parameters({"task": "glue/sst2"})
    feats = sst2_features(data_dir, tok, 96, offset=1000)
    feats.sort(key=lambda f: len(f["input_ids"]))  # widths from short to long: several buckets
    batches = [micro_batch(feats[i:i + 8], "seq_cls", params, tok.pad_token_id, None, "cuda", bucket=True)
               for i in range(0, 96, 8)]
    widths = {b["input_ids"].shape[1] for b in batches}
    assert len(widths) >= 2
    groups = [[i, i + 1] for i in range(0, len(batches), 2)] * 2  # every shape replayed again
    cfg = {"lr": 1e-3, "clip": 1.0}
    models = []
    for enabled in (False, True):
        model = lora_minilm(minilm_path, dora=dora, dropout=0.0).cuda().train()
        prepare_model(model, PLAIN)
        trainer, losses = _graphed_loop(model, batches, cfg, groups, enabled=enabled)
        models.append((model, trainer, torch.stack(losses)))
    (eager, t_eager, l_eager), (graphed, t_graphed, l_graphed) = models
    assert not t_eager.graphed and t_graphed.graphed and t_graphed.graph_optimizer
    assert t_graphed.graphs == len(widths)  # captured, not fallen back
    assert torch.isfinite(l_eager).all(), l_eager
    torch.testing.assert_close(l_graphed, l_eager, atol=1e-4, rtol=1e-4, msg=lambda m: f"{m}\n{l_graphed}\n{l_eager}")
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("foreach", [False, True], ids=["autograd-adds", "foreach-add"])
@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_cuda_graph_replay_equals_eager_causal_lm(layout, foreach):
    """Causal LM (a small random Llama, LoRA): plain fixed-length batches (SDPA's causal path) and
    packed rows (block-diagonal masks) replay to the same losses and weights as eager steps, with autograd adding
    the gradients into the fixed buffers and with one foreach add (``speed.foreach_grad_add``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loralab.run.step import Step
    from loralab.speed.step import causal_lm_loss

    def make_loss(kind):
        return lambda model, batch: causal_lm_loss(model, batch)[0]

    gen = torch.Generator().manual_seed(0)
    if layout == "plain":
        batches = [{"input_ids": (ids := torch.randint(3, 500, (2, 64), generator=gen)), "labels": ids.clone()}
                   for _ in range(4)]
    else:
        batches = []
        for _ in range(4):
            feats = [{"input_ids": torch.randint(3, 500, (n,), generator=gen).tolist()} for n in (20, 30, 9) * 2]
            packer = Step(torch.nn.Module(), None, kind="causal_lm", normalization="tokens", micro_batch=None,
                          packing=True, max_length=64, pad_to=None, pad_id=0, device=torch.device("cpu"),
                          graphs=True, max_grad_norm=0.0)
            (batch,) = packer.plan(feats)  # two rows of 64 tokens, as the training step packs them
            batches.append(batch)
    batches = [{k: v.cuda() for k, v in b.items()} for b in batches]
    results = []
    for enabled in (False, True):
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, attn_implementation="sdpa")
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        model = model.cuda().train()
        prepare_model(model, PLAIN)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        trainer = GraphedTraining(model, opt, make_loss("causal_lm"), max_grad_norm=1.0, enabled=enabled,
                                  foreach_grads=foreach)
        losses = []
        for batch in batches * 2:
            losses.append(trainer.micro(batch, 1.0))
            trainer.step()
        results.append((model, trainer, torch.stack(losses)))
    (eager, t_eager, l_eager), (graphed, t_graphed, l_graphed) = results
    assert t_graphed.graphs == 1 and t_graphed.foreach_grads is foreach and not t_eager.foreach_grads
    assert torch.isfinite(l_eager).all()
    torch.testing.assert_close(l_graphed, l_eager, atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)


def test_warm_up_sees_transformers_capture_path():
    """The warm-up before a capture must take transformers' capture-time code path; this pins the
    hook it uses (transformers' is_tracing), so a transformers upgrade that moves it fails here
    rather than as a recompile inside a GPU capture."""
    from transformers.utils.import_utils import is_tracing

    from loralab.speed.graphs import _as_if_capturing

    assert not is_tracing()
    with _as_if_capturing():
        assert is_tracing()
    assert not is_tracing()
