"""Attention in ``loralab bench`` (which rows run with cuDNN's SDPA kernel switched off: bench/runner.py) and in the
training step (masked batches padded off the widths where cuDNN's SDPA backward gives NaN: speed/attention.py)."""

from __future__ import annotations

import pytest
import torch


def test_the_bench_switches_cudnn_off_only_for_peers_of_varying_lengths():
    """``loralab bench`` runs loralab's rows and fixed-shape peers with torch's own kernel order (what ``loralab run``
    and a careful user get); only a peer's row of a workload whose lengths vary runs with cuDNN's SDPA off (a plan
    per new shape), and the switch is undone after the row."""
    from loralab.bench.runner import peer_attention
    from loralab.bench.workloads import presets

    fixed = next(w for w in presets("full") if w.lengths == "fixed")
    varying = next(w for w in presets("full") if w.lengths != "fixed")
    assert torch.backends.cuda.cudnn_sdp_enabled()
    seen = {}
    for w, stack in ((fixed, "tuned"), (fixed, "loralab"), (varying, "loralab"), (varying, "tuned"), (varying, "peer")):
        with peer_attention(w, stack, "cuda"):
            seen[(w.lengths == "fixed", stack)] = torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.cudnn_sdp_enabled()
    with peer_attention(varying, "tuned", "cpu"):
        assert torch.backends.cuda.cudnn_sdp_enabled()
    flash = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(False)  # a kernel the user switched off stays off: only cuDNN's switch moves
    try:
        with peer_attention(varying, "tuned", "cuda") as off:
            assert off and not torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    finally:
        torch.backends.cuda.enable_flash_sdp(flash)
    assert seen == {(True, "tuned"): True, (True, "loralab"): True, (False, "loralab"): True, (False, "tuned"): False,
                    (False, "peer"): False}


def test_run_bench_runs_each_row_with_cudnn_as_peer_attention_says_and_records_it(monkeypatch):
    """Through ``run_bench`` (stand-in rows, no model built): on CUDA the peers of the varying-length workload run with
    cuDNN's SDPA off and their rows say so; loralab's rows and the fixed-shape peers run with it on and say nothing."""
    from loralab.bench import runner

    seen = {}

    def fake_run_one(w, method, stack, device, steps, warmup, speed=None, budget_gib=None, budget_from=None, windows=1):
        seen[(w.name, stack)] = torch.backends.cuda.cudnn_sdp_enabled()
        return {"workload": w.name, "method": method, "stack": stack, "throughput": 1.0, "unit": "tokens/s",
                "peak_memory_gib": 1.0, "mfu": None}

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    rows, _ = runner.run_bench("tiny", "cuda", methods=("lora",), stacks=("loralab", "peer"), log=lambda s: None)
    off = {(r["workload"], r["stack"]) for r in rows if r.get("cudnn_sdpa") == "off"}
    assert off == {k for k, on in seen.items() if not on} == {("tiny-llama/gsm8k", "peer"), ("tiny-roberta/sst2", "peer")}
    assert seen[("tiny-llama/fixed-2x64", "peer")] and seen[("tiny-llama/gsm8k", "loralab")]
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_masked_widths_step_off_64_modulo_128_on_their_grid():
    """pytorch/pytorch#196678: cuDNN's masked SDPA backward gives NaN at key lengths of 64 modulo 128. Such widths move
    one grid step up (16 up to 128 tokens, 64 above on the CUDA-graph buckets), every other width stays."""
    from loralab.speed.attention import masked_width
    from loralab.speed.graphs import bucket_width

    assert [masked_width(w, 16) for w in (64, 80, 128, 192, 2112, 2113)] == [80, 80, 128, 208, 2128, 2113]
    assert [masked_width(w, 64) for w in (192, 256, 320, 448, 960)] == [256, 256, 384, 512, 1024]
    for n in range(1, 3000):  # the bucket grid: every guarded width is a bucket width and off the remainder
        width = bucket_width(n)
        guarded = masked_width(width, 64 if width > 128 else 16)
        assert guarded % 128 != 64 and guarded >= width and bucket_width(guarded) == guarded, (n, width, guarded)


def test_the_guard_is_off_on_cpu_and_where_cudnn_sdpa_is_switched_off(monkeypatch):
    """Only CUDA with cuDNN's SDPA on (compute capability 9.x/10.x, cuDNN above 9.15.0) is guarded: elsewhere widths are
    left as they are, so CPU runs (and CI) pad exactly as before."""
    from loralab.speed import attention

    assert not attention.cudnn_masked_width_risk(torch.device("cpu"))
    widths = attention.MaskedWidths(torch.device("cpu"), True, log=lambda line: None)
    assert [widths(w) for w in (64, 192, 320)] == [64, 192, 320] and widths.widened == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91900)
    assert attention.cudnn_masked_width_risk(torch.device("cuda"))
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)  # the user switched cuDNN's SDPA off
    assert not attention.cudnn_masked_width_risk(torch.device("cuda"))
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91500)  # torch keeps flash/efficient first
    assert not attention.cudnn_masked_width_risk(torch.device("cuda"))
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91900)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not attention.cudnn_masked_width_risk(torch.device("cuda"))


