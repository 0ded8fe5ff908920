"""FP8 q/k/v as one GEMM: an attention block's three FP8 base projections, which read one input, stored as one
(N_q + N_k + N_v, K) matrix of codes and computed by one ``_scaled_mm`` forward and one backward
(``speed.fp8_fused_qkv``).

Why: on an FP8 base (``speed/fp8.py``) each of q, k and v quantises its input-gradient rows and runs its own
``dx`` GEMM, whose three (tokens x hidden) bf16 results autograd then adds; k and v's are thin GEMMs
(K = 1,024 at Llama-3-8B's shape) that use the tensor cores poorly. Fused, as gpt-fast's ``wqkv`` and vLLM's
``QKVParallelLinear`` store them for inference, the forward is one 2048 x 6144 x 4096 GEMM and the input gradient
one GEMM over K = 6,144 from one quantised gradient. Timed alone on an H100 at the 8B shape, 2,048 tokens
(results/bench-profile-h100-1206, ``scripts/fused_proj_bench.py``): forward 97 against 124 us, input gradient 124
(142 with the copy that joins the three gradients) against 287 us a layer, 0.56x in all. On a bf16 base the same
fusion gave 0.93x a layer (forward 1.04x slower, backward 0.85x with the copy) and gate/up did not pay on either
base; only FP8 q/k/v fuse (the bf16 trio is not measured in the step).

How: ``fuse_fp8_qkv`` concatenates the codes and scales of each q/k/v trio whose base layers are plain
``Fp8Linear`` of one input size, device and settings, keeps the concatenation as non-persistent buffers of
their parent (the attention module, not in its state dict) and makes each member's ``weight`` and ``scale_bits``
views of its rows, so the fusion holds no extra memory. Whatever copies tensors one by one (``model.to`` another
device, ``load_state_dict(assign=True)``, a deep copy) parts the views from the buffer: eagerly a member then finds
its codes no longer in the trio's storage and the trio computes alone (its layers' own codes, the state dict's),
and the parted copies hold the q/k/v codes twice until ``unfuse_fp8_qkv``. Only children named ``q_proj``,
``k_proj`` and ``v_proj`` fuse, and not in encoder-decoder models (cross-attention feeds k and v another input than
q). The outputs are views of one split: an in-place op on a member's bare output (no adapter, no bias) is refused
by autograd, where the separate layer allowed it. The members become ``FusedQkvFp8Linear``
(``Fp8Linear`` with a group): the first member called with ``x`` computes the whole product and leaves the
others their column slices, keyed on the identity (and, eagerly, the version) of ``x``; the last one clears the
cache, as ``speed/shared_input.py``'s groups do for LoRA's A products (``SiblingCache``, the same rules: a member called with
another input computes the trio again, a forward that raised midway is cleared by ``shared_input.clear_input_groups``, copies
and pickles get no group). The column-major codes for the backward (``Fp8Linear.cache_transpose``) are kept
for the trio at once (``transpose_unit``), one (K, N) buffer of the parent.

Numbers: the forward's products are the separate layers' (each output column is the same dot product of the
same quantised input; CUDA may pick another kernel, so not bitwise there). The input gradient is not: the three
gradients are quantised per token row as one (tokens x 6,144) row, so a row's scale is the largest of q's, k's
and v's amaxes where each had its own, and the FP8 kernel sums over all 6,144 columns at once where three
results were added in bf16; the rounding per element is the same relative step (e4m3 keeps 3 mantissa bits at
any magnitude above the row's smallest normal, amax / 2¹⁵).

Not covered: fast DoRA with dropout computes each member's ``W·dropout(x)`` alone (``Fp8Linear.product``), and a
member's columns of the trio's cached column-major copy are strided, so those backwards copy the member's codes
again (``codes_colmajor`` None) although the trio's copy is cached."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from loralab.speed.fp8 import Fp8Linear, fp8_linear
from loralab.speed.shared_input import SiblingCache, input_groups, is_encoder_decoder

SIBLINGS = ("q_proj", "k_proj", "v_proj")
_GROUP, _INDEX = "_loralab_qkv_group", "_loralab_qkv_index"
_CODES, _SCALES, _CODES_T = "loralab_qkv_codes", "loralab_qkv_scale_bits", "loralab_qkv_codes_t_bits"


class QkvGroup(SiblingCache):
    """One q/k/v trio: its parent (holding the concatenated codes, scales and, once cached, their column-major
    copy), members (``SiblingCache``: weakly, in q, k, v order, with the forward-scoped cache of their (..., N_i)
    products) and their output sizes."""

    def __init__(self, parent: nn.Module, members):
        super().__init__(members)
        self._parent = weakref.ref(parent)
        self.sizes = tuple(m.out_features for m in members)

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member ``index``'s product ``x @ W_iᵀ`` (no bias; (..., N_i) in the activation dtype), or None where the
        trio cannot compute together (a member or the parent gone, settings that differ)."""
        part = self.cached(index, x)
        if part is not None:
            return part
        self.clear()
        parent, members = self._parent(), self.members
        if parent is None or any(m is None for m in members):
            return None
        first = members[0]
        if any((m.quantize_kernel, m.fast_accum) != (first.quantize_kernel, first.fast_accum) for m in members):
            return None
        stored = getattr(parent, _CODES)
        if not torch.compiler.is_compiling() and not _views_of(stored, members):
            return None  # copied apart since the fusion: the layers' own codes are what the model holds
        t_bits = getattr(parent, _CODES_T, None)
        codes, scales = stored.view(torch.float8_e4m3fn), getattr(parent, _SCALES).view(torch.float32)
        colmajor = None if t_bits is None else t_bits.view(torch.float8_e4m3fn).t()
        y = fp8_linear(x, codes, scales, colmajor, first.quantize_kernel, first.fast_accum)
        parts = y.split(self.sizes, dim=-1)
        self.keep(x, parts, (i for i in range(len(parts)) if i != index))
        return parts[index]

    @torch.no_grad()
    def cache_transposes(self) -> int:
        """Keep the trio's column-major codes once (a (K, N) buffer of the parent; each member's ``codes_t_bits``
        a view of its columns). Returns the bytes newly held (0 where cached already)."""
        parent = self._parent()
        if parent is None or getattr(parent, _CODES_T, None) is not None:
            return 0
        t_bits = getattr(parent, _CODES).t().contiguous()
        parent.register_buffer(_CODES_T, t_bits, persistent=False)
        start = 0
        for member, size in zip(self.members, self.sizes):
            member.register_buffer("codes_t_bits", t_bits[:, start:start + size], persistent=False)
            start += size
        return t_bits.numel()


