"""The Triton row-wise FP8 quantisation kernel (speed/fp8_kernels.py, ``speed.fp8_quantize_kernel:
"triton"``) run by Triton's CPU interpreter: the kernel a GPU compiles, checked bit for bit against
``speed.fp8.quantize_rows`` (itself checked against an independent reference in test_fp8.py), on
every finite bfloat16 value, on every tie of e4m3's grid, with the input gradient's column scales,
on rows wider than one program holds, and through the FP8 layer's forward and backward."""

import os

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="the kernel's CPU check needs triton (the test extra installs it)")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton's interpreter is set by conftest.py on machines without CUDA; "
                                       "on a GPU scripts/fp8_cuda_check.py checks the compiled kernel")


def same_bits(a, b) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def both(x, col=None):
    from loralab.speed.fp8 import quantize_rows
    from loralab.speed.fp8_kernels import quantize_rows_triton

    got = quantize_rows_triton(x, col)
    want = quantize_rows(x if col is None else x.float() * col)
    return got, want


def test_every_finite_bfloat16_value_quantises_to_the_same_bits():
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = values[torch.isfinite(values.float())]
    x = values[: values.numel() // 256 * 256].reshape(-1, 256)  # rows of mixed magnitudes: every scale differs
    (codes, scales), (want_codes, want_scales) = both(x)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape and scales.shape == (x.shape[0], 1)
    assert torch.equal(scales, want_scales) and same_bits(codes, want_codes)
    assert (codes.view(torch.uint8) == 0x80).any()  # negative zeros among them, kept


def test_ties_round_to_even_on_the_whole_e4m3_grid():
    """A row whose amax is 448 has scale 1: its values land on e4m3's grid as given. Every midpoint
    between neighbouring codes (subnormals included) is a tie, and must go to the even code."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448, ascending
    mids = (grid[:-1] + grid[1:]) / 2
    row = torch.cat([torch.tensor([448.0]), mids, -mids, grid, torch.tensor([1e-30, -1e-30, 500.0 * 0])])
    x = row.reshape(1, -1)
    (codes, scales), (want, _) = both(x)
    assert scales.item() == 1.0 and same_bits(codes, want)
    got_mids = codes[0, 1 : 1 + mids.numel()].view(torch.uint8).int()
    assert (got_mids % 2 == 0).all()  # the even neighbour, each time


def test_column_scales_wide_rows_strided_rows_and_zero_rows():
    torch.manual_seed(0)
    col = torch.rand(300) * 8 + 1e-3
    x = torch.randn(5, 300, dtype=torch.bfloat16) * 3
    x[2] = 0  # EPS's scale, zero codes
    (codes, scales), (want, want_scales) = both(x, col)
    assert torch.equal(scales, want_scales) and same_bits(codes, want)
    assert scales[2].item() == pytest.approx(1e-12 / 448)

    from loralab.speed.fp8_kernels import ONE_PASS_MAX

    wide = torch.randn(3, ONE_PASS_MAX + 1000) * torch.logspace(-6, 6, ONE_PASS_MAX + 1000)  # the two-pass path
    (codes, scales), (want, want_scales) = both(wide)
    assert torch.equal(scales, want_scales) and same_bits(codes, want)

    strided = torch.randn(6, 512, dtype=torch.float16)[:, 100:400]  # rows 512 apart, 300 wide
    (codes, scales), (want, want_scales) = both(strided)
    assert torch.equal(scales, want_scales) and same_bits(codes, want)


def test_non_finite_inputs_stay_visible():
    """An inf gradient entry gives NaN codes where it is (inf / inf), as the torch ops do; it is
    never clipped into a finite ±448."""
    x = torch.tensor([[1.0, float("inf"), -2.0], [1.0, 2.0, 3.0]])
    (codes, scales), (want, want_scales) = both(x)
    assert torch.isnan(codes[0, 1].float()) and torch.isnan(want[0, 1].float())
    assert torch.equal(scales, want_scales) and same_bits(codes[1], want[1])


def test_the_fp8_layer_gives_the_same_bits_with_either_kernel():
    from loralab.speed.fp8 import Fp8Linear, use_quantize_kernel

    torch.manual_seed(1)
    layer = Fp8Linear.from_linear(nn.Linear(64, 48))
    model = nn.Sequential(layer)
    x = torch.randn(2, 7, 64)
    grad = torch.randn(2, 7, 48)
    outs = {}
    for kernel in ("torch", "triton"):
        assert use_quantize_kernel(model, kernel) == 1 and layer.quantize_kernel == kernel
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y.backward(grad)
        outs[kernel] = (y.detach(), xi.grad)
    assert torch.equal(outs["torch"][0], outs["triton"][0]) and torch.equal(outs["torch"][1], outs["triton"][1])

    with pytest.raises(ValueError, match="'cuda'.*allowed: torch, triton"):
        use_quantize_kernel(model, "cuda")


def test_compiled_whole_graph_and_set_by_the_speed_setting():
    """torch.compile traces the kernel's op in one graph (its shapes registered, no graph break),
    forward and backward, with the same bits as the eager torch ops; ``prepare_model`` sets the
    kernel ``speed.fp8_quantize_kernel`` names on every FP8 layer."""
    import dataclasses

    from loralab.speed.fp8 import Fp8Linear, use_quantize_kernel
    from loralab.speed.step import PLAIN, prepare_model

    torch.manual_seed(2)
    model = nn.Sequential(Fp8Linear.from_linear(nn.Linear(64, 48)), nn.SiLU(), Fp8Linear.from_linear(nn.Linear(48, 32)))
    x, grad = torch.randn(2, 7, 64), torch.randn(2, 7, 32)
    outs = []
    for kernel, compiled in (("torch", False), ("triton", True)):
        use_quantize_kernel(model, kernel)
        fn = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        y.backward(grad)
        outs.append((y.detach(), xi.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])

    use_quantize_kernel(model, "torch")
    prepare_model(model, dataclasses.replace(PLAIN, fp8_quantize_kernel="triton"))
    assert [m.quantize_kernel for m in model if isinstance(m, Fp8Linear)] == ["triton", "triton"]


def test_triton_is_refused_where_it_cannot_run(monkeypatch):
    from loralab.speed.fp8 import Fp8Linear, use_quantize_kernel
    from loralab.speed.fp8_kernels import can_run_on

    monkeypatch.delenv("TRITON_INTERPRET")
    assert "runs on CUDA (here cpu" in can_run_on(torch.device("cpu"))
    assert can_run_on(torch.device("cuda")) is None
    model = nn.Sequential(Fp8Linear.from_linear(nn.Linear(32, 16)))
    with pytest.raises(RuntimeError, match="'speed.fp8_quantize_kernel' = 'triton': .*runs on CUDA"):
        use_quantize_kernel(model, "triton")
    assert model[0].quantize_kernel == "torch"