def _guarded_step(monkeypatch, packing: bool, graphs: bool, max_length: int, lines: list, pad_to=None,
                  guarded: bool = True, kind: str = "causal_lm"):
    """The training step's batching on CPU, with the guard on as on an H100 with cuDNN 9.19 (``guarded``), or off."""
    from loralab.run.step import Step
    from loralab.speed import attention

    if guarded:
        monkeypatch.setattr(attention, "cudnn_masked_width_risk", lambda device: True)
    return Step(torch.nn.Module(), None, kind=kind, normalization="tokens", micro_batch=None, packing=packing,
                max_length=max_length, pad_to=pad_to, pad_id=0, device=torch.device("cpu"), graphs=graphs,
                max_grad_norm=0.0, log=lines.append)


def test_the_step_pads_masked_batches_off_the_nan_widths_and_says_so_once(monkeypatch):
    """Guarded, the training step's padded rows of a 180-token sample (bucket 192) are 256 wide; unbucketed (eager),
    a 192-token sample beside a shorter one pads to 208, a lone full 192-token row stays (no padding: transformers
    drops an all-ones mask and runs SDPA's causal path); packed rows of max_length 320 holding two samples (masked)
    are 384 wide, rows of one sample each (no mask) stay 320. The padding is masked and takes no loss weight; the
    guard is logged once, as the step is built, and counts what it widened."""
    features = [{"input_ids": list(range(1, 181)), "labels": list(range(1, 181))},
                {"input_ids": list(range(1, 61)), "labels": list(range(1, 61))}]
    lines = []
    step = _guarded_step(monkeypatch, False, True, 512, lines)
    assert len(lines) == 1 and "pytorch/pytorch#196678" in lines[0] and "masked-width guard on" in lines[0]
    (batch,) = step.plan(features)
    assert batch["input_ids"].shape == (2, 256) and batch["attention_mask"].sum() == 240
    assert batch["loss_weights"][:, 192:].abs().sum() == 0
    step.plan(features)
    assert len(lines) == 1 and step._guarded.widened == 2  # logged once per step, counted each time
    full = {"input_ids": list(range(1, 193)), "labels": list(range(1, 193))}
    eager = _guarded_step(monkeypatch, False, False, 512, lines)
    assert eager.plan(features)[0]["input_ids"].shape == (2, 180)  # unbucketed: the longest, 180, not at risk
    assert eager.plan([full, features[1]])[0]["input_ids"].shape == (2, 208)
    assert eager.plan([full, full])[0]["input_ids"].shape == (2, 192) and eager._guarded.widened == 1
    assert step.plan([full, full])[0]["input_ids"].shape == (2, 256)  # graphed: the mask is explicit, so widened
    (batch,) = _guarded_step(monkeypatch, True, True, 320, lines).plan(features)  # one row of two samples: masked
    assert batch["input_ids"].shape[1] == 384 and batch["loss_weights"][:, 320:].abs().sum() == 0
    single = [{"input_ids": list(range(1, n)), "labels": list(range(1, n))} for n in (300, 200)]
    (batch,) = _guarded_step(monkeypatch, True, True, 320, lines).plan(single)  # a sample a row: no mask, no widening
    assert batch["input_ids"].shape == (2, 320) and "position_ids" not in batch
    assert len(lines) == 4  # one line per step built


def test_a_set_pad_to_still_cuts_there_when_the_guard_pads_wider(monkeypatch):
    """``pad_to`` (``pad_to_max_length``) of 192 with a longer sample: the sample is cut at 192 tokens, as collate cuts,
    and the batch is padded to the guarded 256 (the 64 tokens past 192 masked)."""
    step = _guarded_step(monkeypatch, False, True, 192, [], pad_to=192)
    (batch,) = step.plan([{"input_ids": list(range(1, 301)), "labels": list(range(1, 301))}])
    assert batch["input_ids"].shape == (1, 256) and batch["attention_mask"].sum() == 192
    assert batch["input_ids"][0, 191] == 192 and batch["input_ids"][0, 192:].eq(0).all()


def test_samples_a_tokenizer_padded_keep_their_mask_and_are_guarded_eagerly(monkeypatch):
    """Classification features padded by the tokenizer (``pad_to_max_length``: 192 tokens, their own mask 0 past the
    text) fill the width, yet carry a mask with zeros: the training step keeps those zeros (they were ones before
    36c98e3) and, guarded, pads such a batch off the NaN width even without CUDA graphs; a batch of unpadded full
    rows stays."""
    padded = [{"input_ids": list(range(1, 101)) + [0] * 92, "attention_mask": [1] * 100 + [0] * 92, "labels": 1}]
    full = [{"input_ids": list(range(1, 193)), "attention_mask": [1] * 192, "labels": 0}]
    for guarded, width in ((False, 192), (True, 208)):
        (batch,) = _guarded_step(monkeypatch, False, False, 192, [], pad_to=192, guarded=guarded, kind="seq_cls").plan(padded)
        assert batch["input_ids"].shape == (1, width) and batch["attention_mask"].sum() == 100
    (batch,) = _guarded_step(monkeypatch, False, False, 192, [], pad_to=192, kind="seq_cls").plan(full)
    assert batch["input_ids"].shape == (1, 192)


