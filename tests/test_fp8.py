"""The FP8 layer (loralab.speed.fp8, issue 22 point 3) on CPU, where torch 2.13's ``_scaled_mm``
runs the real kernel: its quantisation against a reference of the scaling rule written here
independently (per-row amax·(1/448) and float8 e4m3 round-to-nearest-even done with Python floats,
no torch cast), bitwise on small matrices; forward and input gradient against float32 within the
stated tolerances; the backward's formula; peft wrapping it; dtype casts leaving it intact."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from loralab.methods.fp8base import dequantize_linears, quantize_linears
from loralab.speed.fp8 import Fp8Linear, quantize_rows


def e4m3_round(v: float) -> float:
    """Round-to-nearest-even onto float8 e4m3fn's grid (3 mantissa bits, exponent ≥ -6 with
    subnormals of 2⁻⁹, saturating at 448), with Python floats."""
    if v == 0:
        return 0.0
    a = min(abs(v), 448.0)
    e = max(math.floor(math.log2(a)), -6)
    quantum = 2.0 ** (e - 3)
    q = a / quantum
    n = math.floor(q)
    frac = q - n
    if frac > 0.5 or (frac == 0.5 and n % 2 == 1):
        n += 1
    return math.copysign(min(n * quantum, 448.0), v)


def reference_quantize(x: torch.Tensor):
    """Per row: s = max(|row|) · float32(1/448) in float32, codes = e4m3_round(x / s) (float32 division)."""
    rows = x.float().tolist()
    codes, scales = [], []
    for row in rows:
        amax = max(max(abs(v) for v in row), 1e-12)
        s = torch.tensor(amax, dtype=torch.float32) * torch.tensor(1 / 448.0)  # float32, as the rule says
        scales.append(s.item())
        q = (torch.tensor(row, dtype=torch.float32) / s).tolist()
        codes.append([e4m3_round(v) for v in q])
    return torch.tensor(codes), torch.tensor(scales).reshape(-1, 1)


@pytest.mark.parametrize("shape,dtype", [((7, 48), torch.float32), ((16, 32), torch.bfloat16), ((3, 16), torch.float32)])
def test_quantisation_is_bitwise_the_reference_rule(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * torch.logspace(-3, 2, shape[0])[:, None]).to(dtype)
    x[0, :5] = 0.0
    codes, scales = quantize_rows(x)
    ref_codes, ref_scales = reference_quantize(x)
    assert codes.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    assert torch.equal(scales, ref_scales)
    assert torch.equal(codes.float(), ref_codes)
    assert codes.float().abs().amax(dim=1).eq(448).all()  # every row uses the full range


def test_zero_row_gets_zero_codes():
    codes, scales = quantize_rows(torch.zeros(2, 16))
    assert torch.equal(codes.float(), torch.zeros(2, 16)) and torch.isfinite(scales).all()


def test_layer_stores_the_rule_and_dequantises_to_it():
    torch.manual_seed(1)
    lin = nn.Linear(32, 48)
    layer = Fp8Linear.from_linear(lin)
    ref_codes, ref_scales = reference_quantize(lin.weight.detach())
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    assert torch.equal(layer.codes.float(), ref_codes) and torch.equal(layer.weight_scale, ref_scales.reshape(-1))
    assert torch.equal(layer.dequantize(), ref_codes * ref_scales)


def test_forward_is_the_scaled_product_and_near_float():
    """The kernel = the dequantised operands' product (float32 out: to 1e-5, float32 summation
    order); vs the float32 layer the relative error stays under 6 % of the output's scale
    (measured 3.6 %: two e4m3 roundings of ≤ 2⁻⁴ relative each)."""
    torch.manual_seed(2)
    lin = nn.Linear(64, 32)
    layer = Fp8Linear.from_linear(lin)
    x = torch.randn(2, 5, 64)
    y = layer(x)
    xq, sx = quantize_rows(x.reshape(-1, 64))
    emulated = ((xq.float() * sx) @ layer.dequantize().t() + lin.bias).reshape(2, 5, 32)
    torch.testing.assert_close(y, emulated, atol=1e-5, rtol=1e-5)
    ref = lin(x)
    assert (y - ref).abs().max() / ref.abs().max() < 0.06
    yb = layer(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and (yb.float() - ref).abs().max() / ref.abs().max() < 0.06


def test_input_gradient_is_the_fp8_formula_and_near_float():
    """dx = diag(s_g)·(Gq·Wq) with G = dy·diag(s_w) quantised per row (the module's formula),
    to 1e-5; vs float32's dy·W under 6 % of its scale (measured 4.1 %); the frozen weight gets no gradient."""
    torch.manual_seed(3)
    lin = nn.Linear(48, 64, bias=False)
    layer = Fp8Linear.from_linear(lin)
    x = torch.randn(6, 48, requires_grad=True)
    dy = torch.randn(6, 64)
    layer(x).backward(dy)
    gq, sg = quantize_rows(dy * layer.weight_scale[None, :])
    formula = (gq.float() @ layer.codes.float()) * sg
    torch.testing.assert_close(x.grad, formula, atol=1e-5, rtol=1e-5)
    ref = dy @ lin.weight.detach()
    assert (x.grad - ref).abs().max() / ref.abs().max() < 0.06
    assert layer.weight.grad is None


def test_autocast_output_dtype():
    layer = Fp8Linear.from_linear(nn.Linear(16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(3, 16)).dtype == torch.bfloat16


def test_dtype_casts_leave_codes_and_scales():
    layer = Fp8Linear.from_linear(nn.Linear(32, 16))
    before = (layer.weight.clone(), layer.weight_scale.clone())
    layer.to(torch.bfloat16)
    assert torch.equal(layer.weight, before[0]) and torch.equal(layer.weight_scale, before[1])
    assert layer.bias.dtype == torch.bfloat16


def test_unfit_shapes_stay_float_and_are_returned():
    model = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 10), nn.Linear(10, 16))
    fallback = quantize_linears(model, ["0", "1", "2"])
    assert fallback == {"1": [10, 48], "2": [16, 10]} and model.loralab_fp8_fallback == fallback
    assert isinstance(model[0], Fp8Linear) and type(model[1]) is nn.Linear and type(model[2]) is nn.Linear


