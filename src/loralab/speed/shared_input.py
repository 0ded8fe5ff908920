"""Shared-input LoRA: sibling layers that read one input (q/k/v of an attention module, gate/up of an
MLP) compute their ``lora_A`` products as one GEMM, ``x @ cat(A_q, A_k, A_v)ᵀ`` (``speed.lora_shared_input``).
Plain LoRA layers and fast DoRA layers (``fast_dora.py``) join groups, side by side; peft's own DoRA does not.

Why: peft computes each adapter's ``lora_A(x)`` on its own. Per Llama decoder layer that is five thin
GEMMs reading the same two inputs five times in the forward, and in the backward five ``dA`` GEMMs
reading them again plus five r-wide ``dx`` GEMMs whose activation-sized results autograd adds into x's
gradient one by one. Sharing makes it two of each: forward 3 GEMMs fewer, backward 6 fewer (counted in
the compiled second layer of a tiny Llama: 21 → 18 and 35 → 29 matmuls; the first layer, whose input
needs no gradient, 29 → 25 backward), x read 3 + 3 times fewer and three activation-sized gradient adds
fewer. The adapter's FLOPs are unchanged; the saving is launches and reads. Measured at the Llama-3-8B
shape (r32 on every linear layer, micro-batch 4, one H100, on then off): 1.025x bf16 LoRA, 1.043x FP8-base
LoRA (results/bench-shared-input-h100/speedab).

How: the first member of a group called with ``x`` computes the concatenated product for every member
that can share it and leaves the r-wide column slices on the group, keyed by the identity of ``x`` (and,
in eager mode, its version counter); each later member called with that ``x`` takes its slice, and the
last one clears the cache, so no tensor outlives the forward. Under torch.compile the cache lives only
while the graph is traced: each compiled layer enters and leaves with an empty group (fullgraph, no
recompiles). A member called with another input (cross-attention's q(x), k(y), v(y)) finds a cache for
another tensor and replaces it, computing for itself and the members not yet called; a cache left by a
forward that raised midway is replaced the same way by the next forward's first caller, so no forward
takes a product of another input; until then it holds that input and its autograd graph, which the run's
out-of-memory retry and the micro-batch probe drop (``clear_input_groups``). (Not promised: where a module
calls its siblings out of the siblings' order, k before q say, after such a forward, later forwards may
each leave products behind until the next one replaces them: outputs stay right, one input per group is
held between steps. The cache cannot tell a new forward from a later call in the same one without keeping
the input alive. Nor is the key the A weights: a member taking its slice after they changed in place within
one forward, between its siblings' calls, would take the product of the old ones; no step does that.)

Exactness: forward outputs equal peft's bit for bit (each slice is its own columns of one GEMM, the
same dot products; the tests check it). Gradients are not bitwise: autograd of the split hands the
adapters' input gradient to ONE GEMM ``g_cat @ A_cat`` summing over the concatenated rank where peft
sums three r-wide products, and ``dA`` rows come from one GEMM; equal within ~1e-6 relative in float32
on CPU. The scaling goes at the rank (``lora_B(s·u)``, ``rank_scaling.py``) where the group's
``scale_at_rank`` is set and that is exact for the module and input, peft's ``lora_B(u)·s`` otherwise.

A member computes alone (``RankScaledLoraLinear``'s forward where ``scale_at_rank`` and rank scaling
apply, peft's otherwise) for extra forward arguments (``adapter_names``, variant kwargs), anything but
one active plain or fast DoRA adapter (peft's DoRA and other variants, several active, merged, disabled), a
``lora_A`` that is not a bias-free ``nn.Linear``, dropout (each member draws its own mask: such layers join no
group), ``lora_A`` dtypes, devices or input casts that differ, or no other member to share with. A deep copy or
pickle of a member gets no group (``InputGroup.__reduce__``) and computes as peft does.

Fast DoRA: a layer whose one active adapter's variant is exactly ``fast_dora.FastDoraLinearVariant`` (registered
by that module, ``register_sharing_variant``) takes its slice ``u`` as a LoRA member does, and
``SharedInputLoraLinear`` calls the variant's forward as peft's ``lora.Linear.forward`` does (base output, input
cast for ``lora_A``) with ``lora_a_x=u``, which fast DoRA uses in place of ``lora_A(x)`` in its adapter term
``lora_B(s·u)``. Shared: that product alone (forward and, through the concatenation, its ``dA`` and ``dx``
GEMMs; the compiled tiny Llama's counts drop by the same 3 and 6 per layer as LoRA's). Not shared: each layer's
weight norm (its own ``W·Aᵀ`` and ``A·Aᵀ``, or the norm ``refresh_dora_norms`` kept), the combine, magnitude,
``lora_B``, bias and base layer (FP8 included), all fast DoRA's own; outputs are the ungrouped fast DoRA's bits,
gradients within ~1e-6 (float32, CPU) as for LoRA. Its scaling is at the rank whatever ``scale_at_rank`` says
(fast DoRA's ``_lora``). Either may be enabled first: ``enable_fast_dora`` and ``disable_fast_dora`` group a model
that ``enable_shared_input`` grouped again (``regroup_shared_input``), so peft's DoRA layers leave the groups.

What it shares with peft: everything but the ``lora_A`` product: base layer, ``lora_B``, dropout, the
input cast, parameters, names, state dict and the saved adapter. ``enable_shared_input`` installs it as
``fused_lora.py``'s docstring says (the class becomes ``SharedInputLoraLinear``, peft's class with this
forward, because a class pickles, deep-copies and is guarded by torch.compile as one type for every
layer, where per-instance forwards either do not pickle or recompile per layer); the group is a plain
object in each member's ``__dict__`` (holding its members weakly: no reference cycle), not a submodule,
so names and the state dict are untouched. It
rewrites the same forward as ``fused_lora`` and is refused beside it; it replaces ``rank_scaling``'s
class on the members (``scale_at_rank`` keeps that rewrite) and remembers it for ``disable_shared_input``.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from loralab.speed.fused_lora import FusedLoraLinear, one_active_adapter
from loralab.speed.rank_scaling import RankScaledLoraLinear, takes_rank_scaling

DEFAULT_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_GROUP = "_loralab_input_group"  # keys in each member's __dict__
_INDEX = "_loralab_input_index"
_PREVIOUS = "_loralab_input_previous_class"
_SETTINGS = "_loralab_input_settings"  # key in the __dict__ of the module enable_shared_input grouped
_CONVERTIBLE = (LoraLinear, RankScaledLoraLinear)
_SHARING_VARIANTS: tuple = ()
"""The peft variant classes whose layers may join groups (``register_sharing_variant``), matched by exact type."""


def register_sharing_variant(cls: type) -> None:
    """Let a layer whose one active adapter holds a variant of exactly class ``cls`` join groups. ``cls.forward``
    takes peft's variant arguments and ``lora_a_x``: the (..., r) product ``lora_A(x)`` of the ``x`` it is given
    (as peft casts it), to use in place of its own, or None (compute it); it is passed only where no dropout
    applies. ``fast_dora.py`` registers ``FastDoraLinearVariant`` on import (no layer holds one before).
    Raises TypeError where ``cls`` is not a class."""
    global _SHARING_VARIANTS
    if not isinstance(cls, type):
        raise TypeError(f"register_sharing_variant needs a variant class, got {cls!r}")
    if cls not in _SHARING_VARIANTS:
        _SHARING_VARIANTS = (*_SHARING_VARIANTS, cls)


def _active_adapter(module: LoraLinear) -> str | None:
    """The one active adapter of ``module`` (enabled, unmerged) where it has no variant or a registered one
    (fast DoRA), else None (several active, merged, disabled, peft's DoRA or another variant)."""
    name = one_active_adapter(module)
    if name is None:
        return None
    variant = module.lora_variant.get(name)
    return name if variant is None or type(variant) in _SHARING_VARIANTS else None


def shareable_adapter(module: LoraLinear) -> str | None:
    """The adapter whose ``lora_A`` product ``module`` may take from its group now, or None where it
    computes alone (the module docstring's cases, bar forward arguments and the group-wide checks)."""
    name = _active_adapter(module)
    if name is None:
        return None
    lora_a = module.lora_A[name]
    if type(lora_a) is not nn.Linear or lora_a.bias is not None:
        return None
    if module.training and not isinstance(module.lora_dropout[name], nn.Identity):
        return None
    return name


def _joins(module: LoraLinear) -> bool:
    """Whether ``module`` holds one active plain LoRA or fast DoRA adapter with a bias-free ``nn.Linear`` A and no
    dropout now: a layer that could not share in training (peft's DoRA and other variants, merged, several
    adapters, dropout, which draws a mask per layer) joins no group, so the record and the log count only layers
    that take the shared product. ``shareable_adapter`` checks again at each forward (adapters set or merged since)."""
    name = shareable_adapter(module)
    return name is not None and isinstance(module.lora_dropout[name], nn.Identity)


def _detached():
    return None


def _version(x: torch.Tensor) -> int | None:
    # Dynamo traces ``x._version`` as an unbacked integer and comparing two of them fails fullgraph compile
    # ("could not guard on data-dependent expression"), so it is left out of the key while compiling; a
    # compiled layer's cache exists only while one graph is traced. Inference tensors have no counter.
    if torch.compiler.is_compiling() or x.is_inference():
        return None
    return x._version


class SiblingCache:
    """The forward-scoped cache of a group of sibling layers reading one input (held weakly, ``members``, in
    sibling order): ``x`` (the input it belongs to, None outside a forward), ``version`` (x's version counter
    then), ``parts`` (per member index: its product or None) and ``pending`` (indices of the members yet to take
    theirs). ``InputGroup`` caches LoRA's A products, ``speed/fp8_qkv.QkvGroup`` an FP8 q/k/v trio's outputs."""

    def __init__(self, members):
        # weak: each member holds the group, so strong references back would make every grouped layer (base
        # weights included) a reference cycle, freed only by the cyclic garbage collector after ``del model``
        self._members = tuple(weakref.ref(m) for m in members)
        self.clear()

    @property
    def members(self) -> tuple:
        """The member layers, in sibling order (None for one no longer alive)."""
        return tuple(ref() for ref in self._members)

    def clear(self) -> None:
        self.x = self.version = self.parts = self.pending = None

    def __reduce__(self):
        # A deep copy or pickle of a member (the generation engine merges a deep copy of each projection) gets
        # no group and computes alone: copying the group would copy its siblings, base weights and all,
        # with each member, and never a forward's tensors. Grouping the copied model again groups it.
        return (_detached, ())

    def cached(self, index: int, x: torch.Tensor):
        """Member ``index``'s part of ``x`` where this forward's first caller left it (the last taker clears the
        cache), else None."""
        if self.x is None or x is not self.x or _version(x) != self.version or index not in self.pending:
            return None
        part = self.parts[index]
        rest = tuple(i for i in self.pending if i != index)
        if rest:
            self.pending = rest
        else:
            self.clear()
        return part

    def keep(self, x: torch.Tensor, parts, pending) -> None:
        """Cache ``parts`` (per member index) of ``x`` for the members ``pending``."""
        self.x, self.version, self.parts, self.pending = x, _version(x), tuple(parts), tuple(pending)


class InputGroup(SiblingCache):
    """LoRA layers reading one input and the forward-scoped cache of their ``lora_A`` products (``SiblingCache``,
    parts (..., r)). ``scale_at_rank``: the members put LoRA's scaling at the rank where ``rank_scaling.py`` would."""

    def __init__(self, members, scale_at_rank: bool):
        super().__init__(members)
        self.scale_at_rank = bool(scale_at_rank)

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member ``index``'s ``lora_A`` product of ``x`` (cast as peft casts it, shape (..., r)), or None
        where it computes alone. The first caller of ``x`` computes the products of every member that can
        share them (where a cache for another tensor is found: of itself and the members still pending,
        the others having run in this forward) and caches them; later callers take theirs."""
        part = self.cached(index, x)
        if part is not None:
            return part
        callers = range(len(self._members)) if self.x is None else (index, *self.pending)
        self.clear()
        members = self.members
        names = [shareable_adapter(m) if i in callers and m is not None else None for i, m in enumerate(members)]
        if names[index] is None:
            return None
        me = members[index]
        weight = me.lora_A[names[index]].weight
        share = [i for i, n in enumerate(names) if n is not None and _compatible(members[i], n, me, weight)]
        if len(share) < 2:
            return None
        weights = [members[i].lora_A[names[i]].weight for i in share]
        products = F.linear(me._cast_input_dtype(x, weight.dtype), torch.cat(weights, dim=0))
        parts = [None] * len(members)
        for i, part in zip(share, products.split([w.shape[0] for w in weights], dim=-1)):
            parts[i] = part
        self.keep(x, parts, (i for i in share if i != index))
        return parts[index]


def _compatible(module: LoraLinear, name: str, me: LoraLinear, weight: torch.Tensor) -> bool:
    """Whether ``module``'s adapter ``name`` reads the input exactly as the caller ``me`` casts it for ``weight``."""
    other = module.lora_A[name].weight
    return (other.dtype == weight.dtype and other.device == weight.device
            and getattr(module, "cast_input_dtype_enabled", True) == getattr(me, "cast_input_dtype_enabled", True))


class SharedInputLoraLinear(LoraLinear):
    """peft ``lora.Linear`` taking its ``lora_A`` product from its ``InputGroup`` where that applies (a fast DoRA
    layer hands it to its variant's forward as ``lora_a_x``); otherwise ``RankScaledLoraLinear``'s forward
    (group's ``scale_at_rank`` and rank scaling exact here) or peft's own."""

    def forward(self, x: torch.Tensor, *args, **kwargs):
        group = self.__dict__.get(_GROUP)
        u = None if group is None or args or kwargs else group.take(self.__dict__[_INDEX], x)
        at_rank = group is not None and group.scale_at_rank and not args and not kwargs and takes_rank_scaling(self, x)
        if u is None:
            if at_rank:  # not a subclass: its forward is called as a function, on the path that takes no super()
                return RankScaledLoraLinear.forward(self, x)
            return super().forward(x, *args, **kwargs)
        name = _active_adapter(self)
        result = self.base_layer(x)
        result_dtype = result.dtype
        variant = self.lora_variant.get(name)
        if variant is not None:  # fast DoRA: peft's call of the variant (its input cast too), with the product
            x = self._cast_input_dtype(x, self.lora_A[name].weight.dtype)
            result = variant.forward(self, active_adapter=name, x=x, result=result, lora_a_x=u)
        else:
            lora_B, s = self.lora_B[name], self.scaling[name]
            result = result + (lora_B(u * s) if at_rank else lora_B(u) * s)
        return result.to(result_dtype)


def is_encoder_decoder(model: nn.Module) -> bool:
    """``config.is_encoder_decoder`` on ``model``, its ``base_model`` or that one's ``model`` (peft's wrappers)."""
    candidates = [model, getattr(model, "base_model", None)]
    candidates.append(getattr(candidates[1], "model", None))
    return any(getattr(getattr(m, "config", None), "is_encoder_decoder", False) is True for m in candidates)


def enable_shared_input(model: nn.Module, scale_at_rank: bool, siblings=DEFAULT_SIBLINGS) -> int:
    """Group the peft LoRA ``Linear`` children of each module named as in one ``siblings`` tuple (two or
    more found) and make them ``SharedInputLoraLinear``; returns the number of groups. Only layers of
    peft's own class or ``RankScaledLoraLinear`` without an instance ``forward`` (accelerate's hooks) are
    taken, as ``fused_lora.install_lora_class`` takes them, and of those only layers holding one active plain
    LoRA or fast DoRA adapter without dropout (``_joins``; peft's own DoRA joins none); groups made before are undone
    first, so a second call regroups. ``scale_at_rank``: put LoRA's scaling at the rank where exact (shared or not).
    The settings stay on ``model`` (not in a copy or pickle) for ``regroup_shared_input``: ``enable_fast_dora``
    and ``disable_fast_dora`` call it, so the fast DoRA layers are grouped whichever is enabled first.

    Returns 0 and changes nothing for an encoder-decoder model (``config.is_encoder_decoder``): its
    decoder's cross-attention feeds k/v another input than q. Raises ValueError where a LoRA layer is a
    ``FusedLoraLinear``: both rewrite the same forward."""
    fused = [n for n, m in model.named_modules() if isinstance(m, FusedLoraLinear)]
    if fused:
        raise ValueError(f"speed.lora_shared_input cannot be combined with speed.fused_lora: {len(fused)} LoRA "
                         f"layers (first {fused[0]!r}) are FusedLoraLinear and both rewrite the LoRA forward; "
                         "turn one of them off")
    if is_encoder_decoder(model):
        return 0
    disable_shared_input(model)
    groups = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in siblings:
            members = [children[n] for n in names if n in children]
            members = [m for m in members if type(m) in _CONVERTIBLE and "forward" not in m.__dict__
                       and _joins(m)]
            if len(members) < 2:
                continue
            group = InputGroup(members, scale_at_rank)
            for index, member in enumerate(members):
                member.__dict__.update({_PREVIOUS: type(member), _GROUP: group, _INDEX: index})
                member.__class__ = SharedInputLoraLinear
            groups += 1
    model.__dict__[_SETTINGS] = _Settings(scale_at_rank, siblings)
    return groups


class _Settings:
    """``enable_shared_input``'s arguments, kept on the model it grouped; a copy or pickle gets None (no group)."""

    def __init__(self, scale_at_rank: bool, siblings):
        self.scale_at_rank, self.siblings = bool(scale_at_rank), siblings

    def __reduce__(self):
        return (_detached, ())


def regroup_shared_input(model: nn.Module) -> int:
    """Call ``enable_shared_input`` again, with its settings, on each module of ``model`` (itself included) that it
    grouped and no ``disable_shared_input`` undid since: for changes to which layers can join (fast DoRA swapped in
    or out). Returns the number of groups in ``model`` then; 0 where no such module exists (a module grouped as
    an ancestor of ``model`` is not found). Raises ValueError as ``enable_shared_input`` does (fused LoRA since)."""
    marked = [(m, m.__dict__[_SETTINGS]) for m in model.modules() if m.__dict__.get(_SETTINGS) is not None]
    for module, settings in marked:
        enable_shared_input(module, settings.scale_at_rank, settings.siblings)
    return len(input_groups(model)) if marked else 0


def disable_shared_input(model: nn.Module) -> int:
    """Give each ``SharedInputLoraLinear`` of ``model`` its class from before ``enable_shared_input`` and
    drop its group; returns how many layers. A layer given an instance ``forward`` since (accelerate's
    hooks call the bound rewrite) keeps both, as ``fused_lora.remove_lora_class`` leaves such layers. The settings
    kept for ``regroup_shared_input`` are dropped too."""
    count = 0
    for module in model.modules():
        module.__dict__.pop(_SETTINGS, None)
        if type(module) is SharedInputLoraLinear and "forward" not in module.__dict__:
            group = module.__dict__.pop(_GROUP, None)
            if group is not None:
                group.clear()
            module.__dict__.pop(_INDEX, None)
            module.__class__ = module.__dict__.pop(_PREVIOUS, LoraLinear)
            count += 1
    return count


def clear_input_groups(model: nn.Module) -> None:
    """Empty the cache of every sibling group ``model``'s layers hold (each ``SiblingCache``: ``InputGroup``,
    ``speed/fp8_qkv.py``'s trios). For callers that catch an exception out of a forward (an out-of-memory retry
    at a smaller micro-batch, the micro-batch probe): in eager mode a forward that raised between a group's
    first and last member leaves that group holding its input, whose autograd graph keeps every earlier
    layer's saved activations alive until the next forward replaces it."""
    for module in model.modules():
        for value in module.__dict__.values():
            if isinstance(value, SiblingCache):
                value.clear()


def input_groups(model: nn.Module, key: str = _GROUP) -> list:
    """The distinct groups ``model``'s layers hold under ``key`` in their ``__dict__`` (``InputGroup`` objects; another
    key: another kind of ``SiblingCache``, e.g. ``speed/fp8_qkv.py``'s trios), in module order."""
    seen = {}
    for module in model.modules():
        group = module.__dict__.get(key)
        if group is not None:
            seen.setdefault(id(group), group)
    return list(seen.values())


def shared_input_summary(model: nn.Module) -> dict:
    """``{"groups": n, "layers": m}``: the groups and the layers in them (plain LoRA and fast DoRA), for the run
    record (0 and 0 where the setting applies nowhere: no sibling names matched, an encoder-decoder model)."""
    groups = input_groups(model)
    return {"groups": len(groups), "layers": sum(len(g.members) for g in groups)}
