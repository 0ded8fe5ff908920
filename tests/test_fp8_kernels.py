"""The Triton row-wise FP8 quantisation kernel (speed/fp8_kernels.py, ``speed.fp8_quantize_kernel:
"triton"``) against ``speed.fp8.quantize_rows`` run eagerly on the same device (itself checked
against an independent reference in test_fp8.py), bit for bit: on every finite bfloat16 value, on
every tie of e4m3's grid (at a scale of 1 and of 5, which is not a power of two), with the input
gradient's column scales, on rows wider than one program holds, strided rows, inf and NaN, and
through the FP8 layer's forward and backward. On CPU the kernel runs in Triton's interpreter (set
by conftest.py on machines without CUDA); on a GPU the ``cuda`` cases run the compiled kernel."""

import os

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="the kernel's CPU check needs triton (the test extra installs it)")

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                  reason="Triton's interpreter is on only where there is no CUDA")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="the compiled kernel needs CUDA")]),
]


def same_bits(a, b) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def both(x, col=None):
    from loralab.speed.fp8 import quantize_rows
    from loralab.speed.fp8_kernels import quantize_rows_triton

    got = quantize_rows_triton(x, col)
    want = quantize_rows(x if col is None else x.float() * col)
    return got, want


def assert_same(x, col=None):
    (codes, scales), (want_codes, want_scales) = both(x, col)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape and scales.shape == (x.shape[0], 1)
    assert torch.equal(scales, want_scales), "scales differ"
    assert same_bits(codes, want_codes), f"{int((codes.view(torch.uint8) != want_codes.view(torch.uint8)).sum())} codes differ"
    return codes, scales