def _views_of(stored: torch.Tensor, members) -> bool:
    """Whether every member's codes still lie in the trio's buffer ``stored`` (one storage)."""
    ptr = stored.untyped_storage().data_ptr()
    return all(m.weight.untyped_storage().data_ptr() == ptr for m in members)


class FusedQkvFp8Linear(Fp8Linear):
    """An ``Fp8Linear`` of a q/k/v trio: its product comes from its ``QkvGroup`` where the trio computes together,
    else from its own codes as ``Fp8Linear`` computes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the layer's own call only: ``product`` (fast DoRA's W·dropout(x)) computes alone, not the whole trio
        group = self.__dict__.get(_GROUP)
        y = None if group is None else group.take(self.__dict__[_INDEX], x)
        if y is None:
            return super().forward(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def codes_colmajor(self) -> torch.Tensor | None:
        # the member's columns of the trio's (K, N) copy are strided (leading dimension N): its own path copies
        # its codes per backward instead of handing the kernel a strided operand
        bits = getattr(self, "codes_t_bits", None)
        return None if bits is None or not bits.is_contiguous() else bits.view(torch.float8_e4m3fn).t()

    def cache_transpose(self) -> int:
        group = self.__dict__.get(_GROUP)
        return super().cache_transpose() if group is None else group.cache_transposes()

    def transpose_unit(self) -> tuple:
        group = self.__dict__.get(_GROUP)
        members = () if group is None else group.members
        return members if members and all(m is not None for m in members) else (self,)


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def fuse_fp8_qkv(model: nn.Module) -> int:
    """Fuse every q/k/v trio of ``model`` (children named ``SIBLINGS`` of one module, raw or wrapped by peft) whose
    base layers are plain ``Fp8Linear`` (not already fused, no instance ``forward``: accelerate's hooks) of one
    ``in_features``, device, compute dtype, quantisation kernel and fast-accumulation mode, with no column-major
    copy cached yet; returns the number of trios. The codes and scales move into one buffer each (the module
    docstring); parameters keep their names and values."""
    if is_encoder_decoder(model):
        return 0
    fused = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        if not all(n in children for n in SIBLINGS):
            continue
        bases = [_base(children[n]) for n in SIBLINGS]
        first = bases[0]
        if not all(_fusable(b) and "forward" not in b.__dict__ and getattr(b, "codes_t_bits", None) is None
                   and (b.in_features, b.weight.device, b.compute_dtype, b.quantize_kernel, b.fast_accum)
                   == (first.in_features, first.weight.device, first.compute_dtype, first.quantize_kernel,
                       first.fast_accum) for b in bases):
            continue
        with torch.no_grad():
            codes = torch.cat([b.weight.data for b in bases])
            scale_bits = torch.cat([b.scale_bits for b in bases])
        parent.register_buffer(_CODES, codes, persistent=False)
        parent.register_buffer(_SCALES, scale_bits, persistent=False)
        group = QkvGroup(parent, bases)
        start = 0
        for index, base in enumerate(bases):
            rows = slice(start, start + base.out_features)
            base.weight.data = codes[rows]
            base.scale_bits = scale_bits[rows]
            base.__dict__.update({_GROUP: group, _INDEX: index})
            base.__class__ = FusedQkvFp8Linear
            start += base.out_features
        fused += 1
    return fused


def _fusable(layer: nn.Module) -> bool:
    # a plain FP8 layer, or a trio member whose group a copy or pickle dropped (it computes alone until fused again)
    return type(layer) is Fp8Linear or (type(layer) is FusedQkvFp8Linear and layer.__dict__.get(_GROUP) is None)


def unfuse_fp8_qkv(model: nn.Module) -> int:
    """Undo ``fuse_fp8_qkv`` on ``model``: each trio member gets its own copy of its codes, scales and (where cached)
    column-major codes and becomes a plain ``Fp8Linear``; the parents' trio buffers are dropped. Returns the number of
    layers. Also for a copied model whose members lost their group."""
    count = 0
    for module in list(model.modules()):
        for name in (_CODES, _SCALES, _CODES_T):
            module._buffers.pop(name, None)
        if type(module) is FusedQkvFp8Linear:
            with torch.no_grad():
                module.weight.data = module.weight.data.clone()
                module.scale_bits = module.scale_bits.clone()
                if getattr(module, "codes_t_bits", None) is not None:
                    module.codes_t_bits = module.codes_t_bits.contiguous()
            module.__dict__.pop(_GROUP, None)
            module.__dict__.pop(_INDEX, None)
            module.__class__ = Fp8Linear
            count += 1
    return count


def fp8_qkv_groups(model: nn.Module) -> list[QkvGroup]:
    """The distinct ``QkvGroup`` objects of ``model``'s layers, in module order."""
    return input_groups(model, _GROUP)