def test_calibration_batches_with_padding_are_guarded(monkeypatch, minilm_path):
    """LoRA-GA backpropagates through the calibration batches (``MethodContext.calibration_batches``): guarded, a batch
    padded to 64 tokens is 80 wide, a batch whose rows all fill 64 tokens stays; unguarded (CPU) nothing moves."""
    from loralab.config import build_parameters
    from loralab.methods.context import MethodContext
    from loralab.models import load_tokenizer
    from loralab.speed import attention

    rows = [{"input_ids": [1] * 64, "attention_mask": [1] * 64}, {"input_ids": [1] * 40, "attention_mask": [1] * 40},
            {"input_ids": [1] * 64, "attention_mask": [1] * 64}, {"input_ids": [1] * 64, "attention_mask": [1] * 64}]
    params = build_parameters({"task": "glue/sst2", "calibration": {"num_samples": 4, "batch_size": 2,
                                                                    "sampling": "first"}})
    context = MethodContext(params, rows, load_tokenizer(minilm_path))

    def widths():
        return [batch["input_ids"].shape[1] for batch in context.calibration_batches(device="cpu")]

    assert widths() == [64, 64]
    monkeypatch.setattr(attention, "cudnn_masked_width_risk", lambda device: True)
    assert widths() == [64, 80]  # longest first: (64, 64) full, then (64, 40) padded


def test_a_guarded_width_trains_the_same_loss_and_gradients(monkeypatch):
    """The widened padded batch gives the narrower batch's loss and gradients (float32, CPU: the masked columns add
    exact zeros; within 1e-6 for the summation order)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loralab.speed.step import causal_lm_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=128, attn_implementation="sdpa"))
    g = torch.Generator().manual_seed(1)
    features = [{"input_ids": ids, "labels": ids} for ids in
                (torch.randint(1, 128, (n,), generator=g).tolist() for n in (180, 150))]
    results = []
    for guarded in (False, True):
        (batch,) = _guarded_step(monkeypatch, False, True, 512, [], guarded=guarded).plan(features)
        model.zero_grad()
        loss, _ = causal_lm_loss(model, batch, chunked=False)
        loss.backward()
        results.append((batch["input_ids"].shape[1], loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (narrow, loss_a, grads_a), (wide, loss_b, grads_b) = results
    assert (narrow, wide) == (192, 256)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_the_nan_check_script_counts_grads_and_the_guarded_width(load_script):
    """scripts/cudnn_mask_nan.py (the device's evidence for the guard) on CPU: torch's math kernel gives finite
    gradients at every width, and each row names the width the step would pad it to."""
    script = load_script("cudnn_mask_nan")
    result = script.run("cpu", widths=(192, 256))
    assert [(r["width"], r["bucketed"], r["guarded_width"]) for r in result["rows"]] == [
        (192, True, 256), (192, False, 208), (256, True, 256), (256, False, 256)]
    assert all(r["non_finite"] == {"q": 0, "k": 0, "v": 0} == r["guarded_non_finite"] for r in result["rows"])
    assert "| 192 | default | q 0, k 0, v 0 | 256 (bucketed) |" in script.table(result)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN's SDPA needs a GPU")
def test_where_the_guard_is_on_the_guarded_widths_train_finite_on_cuda(load_script):
    """On a GPU the guard flags (compute capability 9.x/10.x, cuDNN above 9.15.0), torch's default kernel at the widths the
    step pads to gives finite gradients under the report's conditions (pytorch/pytorch#196678)."""
    from loralab.speed.attention import cudnn_masked_width_risk

    if not cudnn_masked_width_risk(torch.device("cuda")):
        pytest.skip("this GPU or cuDNN is not one the guard flags")
    result = load_script("cudnn_mask_nan").run("cuda", kernels=["default"])
    assert all(r["guarded_non_finite"] == {"q": 0, "k": 0, "v": 0} for r in result["rows"]), result


def test_the_run_records_whether_the_guard_was_on(monkeypatch):
    """``make_step`` records the guard in the resolved speed settings (``train_info.speed.masked_width_guard``): off on
    CPU, on where cuDNN's masked SDPA may run (patched here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loralab.run.step import make_step
    from loralab.speed import attention

    def resolved_guard():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        features = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}]
        _, resolved = make_step(model, torch.optim.SGD(model.parameters(), lr=0.1), speed={"micro_batch": 1},
                                kind="causal_lm", dtype="float32", device=torch.device("cpu"), features=features,
                                batch_size=1, limit=1, max_length=8, pad_id=0, log=lambda line: None)
        return resolved.masked_width_guard

    assert resolved_guard() is False
    monkeypatch.setattr(attention, "cudnn_masked_width_risk", lambda device: True)
    assert resolved_guard() is True
