"""speed.dora_norm_per_step: fast DoRA's weight norm computed once per optimizer step and read by each of
its micro-batches trains exactly as computing it in every forward, and is never read outside the step."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loralab.run.step import make_step
from loralab.speed import dora_refresh, fast_dora
from loralab.speed.graphs import GraphedTraining


def _dora_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    config = LoraConfig(r=8, lora_alpha=16, use_dora=True, init_lora_weights=False, target_modules="all-linear")
    return get_peft_model(LlamaForCausalLM(cfg), config)


def _features(n=4, seed=3):  # 9-16 tokens: one sample per packed row of 16
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in
            (torch.randint(1, 256, (int(torch.randint(9, 17, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n))]


def _train(model, per_step: bool, steps=3, micro_batch=1, monkeypatch=None):
    """``steps`` optimizer steps of 4 samples, ``micro_batch`` packed rows per forward; returns the log and
    how many layer norms were computed (a forward's one, or a refresh's stacked group of L)."""
    calls = []
    if monkeypatch is not None:
        from_products = fast_dora._norm_from_products
        monkeypatch.setattr(fast_dora, "_norm_from_products",
                            lambda s, wa, *a: calls.append(wa.shape[0] if wa.dim() == 3 else 1) or from_products(s, wa, *a))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    lines = []
    step, resolved = make_step(model, optimizer, speed={"micro_batch": micro_batch, "dora_norm_per_step": per_step},
                               kind="causal_lm", dtype="float32", device=torch.device("cpu"), features=_features(),
                               batch_size=4, limit=4, max_length=16, pad_id=0, log=lines.append)
    assert resolved.dora_norm_per_step is per_step
    for k in range(steps):
        step(_features(seed=10 + k))
    return lines, sum(calls)


def test_once_per_step_trains_bit_for_bit_as_every_forward(monkeypatch):
    """Three steps of four micro-batches: the same weights, bit for bit (at this width the refresh's batched
    matmuls sum as one layer's do; at realistic widths they agree to a float32 ulp, tested below), with the
    norm computed 14 times a step (once per DoRA layer) instead of 14 x 4, plus the one computation when the
    step is built."""
    every, once = _dora_llama(), _dora_llama()
    with monkeypatch.context() as patch:
        _, every_calls = _train(every, per_step=False, monkeypatch=patch)
    with monkeypatch.context() as patch:
        lines, once_calls = _train(once, per_step=True, monkeypatch=patch)
    assert (every_calls, once_calls) == (14 * 4 * 3, 14 + 14 * 3)
    assert any(line.startswith("speed.dora_norm_per_step") and "for 14 layer adapter(s)" in line for line in lines), lines
    trained = dict(every.named_parameters())
    moved = 0
    for name, p in once.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[name]), name
            moved += "lora_magnitude_vector" in name
    assert moved == 14


def test_the_refresh_keeps_m_over_n_in_place_beside_the_norm():
    """The refresh keeps m / n (the combine's scale) beside each norm, the magnitude over the kept norm, and a later
    refresh writes both into the same tensors (what a captured refresh graph writes) after a magnitude moved."""
    model = _dora_llama()
    assert fast_dora.enable_fast_dora(model) == 14 and dora_refresh.refresh_dora_norms(model) == 14
    holder = model.base_model.model.model.layers[0].mlp.down_proj.lora_magnitude_vector["default"]
    ratio, norm = holder._loralab_ratio, holder._loralab_norm
    assert torch.equal(ratio, holder.weight / norm)
    with torch.no_grad():
        holder.weight.mul_(1.5)
    dora_refresh.refresh_dora_norms(model)
    assert holder._loralab_ratio is ratio and holder._loralab_norm is norm
    assert torch.equal(ratio, holder.weight / norm)
    ids = torch.tensor([_features(1)[0]["input_ids"]])
    model.eval()
    with torch.no_grad(), fast_dora.reusing_dora_norms():  # the forwards scale by the kept m / n
        kept = model(input_ids=ids).logits
        ratio.mul_(2)
        assert not torch.allclose(model(input_ids=ids).logits, kept)


def test_outside_the_step_a_forward_computes_its_own_norm():
    """After the step, A and B have moved past the norms the step stored: an evaluation forward must not
    read them. The stored norm is stale here (the last step's, before its optimizer update), yet the
    model's output equals peft's own DoRA forward."""
    model = _dora_llama()
    _train(model, per_step=True, steps=2)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    stored = layer.lora_magnitude_vector["default"]._loralab_norm.clone()
    fresh = fast_dora._norm(layer, "default", layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                            layer.scaling["default"])
    assert not torch.allclose(stored, fresh, rtol=1e-6, atol=0)  # the optimizer moved A and B after the refresh
    ids = torch.tensor([_features(1)[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        fast_logits = model(input_ids=ids).logits
        peft_model = copy.deepcopy(model)
        assert fast_dora.disable_fast_dora(peft_model) == 14
        torch.testing.assert_close(fast_logits, peft_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        with fast_dora.reusing_dora_norms():  # where the context is held, the stored (stale) norm is read
            assert not torch.allclose(model(input_ids=ids).logits, fast_logits, rtol=1e-6, atol=1e-6)


def test_nothing_to_do_without_fast_dora():
    """LoRA, or DoRA on peft's own forward (speed.fast_dora false): no refresh, no log line."""
    model = _dora_llama()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    lines = []
    step, _ = make_step(model, optimizer, speed={"fast_dora": False}, kind="causal_lm", dtype="float32",
                        device=torch.device("cpu"), features=_features(), batch_size=4, limit=4, max_length=16,
                        pad_id=0, log=lines.append)
    assert step.dora_norms is False and step.trainer.before_step is None
    assert not any("dora_norm_per_step" in line for line in lines)


def test_begin_runs_before_step_on_every_step_when_not_graphed():
    calls = []
    linear = torch.nn.Linear(2, 2)
    trainer = GraphedTraining(linear, torch.optim.SGD(linear.parameters(), lr=0.1), lambda m, b: m(b["x"]).sum(),
                              before_step=lambda: calls.append(1))
    for _ in range(3):
        trainer.begin()
    assert not trainer.graphed and len(calls) == 3


_VIEWS = {"select", "t", "transpose", "view", "unbind", "unsqueeze", "expand", "slice", "alias", "detach",
          "_unsafe_view", "as_strided", "permute"}


def _sized_dora_llama(layers: int, dtype=torch.bfloat16, base: str = "fp8", r: int = 8):
    """A ``layers``-layer DoRA Llama in ``dtype`` (peft's DoRA forward: ``enable_fast_dora`` is the caller's),
    its linear layers on an FP8 base unless ``base`` is "bf16"."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    llama = LlamaForCausalLM(cfg).to(dtype)
    if base == "fp8":
        from loralab.methods.common import linear_names
        from loralab.methods.fp8base import quantize_linears

        quantize_linears(llama, linear_names(llama))
    return get_peft_model(llama, LoraConfig(r=r, lora_alpha=2 * r, use_dora=True, init_lora_weights=False,
                                            target_modules="all-linear"))


def _refresh_kernels(layers: int, base: str) -> tuple[int, int]:
    """(non-view aten ops one eager refresh runs, layer-adapters) on a ``layers``-layer DoRA Llama: "bf16",
    "fp8" (a bf16 model on an FP8 base: W·Aᵀ read from the codes) or "fp8-fp16" (an fp16 model on it: the
    codes converted per layer)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in _VIEWS:
                Count.ops += 1
            return func(*args, **(kwargs or {}))

    model = _sized_dora_llama(layers, torch.float16 if base == "fp8-fp16" else torch.bfloat16, base.split("-")[0])
    fast_dora.enable_fast_dora(model)
    dora_refresh.refresh_dora_norms(model)  # the first call makes the kept tensors; later ones copy into them
    with Count():
        count = dora_refresh.refresh_dora_norms(model)
    return Count.ops, count


@pytest.mark.parametrize(("base", "most"), [("bf16", 1), ("fp8", 1), ("fp8-fp16", 2)])
def test_the_refresh_costs_about_one_kernel_per_layer_adapter(base, most):
    """The refresh stacks layers of one shape: each more layer-adapter adds its one W·Aᵀ GEMM (and, where an FP8
    base's codes are converted for the product, that conversion), not the 16 ops of a norm of its own (34 on an
    FP8 base, A split into two FP8 terms), which at 8B made thousands of few-microsecond kernels a step."""
    (few, n_few), (many, n_many) = _refresh_kernels(2, base), _refresh_kernels(6, base)
    assert (n_few, n_many) == (14, 42)
    per_adapter = (many - few) / (n_many - n_few)
    assert per_adapter <= most, f"{per_adapter:.2f} ops per added layer-adapter ({few} for {n_few}, {many} for {n_many})"


@pytest.mark.parametrize(("dtype", "r"), [(torch.float16, 8), (torch.float32, 8), (torch.bfloat16, 4)])
def test_the_refresh_groups_hold_the_layers_own_weights_not_copies(dtype, r):
    """Where W·Aᵀ takes an FP8 base's codes converted to a float dtype (fp16 and float32 models; a bf16 model at a
    rank whose 2r the FP8 kernel cannot take), the groups hold each layer's codes and the conversion happens one
    layer at a time: a converted copy of every weight held at once is twice (fp16) or four times (float32) the
    whole FP8 base, at the refresh's peak and, graphed, in the CUDA graph's pool."""
    model = _sized_dora_llama(2, dtype, r=r)
    fast_dora.enable_fast_dora(model)
    groups = dora_refresh._refresh_groups(model)
    assert sum(len(m) for m in groups.values()) == 14
    for members in groups.values():
        for module, _, parts in members:
            assert parts[1].untyped_storage().data_ptr() == module.get_base_layer().weight.untyped_storage().data_ptr()
            assert parts[2] in (torch.float16, torch.float32, torch.bfloat16) and parts[4] is False
    assert dora_refresh.refresh_dora_norms(model) == 14
    for module, name in fast_dora._fast_dora_adapters(model):
        a, b = module.lora_A[name].weight, module.lora_B[name].weight
        torch.testing.assert_close(module.lora_magnitude_vector[name]._loralab_norm,
                                   fast_dora._norm(module, name, a, b, module.scaling[name]), rtol=2e-7, atol=0)


def test_the_stacked_refresh_equals_one_layers_norm_to_a_float32_ulp():
    """At a realistic width (hidden size 1024, rank 16, float32) the stacked refresh's batched Gram matrix sums in
    another order than one layer's: every norm within 2e-7 relative of the per-forward one (measured 1.5e-7,
    about one float32 ulp); at the small widths of the tests above the two orders agree bit for bit."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=1, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=16, lora_alpha=32, use_dora=True, init_lora_weights=False,
                                                             target_modules="all-linear"))
    fast_dora.enable_fast_dora(model)
    assert dora_refresh.refresh_dora_norms(model) == 7
    for module, name in fast_dora._fast_dora_adapters(model):
        a, b = module.lora_A[name].weight, module.lora_B[name].weight
        torch.testing.assert_close(module.lora_magnitude_vector[name]._loralab_norm,
                                   fast_dora._norm(module, name, a, b, module.scaling[name]), rtol=2e-7, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_begin_replays_a_captured_refresh_that_follows_the_parameters():
    """Graphed: the first begin() runs eagerly (allocating), the second captures, later ones replay; each
    reads the parameters as they are then."""
    linear = torch.nn.Linear(16, 16, device="cuda")
    kept = {}

    def refresh():
        norm = linear.weight.float().pow(2).sum(dim=1).sqrt()
        if "norm" not in kept:
            kept["norm"] = norm.clone()
        else:
            kept["norm"].copy_(norm)

    trainer = GraphedTraining(linear, torch.optim.AdamW(linear.parameters()), lambda m, b: m(b["x"]).sum(),
                              before_step=refresh)
    for k in range(4):
        with torch.no_grad():
            linear.weight.mul_(1.5)
        trainer.begin()
        torch.testing.assert_close(kept["norm"], linear.weight.norm(dim=1))
    assert trainer._begin_graph is not None and trainer.graphs == 1  # counted: its capture step is not steady


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the graphed step needs a GPU")
def test_graphed_step_on_cuda_trains_as_every_forward():
    """On CUDA with graphs: the captured refresh and the micro-batches that read its norms train as
    computing the norm in every captured forward (float32, no autocast: the same products)."""
    def train(per_step):
        model = _dora_llama().cuda()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        step, resolved = make_step(model, optimizer, speed={"micro_batch": 1, "dora_norm_per_step": per_step,
                                                            "cuda_graphs": True, "compile": False},
                                   kind="causal_lm", dtype="float32", device=torch.device("cuda"),
                                   features=_features(), batch_size=4, limit=4, max_length=16, pad_id=0, log=print)
        assert step.trainer.graphed
        for k in range(4):
            step(_features(seed=10 + k))
        assert (step.trainer._begin_graph is not None) is per_step
        return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}

    every, once = train(False), train(True)
    for name, value in once.items():
        torch.testing.assert_close(value, every[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("base", ["float32", "fp8", "mixed-ranks"])
def test_the_compiled_refresh_is_a_few_graphs_for_every_layer_and_equals_eager(base):
    """With compile on, the step's refresh runs the norm compiled (its small ops fused): a few graphs for
    every layer, however many layers, projection shapes or ranks (a rank per layer: rank_pattern, Eva),
    where a graph per (shape, rank) passed dynamo's recompile limit of 8 and stopped the run; the values
    are the eager ones."""
    model = _dora_llama()
    layers = 2
    if base == "mixed-ranks":  # 12 layers, each down_proj of its own rank (4, 8, ..., 48)
        layers = 12
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256)
        ranks = {f"model.layers.{i}.mlp.down_proj": 4 + 4 * i for i in range(layers)}
        model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, use_dora=True, init_lora_weights=False,
                                                                 target_modules="all-linear", rank_pattern=ranks))
    if base == "fp8":  # the bf16 model's FP8 path: W·Aᵀ from the codes (speed/fp8.weight_times)
        model = _sized_dora_llama(2)
    assert fast_dora.enable_fast_dora(model) == 7 * layers
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        assert dora_refresh.refresh_dora_norms(model) == 7 * layers
        eager = [m.lora_magnitude_vector["default"]._loralab_norm.clone() for m, _ in fast_dora._fast_dora_adapters(model)]
        assert dora_refresh.refresh_dora_norms(model, counting_backend) == 7 * layers
        compiled = [m.lora_magnitude_vector["default"]._loralab_norm for m, _ in fast_dora._fast_dora_adapters(model)]
    finally:
        torch._dynamo.reset()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert 1 <= len(graphs) <= 4, f"{len(graphs)} graphs for {7 * layers} layer adapters ({base})"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 layers on CUDA need compute capability >= 8.9")
def test_graphed_fp8_dora_step_with_fused_trios_captures_its_refresh():
    """On an FP8 base at the defaults (q/k/v fused, the Triton refresh product), the step's refresh is captured in a
    CUDA graph (a host sync inside it fails the capture) and, replayed, keeps each layer's norm of its trained
    W + s·BA."""
    from loralab.speed.fp8_qkv import fp8_qkv_groups

    model = _sized_dora_llama(2).cuda()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step, resolved = make_step(model, optimizer, speed={"micro_batch": 1, "dora_norm_per_step": True,
                                                        "cuda_graphs": True, "compile": False},
                               kind="causal_lm", dtype="bfloat16", device=torch.device("cuda"), features=_features(),
                               batch_size=4, limit=4, max_length=16, pad_id=0, log=print)
    assert step.trainer.graphed and len(fp8_qkv_groups(model)) == 2
    for k in range(4):
        step(_features(seed=10 + k))
    assert step.trainer._begin_graph is not None and resolved.fp8_refresh_kernel == "triton"  # "auto" on CUDA
    step.trainer.begin()  # a replay, reading the trained A, B and m
    for module, name in fast_dora._fast_dora_adapters(model):  # the kernel's A in float16: near the exact norm (an
        # H100 at de89128: 1.28e-5 at most, the refresh's float32 Gram products included; cuBLAS's two FP8 terms of A
        # put the CPU's norms 9e-5 away at this width, tests/test_refresh_kernel.py)
        a, b = module.lora_A[name].weight.double(), module.lora_B[name].weight.double()
        w = module.get_base_layer().dequantize().double()
        torch.testing.assert_close(module.lora_magnitude_vector[name]._loralab_norm.double(),
                                   (w + module.scaling[name] * b @ a).norm(dim=1), rtol=4e-5, atol=0)