@pytest.mark.parametrize("dora", [False, True])
def test_peft_wraps_it_as_a_plain_linear_and_dora_reads_the_dequantised_weight(dora):
    """peft's default dispatch takes Fp8Linear as an nn.Linear; adapters stay float32; a fresh
    adapter leaves the output unchanged (DoRA: its norm is of codes · scale, via dequantize)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    quantize_linears(model, ["0", "2"])
    x = torch.randn(4, 32)
    ref = model(x)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["0", "2"], use_dora=dora))
    layer = peft_model.base_model.model[0]
    assert type(layer).__name__ == "Linear" and isinstance(layer.get_base_layer(), Fp8Linear)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    torch.testing.assert_close(peft_model(x), ref, atol=1e-6, rtol=1e-6)
    if dora:
        norm = layer.lora_magnitude_vector["default"].weight
        torch.testing.assert_close(norm, layer.get_base_layer().dequantize().norm(dim=1))
    peft_model(x).sum().backward()
    assert all(p.grad is None for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_dequantize_linears_gives_float_layers_of_codes_times_scale():
    model = nn.Sequential(nn.Linear(32, 16))
    quantize_linears(model, ["0"])
    w = model[0].dequantize()
    dequantize_linears(model)
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, w)


# ---- speed.fp8_transpose_cache: the column-major codes kept instead of copied per backward ---------

def test_cached_transpose_gives_the_same_bits_and_stays_out_of_the_state_dict():
    torch.manual_seed(4)
    layer = Fp8Linear.from_linear(nn.Linear(48, 64))
    cached = copy.deepcopy(layer)
    keys = set(layer.state_dict())
    assert cached.cache_transpose() == 48 * 64 and cached.cache_transpose() == 0  # once
    w = cached.codes_colmajor
    assert w.shape == (64, 48) and w.stride() == (1, 64) and torch.equal(w.float(), layer.codes.float())
    assert set(cached.state_dict()) == keys and layer.codes_colmajor is None
    x = torch.randn(5, 48)
    outs = []
    for m in (layer, cached):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.backward(torch.randn(5, 64, generator=torch.Generator().manual_seed(0)))
        outs.append((y.detach(), xi.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    def colmajor_saved(m):  # what the forward saves for the backward: the cached copy goes to the backward
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            m(x.clone().requires_grad_(True))
        return [t for t in saved if t.dtype == torch.float8_e4m3fn and t.stride() == (1, 64)]

    assert colmajor_saved(layer) == [] and len(colmajor_saved(cached)) == 1
    cached.to(torch.bfloat16)  # dtype moves leave the cached codes as they are
    assert cached.codes_t_bits.dtype == torch.uint8 and torch.equal(cached.codes_colmajor.float(), layer.codes.float())
    cached.codes_t_bits.zero_()  # the backward reads the cached copy: zero codes there, zero input gradient
    xi = x.clone().requires_grad_(True)
    cached(xi).sum().backward()
    assert xi.grad.abs().max() == 0 and outs[1][1].abs().max() > 0


def test_cache_transposes_takes_the_largest_layers_first_within_the_share():
    """On Llama-3-8B's proportions (loralab.shapes.MODELS, every size / 16): the MLP projections are
    80.8 % of the linear weight bytes, so 0.81 caches exactly them (the README's figure), 0.80
    nothing (a group is whole or not at all), 1 everything."""
    from loralab.shapes import MODELS
    from loralab.speed.fp8 import cache_transposes

    spec = MODELS["llama-3-8b"]
    h, i = spec["hidden_size"] // 16, spec["intermediate_size"] // 16
    kv = spec["num_key_value_heads"] * (spec["hidden_size"] // spec["num_attention_heads"]) // 16

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.o, self.k, self.v = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, kv), nn.Linear(h, kv)
            self.gate, self.up, self.down = nn.Linear(h, i), nn.Linear(h, i), nn.Linear(i, h)

    def fresh():
        model = nn.Sequential(Block(), Block())
        quantize_linears(model, [n for n, m in model.named_modules() if isinstance(m, nn.Linear)])
        return model

    total = 2 * (2 * h * h + 2 * kv * h + 3 * i * h)
    mlp = 2 * 3 * i * h
    assert round(100 * mlp / total, 1) == 80.8
    for share, want in [(0.0, 0), (0.8, 0), (0.81, mlp), (0.9, mlp), (1.0, total)]:
        model = fresh()
        got = cache_transposes(model, share)
        assert got == {"layers": {0: 0, mlp: 6, total: 14}[want], "bytes": want, "total_bytes": total}, share
        cached = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if getattr(m, "codes_t_bits", None) is not None}
        assert cached == {0: set(), mlp: {"gate", "up", "down"}, total: {"q", "k", "v", "o", "gate", "up", "down"}}[want]
    with pytest.raises(ValueError, match="share = 1.5"):
        cache_transposes(fresh(), 1.5)


def test_prepare_model_caches_the_transposes_the_speed_setting_asks_for():
    import dataclasses

    from loralab.speed.step import PLAIN, prepare_model

    model = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 32))
    quantize_linears(model, ["0", "1"])
    prepare_model(model, PLAIN)
    assert all(m.codes_colmajor is None for m in model)
    options = dataclasses.replace(PLAIN, fp8_transpose_cache=1.0)
    prepare_model(model, options)
    assert all(m.codes_colmajor is not None for m in model)
    assert options.record()["fp8_transposes_cached"] == {"layers": 2, "bytes": 2 * 32 * 48, "total_bytes": 2 * 32 * 48}
    assert "fp8_transposes_cached" not in PLAIN.record()


@pytest.mark.parametrize("mode,forward,backward", [("none", False, False), ("forward", True, False),
                                                    ("all", True, True)])
def test_fast_accum_reaches_the_gemms_its_mode_names_and_the_cpu_bits_stay(monkeypatch, mode, forward, backward):
    """``speed.fp8_fast_accum`` reaches ``torch._scaled_mm``'s ``use_fast_accum`` for the output GEMM
    ("forward", "all") and the input gradient's ("all") only; prepare_model sets it on every FP8 layer.
    CPU's reference kernel accumulates in float32 either way, so outputs and gradients keep their bits."""
    import dataclasses

    from loralab.speed.step import PLAIN, prepare_model

    def run(model, x):
        x = x.clone().requires_grad_(True)
        y = model(x)
        y.backward(torch.ones_like(y))
        return y.detach(), x.grad

    model = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 32))
    quantize_linears(model, ["0", "1"])
    x = torch.randn(5, 32)
    y0, dx0 = run(model, x)
    calls, real = [], torch._scaled_mm

    def spy(*args, **kwargs):
        calls.append(kwargs.get("use_fast_accum", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    prepare_model(model, dataclasses.replace(PLAIN, fp8_fast_accum=mode))
    assert [m.fast_accum for m in model] == [mode, mode]
    y, dx = run(model, x)
    assert calls == [forward, forward, backward, backward]  # two forwards, then two input gradients
    assert torch.equal(y, y0) and torch.equal(dx, dx0)


def test_use_fast_accum_refuses_an_unknown_mode_naming_the_allowed():
    from loralab.speed.fp8 import use_fast_accum

    model = nn.Sequential(nn.Linear(32, 48))
    quantize_linears(model, ["0"])
    with pytest.raises(ValueError, match="'speed.fp8_fast_accum' = 'fast': allowed: none, forward, all"):
        use_fast_accum(model, "fast")
    assert model[0].fast_accum == "none"


def test_weight_times_is_as_precise_as_a_bf16_product_and_reads_fp8_codes():
    """W·aᵀ from the codes with a split into two FP8 terms: within bf16's error of the float32
    product (the bf16 path: codes and a in bf16, product rounded to bf16), far inside one FP8 term's."""
    from loralab.speed import fp8

    torch.manual_seed(5)
    layer = Fp8Linear.from_linear(nn.Linear(256, 96))
    a = torch.randn(16, 256) * 0.05
    exact = layer.dequantize().double() @ a.double().T
    seen = []
    kernel = fp8._scaled_mm

    def spy(x, y, *rest, **kw):
        seen.append((x.dtype, y.dtype, tuple(y.shape), y.stride()))
        return kernel(x, y, *rest, **kw)

    fp8._scaled_mm = spy
    try:
        got = fp8.weight_times(layer.codes, layer.weight_scale, a)
    finally:
        fp8._scaled_mm = kernel
    assert seen == [(torch.float8_e4m3fn, torch.float8_e4m3fn, (256, 96), (1, 256))]  # one FP8 GEMM: [hi; lo] by the codes
    assert got.shape == (96, 16) and got.dtype == torch.float32

    def err(x):
        return ((x.double() - exact).abs().max() / exact.abs().max()).item()

    bf16 = ((layer.codes.to(torch.bfloat16) @ a.to(torch.bfloat16).T).float() * layer.weight_scale[:, None])
    hi, s = quantize_rows(a)
    one_term = (layer.codes.float() @ (hi.float() * s).T) * layer.weight_scale[:, None]
    assert err(got) <= 2 * err(bf16) and err(got) < 2**-8, (err(got), err(bf16))
    assert err(one_term) > 4 * err(got)  # the second term is what makes it bf16-precise


def test_weights_times_writes_each_layer_in_place_where_the_kernel_writes_bf16(monkeypatch):
    """CUDA's row-wise kernel writes bf16 only. There each layer's product goes into one shared bf16 buffer in
    place, one kernel a layer, not cast to float32 and stacked (two a layer and a copy: 228 of an 8B FP8 DoRA
    step's kernels); the values are each layer's two bf16 products (terms by codes) summed in float32.
    CUDA's dtype rule is put in place on CPU here, whose kernel writes any dtype."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from loralab.speed import fp8

    monkeypatch.setattr(fp8, "_kernel_dtype", lambda device, out_dtype: torch.bfloat16)

    class Count(TorchDispatchMode):
        names: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(1)
    layers = [Fp8Linear.from_linear(nn.Linear(64, 48, bias=False)) for _ in range(6)]
    a = torch.randn(6, 8, 64) * 0.05
    kernels = {}
    for n in (2, 6):
        codes, scales = [m.codes for m in layers[:n]], [m.weight_scale for m in layers[:n]]
        Count.names = []
        with Count():
            got = fp8.weights_times(codes, scales, a[:n])
        kernels[n] = [name for name in Count.names if name not in ("view", "t", "select", "slice", "alias")]
        assert got.shape == (n, 48, 8) and got.dtype == torch.float32
        for i in range(n):  # the terms by the codes, (2r, N) in bf16, the two terms summed in float32
            terms, scales = fp8.split_rows(a[i])
            y = torch._scaled_mm(terms, layers[i].codes.t(), scale_a=scales,
                                 scale_b=layers[i].weight_scale.view(1, -1), out_dtype=torch.bfloat16).float()
            assert torch.equal(got[i], (y[:8] + y[8:]).T)
    assert len(kernels[6]) - len(kernels[2]) == 4 and kernels[6].count("_scaled_mm") == 6, kernels
    assert kernels[6].count("_to_copy") == kernels[2].count("_to_copy") and "stack" not in kernels[6]  # no cast a layer
    with pytest.raises(ValueError, match="3 A's"):
        fp8.weights_times([m.codes for m in layers[:2]], [m.weight_scale for m in layers[:2]], a[:3])


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="the FP8 kernel and side streams need an FP8 GPU")
def test_weights_times_on_side_streams_gives_the_one_stream_bits_eagerly_and_in_a_cuda_graph(monkeypatch):
    """``PRODUCT_STREAMS`` spreads the per-layer products over side streams: the same values bit for bit as one
    stream, eagerly and replayed from a captured CUDA graph (the fork and join make the graph's branches), and
    a replay after A changed in place reads the new A."""
    from loralab.speed import fp8, streams

    torch.manual_seed(2)
    layers = [Fp8Linear.from_linear(nn.Linear(256, 512, bias=False).cuda().bfloat16()) for _ in range(6)]
    codes, scales = [m.codes for m in layers], [m.weight_scale for m in layers]
    a = torch.randn(6, 32, 256, device="cuda") * 0.05
    monkeypatch.setattr(streams, "PRODUCT_STREAMS", 1)
    one = fp8.weights_times(codes, scales, a)
    monkeypatch.setattr(streams, "PRODUCT_STREAMS", 4)
    assert torch.equal(fp8.weights_times(codes, scales, a), one)
    assert len(streams._STREAMS[(a.device, "products")]) >= 4  # the products did go to side streams
    graph, out = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        out = fp8.weights_times(codes, scales, a)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, one)
    a.mul_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    monkeypatch.setattr(streams, "PRODUCT_STREAMS", 1)
    assert torch.equal(out, fp8.weights_times(codes, scales, a)) and not torch.equal(out, one)