@pytest.mark.slow  # 65,280 values through the interpreted kernel on CPU (4-7 s)
@pytest.mark.parametrize("device", DEVICES)
def test_every_finite_bfloat16_value_quantises_to_the_same_bits(device):
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = values[torch.isfinite(values.float())]
    x = values[: values.numel() // 256 * 256].reshape(-1, 256).to(device)  # rows of mixed magnitudes
    codes, _ = assert_same(x)
    assert (codes.view(torch.uint8) == 0x80).any()  # negative zeros among them, kept


def _grid_ties(scale: float) -> torch.Tensor:
    """A row whose scale comes out as ``scale`` and whose quotients x / scale are e4m3's grid points
    and every midpoint between neighbours (subnormals included): ties, which go to the even code."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448, ascending
    mids = (grid[:-1] + grid[1:]) / 2
    amax = torch.tensor(448.0 * scale)
    assert (amax * (1 / 448.0)).item() == scale  # true of 1 and 5 (not of 3: 1344 · float32(1/448) > 3)
    return torch.cat([amax.view(1), mids * scale, -mids * scale, grid * scale]).reshape(1, -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_ties_round_to_even_on_the_whole_e4m3_grid(device, scale):
    """At scale 5 the quotients land on the ties only through a correctly rounded division; an
    approximate one (Triton's default ``/`` compiled for a GPU is within 2 ulp) can move them off."""
    x = _grid_ties(scale).to(device)
    codes, scales = assert_same(x)
    assert scales.item() == scale
    mids = codes[0, 1:127].view(torch.uint8).int()
    assert (mids % 2 == 0).all()  # the even neighbour, each time


@pytest.mark.parametrize("device", DEVICES)
def test_column_scales_wide_rows_strided_rows_and_zero_rows(device):
    from loralab.speed.fp8_kernels import ONE_PASS_MAX

    torch.manual_seed(0)
    col = (torch.rand(300) * 8 + 1e-3).to(device)
    x = (torch.randn(5, 300, dtype=torch.bfloat16) * 3).to(device)
    x[2] = 0  # EPS's scale, zero codes
    _, scales = assert_same(x, col)
    assert scales[2].item() == pytest.approx(1e-12 / 448)

    n = ONE_PASS_MAX + 1000  # the two-pass path, with and without column scales
    wide = (torch.randn(3, n) * torch.logspace(-6, 6, n)).to(torch.bfloat16).to(device)
    assert_same(wide)
    assert_same(wide, (torch.rand(n) + 0.5).to(device))

    strided = torch.randn(6, 512, dtype=torch.float16, device=device)[:, 100:400]  # rows 512 apart, 300 wide
    assert_same(strided)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy, on NaN
@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_inputs_stay_visible(device):
    """An inf entry gives NaN codes where it is (inf / inf) and zeros elsewhere; a NaN entry makes
    the row's scale NaN and every code of the row NaN: as the torch ops do. Never a finite ±448."""
    x = torch.tensor([[1.0, float("inf"), -2.0], [1.0, 2.0, 3.0], [1.0, float("nan"), 3.0]], device=device)
    (codes, scales), (want, want_scales) = both(x)
    assert torch.equal(scales[:2], want_scales[:2]) and torch.isnan(scales[2]).item() and torch.isnan(want_scales[2]).item()
    assert torch.equal(torch.isnan(codes.float()), torch.isnan(want.float()))
    assert torch.isnan(codes[2].float()).all() and torch.isnan(codes[0, 1].float())
    finite = ~torch.isnan(want.float())
    assert torch.equal(codes.float()[finite], want.float()[finite])


@pytest.mark.parametrize("device", DEVICES)
def test_the_fp8_layer_gives_the_same_bits_with_either_kernel(device):
    from loralab.speed.fp8 import Fp8Linear, use_quantize_kernel

    torch.manual_seed(1)
    layer = Fp8Linear.from_linear(nn.Linear(64, 48, device=device, dtype=torch.bfloat16))
    model = nn.Sequential(layer)
    x = torch.randn(2, 7, 64, device=device, dtype=torch.bfloat16)
    grad = torch.randn(2, 7, 48, device=device, dtype=torch.bfloat16)
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
    forward and backward, with the eager torch ops' bits; ``prepare_model`` sets the kernel
    ``speed.fp8_quantize_kernel`` names on every FP8 layer. (Inductor itself: the slow test below.)"""
    import dataclasses

    from loralab.speed.step import PLAIN, prepare_model

    model = _two_layers()
    x, grad = torch.randn(2, 7, 64), torch.randn(2, 7, 32)
    assert _compiled_matches_eager(model, "aot_eager", x, grad)
    from loralab.speed.fp8 import use_quantize_kernel

    use_quantize_kernel(model, "torch")
    prepare_model(model, dataclasses.replace(PLAIN, fp8_quantize_kernel="triton"))
    assert [m.quantize_kernel for m in model if hasattr(m, "quantize_kernel")] == ["triton", "triton"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU inductor with the interpreted kernel")
def test_inductor_compiles_around_the_kernel_with_the_same_bits():
    """Inductor (CPU) takes the op as an extern kernel in one graph, forward and backward: same bits."""
    assert _compiled_matches_eager(_two_layers(), "inductor", torch.randn(2, 7, 64), torch.randn(2, 7, 32))


def _two_layers():
    from loralab.speed.fp8 import Fp8Linear

    torch.manual_seed(2)
    return nn.Sequential(Fp8Linear.from_linear(nn.Linear(64, 48)), nn.SiLU(), Fp8Linear.from_linear(nn.Linear(48, 32)))


def _compiled_matches_eager(model, backend, x, grad) -> bool:
    from loralab.speed.fp8 import use_quantize_kernel

    outs = []
    for kernel, compiled in (("torch", False), ("triton", True)):
        use_quantize_kernel(model, kernel)
        fn = torch.compile(model, backend=backend, fullgraph=True) if compiled else model
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        y.backward(grad)
        outs.append((y.detach(), xi.grad))
    return torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_triton_is_refused_where_it_cannot_run(monkeypatch):
    from loralab.speed.fp8 import Fp8Linear, use_quantize_kernel
    from loralab.speed.fp8_kernels import can_run_on

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "runs on CUDA (here cpu" in can_run_on(torch.device("cpu"))
    assert can_run_on(torch.device("cuda")) is None
    model = nn.Sequential(Fp8Linear.from_linear(nn.Linear(32, 16)))
    with pytest.raises(RuntimeError, match="'speed.fp8_quantize_kernel' = 'triton': .*runs on CUDA"):
        use_quantize_kernel(model, "triton")
    assert model[0].quantize_kernel == "torch"


@pytest.mark.parametrize("device", DEVICES)
def test_the_refresh_product_kernel_is_w_times_a_of_every_layer(device):
    """``weights_times_triton`` (fast DoRA's refresh product in one Triton kernel a group): each layer's
    ``diag(scales)·codes·Aᵀ`` from the layers' own tensors (a pointer table, never a stacked copy), for shapes that
    fill its tiles and ones that do not (N not a multiple of 128, K of 128, ranks below 16), within A's float16
    rounding of the exact product, and closer to it than the shipped ``weights_times``, whose A is two FP8 terms;
    a zero row and rows far below float16's range (the largest entry below 2^-112 too) stay exact, a NaN or an
    infinite entry leaves its rank's products non-finite; a row of A far outside float16's range keeps that
    precision (its power-of-two scale). Refused: layers that do not match, a non-contiguous scale, a misaligned
    layer."""
    from loralab.speed.fp8 import Fp8Linear, weights_times
    from loralab.speed.fp8_kernels import weights_times_triton

    torch.manual_seed(0)
    tol = 4e-4  # A in float16 (2^-12 of an entry on average); the same arithmetic on CPU and CUDA
    for n, k, r, count in ((96, 256, 16, 3), (48, 200, 8, 2), (128, 384, 32, 2)):
        layers = [Fp8Linear.from_linear(nn.Linear(k, n, bias=False)).to(device) for _ in range(count)]
        codes, scales = [m.codes for m in layers], [m.weight_scale for m in layers]
        a = torch.randn(count, r, k, device=device) * 0.05
        exact = torch.stack([m.dequantize().double() @ ai.double().T for m, ai in zip(layers, a)])
        got = weights_times_triton(codes, scales, a)
        assert got.shape == (count, n, r) and got.dtype == torch.float32

        def err(x):
            return ((x.double() - exact).abs().max() / exact.abs().max()).item()

        assert err(got) < tol, (n, k, r, err(got))
        if (2 * r) % 16 == 0 and k % 16 == 0 or device == "cpu":  # CUDA's _scaled_mm: 2r and K multiples of 16
            assert err(got) < err(weights_times(codes, scales, a)), (n, k, r)
    odd = a.clone()
    odd[0, 0], odd[0, 1] = 0.0, odd[0, 1] * 1e-30  # a zero row, and a row far below float16's range
    got = weights_times_triton(codes, scales, odd)
    assert torch.isfinite(got).all() and not got[0, :, 0].any()
    tiny = codes[0].float().double() * scales[0].double()[:, None] @ odd[0, 1].double()
    assert ((got[0, :, 1].double() - tiny).abs().max() / tiny.abs().max()).item() < tol
    odd[0, 2] = a[0, 2] * 2.0 ** -115  # largest entry below 2^-112
    odd[0, 3, 5], odd[0, 4, 7] = float("nan"), float("inf")  # stay visible: never a finite product
    got = weights_times_triton(codes, scales, odd)
    small = codes[0].float().double() * scales[0].double()[:, None] @ odd[0, 2].double()
    assert ((got[0, :, 2].double() - small).abs().max() / small.abs().max()).item() < tol
    assert not torch.isfinite(got[0, :, 3]).any() and not torch.isfinite(got[0, :, 4]).any()
    assert torch.isfinite(got[0, :, 5:]).all() and torch.isfinite(got[1]).all()
    with pytest.raises(ValueError, match="2 codes, 2 scales and 3 A's"):
        weights_times_triton(codes[:2], scales[:2], torch.randn(3, r, k, device=device))
    big = a * 1e6  # float16's largest finite value is 65,504: each row is scaled into range first
    assert ((weights_times_triton(codes, scales, big).double() / 1e6 - exact).abs().max() / exact.abs().max()) < tol
    with pytest.raises(ValueError, match="layer 0's codes must be contiguous, 16-byte aligned"):
        weights_times_triton(codes, [torch.ones(2 * n, device=device)[::2]] * count, a)
    shifted = torch.empty(n * k + 1, dtype=torch.uint8, device=device)[1:].view(torch.float8_e4m3fn).view(n, k)
    with pytest.raises(ValueError, match="layer 1's codes"):
        weights_times_triton([codes[0], shifted, *codes[2:]], scales, a)
