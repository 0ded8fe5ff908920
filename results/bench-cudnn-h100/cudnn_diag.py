import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel, _cur_sdpa_kernel_backends
from torch.profiler import profile, ProfilerActivity
print("default order", _cur_sdpa_kernel_backends(with_priority=True))
q = torch.randn(4, 32, 512, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(4, 8, 512, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(4, 8, 512, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
def f(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
def names(fn):
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn(q, k, v).sum().backward(); torch.cuda.synchronize()
    return sorted({e.key[:60] for e in p.key_averages() if "flash" in e.key.lower() or "cudnn" in e.key.lower() or "sdpa" in e.key.lower() or "fmha" in e.key.lower()})
print("eager default", names(f))
order = [SDPBackend.CUDNN_ATTENTION, *(b for b in _cur_sdpa_kernel_backends(with_priority=True) if b != SDPBackend.CUDNN_ATTENTION)]
with sdpa_kernel(order, set_priority=True):
    print("order inside", _cur_sdpa_kernel_backends(with_priority=True))
    print("eager cudnn-first", names(f))
    g = torch.compile(f)
    print("compiled cudnn-first", names(g))
with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
    print("eager cudnn-only", names(f))
# non-GQA: repeat kv
def f2(q, k, v):
    return F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
with sdpa_kernel(order, set_priority=True):
    print("eager cudnn-first no-gqa", names(f2))
