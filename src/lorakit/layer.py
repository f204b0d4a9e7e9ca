"""LoRA layers: a frozen base layer plus named low-rank adapters.

    y = base(x) + Σ_active (alpha / r) · B(A(dropout(x)))          (Hu et al. 2021, eq. 3)

An adapter may be DoRA's (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): the
adapted weight is split into a trained magnitude m (one per output) and a direction,

    W' = m ⊙ (W + ΔW) / ||W + ΔW||,      ΔW = scale · B A,  ||·|| the norm of each output's row,

so with g = m / ||W + ΔW|| (out,) the layer computes g ⊙ (W x + ΔW x) + b, and its update is

    update(x) = (g - 1) ⊙ W x + g ⊙ scale · B A x        (x: the dropped input, as peft applies it)

As in the paper (section 4.3) and peft, ||W + ΔW|| is computed from the current weights at every
forward but treated as a constant in backward (no gradient flows through it): m, A and B train.

Attribute names (`base_layer`, `lora_A.<name>`, `lora_B.<name>`, `lora_embedding_A.<name>`,
`lora_magnitude_vector.<name>`, ...) are PEFT's, so a state dict maps 1:1 to PEFT's file format
(see adapter_io).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import initialisation
from .dropout import Dropout
from .fused import lora_linear, lora_update, rescale
from .nf4 import NF4Linear, NF4State


class LoraLayer(nn.Module):
    """What the linear and embedding LoRA layers share: adapter bookkeeping and merge/unmerge.

    Subclasses define `delta_weight(name)` in the base weight's layout and the forward.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.scaling: dict[str, float] = {}
        self.rank: dict[str, int] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # DoRA: the magnitude m of each DoRA adapter, (out,) (embeddings: (dim,)).
        self.lora_magnitude_vector = nn.ParameterDict()
        # ||W + ΔW|| of each merged DoRA adapter, from the weight it was merged into: unmerge divides by
        # the same g = m / norm (the merged weight's own norm is m, not the original's).
        self.merge_norms: dict[str, torch.Tensor] = {}
        # PiSSA / OLoRA: the adapter's initial (A₀, B₀), a CPU copy, with which the trained adapter is
        # converted into one for the original base W = W_res + scale · B₀ A₀ (initial_adapter).
        self.initial_adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # When the base weight is shared with another module (tied input/output embeddings), merging
        # gives this layer its own copy; the shared original is kept here and restored on unmerge.
        self._tied_weight: nn.Parameter | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def adapter_names(self) -> list[str]:
        return list(self.rank)

    def merge(self, names: list[str] | None = None, untie: bool = False) -> None:
        """W <- W + ΔW for each named adapter not merged yet (merging twice is a no-op).

        untie: the base weight is shared with another module (tied embeddings); merge into a copy
        so the other module keeps the original.
        """
        names = [n for n in (names or self.active_adapters) if n not in self.merged_adapters]
        if not names:
            return
        weight = self.base_layer.weight
        if untie and self._tied_weight is None:
            self._tied_weight = weight
            weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            self.base_layer.weight = weight
        with torch.no_grad():
            merged = weight.float()
            for name in names:
                merged = self.merged_weight(name, merged)
            weight.copy_(merged.to(weight.dtype))
        self.merged_adapters += names

    def unmerge(self) -> None:
        """W <- W - ΔW for every merged adapter (DoRA: W <- W / g - ΔW), the last merged first; a
        weight untied by merge is tied back."""
        if not self.merged_adapters:
            return
        if self._tied_weight is not None:
            self.base_layer.weight = self._tied_weight
            self._tied_weight = None
        else:
            weight = self.base_layer.weight
            with torch.no_grad():
                restored = weight.float()
                for name in reversed(self.merged_adapters):
                    restored = self.unmerged_weight(name, restored)
                weight.copy_(restored.to(weight.dtype))
        self.merge_norms.clear()
        self.merged_adapters = []

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """W + ΔW of adapter `name` for a float32 weight W in the base layout; DoRA: g ⊙ (W + ΔW),
        g = m / ||W + ΔW|| (the weight the forward computes with; the norm is kept for unmerge)."""
        merged = self.delta_weight(name).add_(weight)
        if name not in self.lora_magnitude_vector:
            return merged
        norm = self.weight_norm(name, weight)
        self.merge_norms[name] = norm
        return merged.mul_(self.per_output(self.lora_magnitude_vector[name].detach().float() / norm))

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of merged_weight: W - ΔW; DoRA: W / g - ΔW with the g of the merge."""
        if name in self.lora_magnitude_vector:
            g = self.lora_magnitude_vector[name].detach().float() / self.merge_norms[name]
            weight = weight / self.per_output(g)
        return weight - self.delta_weight(name)

    def weight_norm(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """||W + ΔW|| per output (DoRA's column norm), float32, no gradient. W: the base weight in
        its layout, float32 (default: the layer's own, dequantized for a 4-bit base)."""
        with torch.no_grad():
            weight = self.base_weight() if weight is None else weight
            return torch.linalg.vector_norm(self.delta_weight(name).add_(weight), dim=self.norm_dim)

    def magnitude_scale(self, name: str) -> torch.Tensor:
        """DoRA's g = m / ||W + ΔW|| (out,): m trains, the norm is a constant in backward."""
        return self.lora_magnitude_vector[name] / self.weight_norm(name).to(self.lora_magnitude_vector[name].dtype)

    def per_output(self, v: torch.Tensor) -> torch.Tensor:
        """v (one value per output) shaped to scale the base weight's outputs."""
        return v.unsqueeze(self.norm_dim)  # (out, 1) for an (out, in) weight, (1, out) for (in, out)

    def base_weight(self) -> torch.Tensor:
        """The base weight in its own layout, float32 (a 4-bit weight dequantized)."""
        base = self.base_layer
        return base.dequantize_weight(torch.float32) if isinstance(base, NF4Linear) else base.weight.float()

    def add_magnitude(self, name: str, dtype: torch.dtype, device: torch.device) -> None:
        """DoRA's m starts as ||W + ΔW||, so that g = 1 and the adapter starts as plain LoRA."""
        if self.base_layer.weight.is_meta:
            raise ValueError("DoRA's magnitude starts as the norm of the base weight, which is not loaded yet "
                             "(meta device): add DoRA adapters to a loaded model")
        self.lora_magnitude_vector[name] = nn.Parameter(self.weight_norm(name).to(dtype=dtype, device=device))

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into {type(self.base_layer).__name__}; unmerge first")
        for attr in ("lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B",
                     "lora_magnitude_vector", "initial_adapters"):
            store = getattr(self, attr, None)
            if store is not None and name in store:
                del store[name]
        self.scaling.pop(name, None)
        self.rank.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}, scale={self.scaling[n]:g}" + (", dora" if n in self.lora_magnitude_vector else "")
                          for n, r in self.rank.items())
        return f"adapters=({ranks}), active={self.active_adapters}, merged={self.merged_adapters}"


class LoraLinear(LoraLayer):
    """LoRA on a linear map: nn.Linear, transformers' Conv1D (weight stored (in, out)), or a
    frozen 4-bit linear. A: (r, in_features), B: (out_features, r).

    fused: compute the adapters' update with fused.lora_update (the default; same loss and
    gradients, less memory) or, if False, with the modules as written (the reference in tests).
    DoRA adapters take the fused path too (see can_fuse).
    """

    fused = True

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        # Conv1D (GPT-2) computes x @ W with W: (in, out) — the transpose of nn.Linear's layout.
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()

    @property
    def norm_dim(self) -> int:
        """The input axis of the base weight: (out, in) -> 1, a Conv1D's (in, out) -> 0."""
        return 0 if self.fan_in_fan_out else 1

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: str,
                    dtype: torch.dtype, device: torch.device, dora: bool = False,
                    init_options: dict | None = None) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, dtype=dtype, device=device)
        self.lora_dropout[name] = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name], self.rank[name] = scaling, r
        LINEAR_INITS[init](self, name, **(init_options or {}))
        if dora:  # after the initialisation: m = ||W + ΔW|| of the weights it leaves
            self.add_magnitude(name, dtype, device)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = scale · B A, float32, in the base weight's layout ((out, in), or (in, out) for Conv1D)."""
        delta = self.scaling[name] * (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float())
        return delta.T if self.fan_in_fan_out else delta

    def weight_norm(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """||W + ΔW|| per output without forming W + ΔW (out, in): with ΔW = s · B A,

            ||W_o + ΔW_o||² = ||W_o||² + 2 s · B_o · (W Aᵀ)_o + s² · B_o (A Aᵀ) B_oᵀ

        one read of W for its norms and one for W Aᵀ (out, r), where the sum would write and read
        (out, in) float32 tensors three times more. Float32, no gradient; W as in LoraLayer's."""
        with torch.no_grad():
            w = self.base_weight() if weight is None else weight
            a, b, s = self.lora_A[name].weight.float(), self.lora_B[name].weight.float(), self.scaling[name]
            wa = (a @ w).T if self.fan_in_fan_out else w @ a.T  # (out, r): W Aᵀ in the (out, in) layout
            squared = torch.linalg.vector_norm(w, dim=self.norm_dim).square_()
            squared += (b * wa).sum(1).mul_(2 * s) + (b @ (a @ a.T)).mul_(b).sum(1).mul_(s * s)
            return squared.clamp_(min=0).sqrt_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = base(x) + Σ_active update(name, x)."""
        live = self.live_adapters()
        # Under torch.autocast each matrix multiply's dtype is autocast's choice, which the fused
        # functions (computing in the adapters' dtype) do not make: there, the modules as written.
        if self.fused and not torch.is_autocast_enabled(x.device.type) and self.can_fuse(live):
            return self.fused_forward(x, live)
        base = self.base_layer(x)
        y = base
        for name in live:
            y = y + self.update(name, x, base).to(y.dtype)
        return y

    def update(self, name: str, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """scale · B(A(dropout(x))) of one adapter, computed in the adapter's dtype (float32
        adapters on a bfloat16 base compute in float32; the caller adds in the base's).

        DoRA: (g - 1) ⊙ W dropout(x) + g ⊙ scale · B A dropout(x), g = m / ||W + ΔW||. W x is the
        base output `base` (less the bias) when dropout is off; with dropout the base weight is
        applied to the dropped input again (peft's definition).
        """
        a, b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        h = dropout(x.to(a.weight.dtype))
        lora = self.scaling[name] * b(a(h))
        if name not in self.lora_magnitude_vector:
            return lora
        if base is None or self.dropout_p(name) > 0:
            base = self.base_layer(h.to(x.dtype))
        bias = getattr(self.base_layer, "bias", None)
        wx = (base if bias is None else base - bias).to(lora.dtype)  # W dropout(x)  (..., out)
        g = self.magnitude_scale(name)
        return (g - 1) * wx + g * lora

    def dropout_p(self, name: str) -> float:
        """The dropout probability adapter `name` applies now (0 outside training)."""
        dropout = self.lora_dropout[name]
        return dropout.p if isinstance(dropout, (Dropout, nn.Dropout)) and dropout.training else 0.0

    def can_fuse(self, live: list[str]) -> bool:
        """fused.py computes any number of plain adapters and one DoRA adapter (its output, the
        fused update rescaled: see _fused_dora). Two DoRA adapters each rescale the base: those take
        the equation as written; so does a DoRA adapter with dropout that is not the first live one
        (the fused path draws its sample first, the equation in `live` order)."""
        dora = [n for n in live if n in self.lora_magnitude_vector]
        if len(dora) != 1 or self.dropout_p(dora[0]) == 0:
            return len(dora) <= 1
        return dora[0] == live[0]

    def live_adapters(self) -> list[str]:
        """The adapters this forward adds: active, not merged into the weight, not disabled."""
        return [] if self.disabled else [n for n in self.active_adapters if n not in self.merged_adapters]

    def fused_forward(self, x: torch.Tensor, live: list[str]) -> torch.Tensor:
        """forward's sum computed by fused.py (same loss and gradients, less memory): each update
        keeps x and the dropout sample for backward instead of dropout(x); on a frozen nn.Linear
        or a 4-bit base (_frozen_weight) the base and the first adapter are one function, whose
        backward adds both input gradients in one matrix multiply (a 4-bit weight is dequantized
        once in forward and once in backward, as NF4Linear alone does)."""
        base = self.base_layer
        dora = [n for n in live if n in self.lora_magnitude_vector]
        frozen = self._frozen_weight(x)
        if dora:
            y = self._fused_dora(x, dora[0], frozen)
            live = [n for n in live if n != dora[0]]
        elif live and frozen is not None:
            y = lora_linear(x, frozen, base.bias, *self._fused_args(live[0]))
            live = live[1:]
        else:
            y = base(x)
        for name in live:
            y = lora_update(y, x, *self._fused_args(name))
        return y

    def _frozen_weight(self, x: torch.Tensor) -> torch.Tensor | NF4State | None:
        """The base weight for fused.lora_linear, which computes the base and an adapter in one
        function: a frozen nn.Linear's weight, or a 4-bit layer's state when x and the bias are in
        its compute dtype (else NF4Linear casts them); None for any other base."""
        base = self.base_layer
        if type(base) is nn.Linear and not base.weight.requires_grad:
            return base.weight
        if isinstance(base, NF4Linear) and x.dtype == base.compute_dtype and (
                base.bias is None or base.bias.dtype == x.dtype):
            return base.quant_state
        return None

    def _fused_dora(self, x: torch.Tensor, name: str, frozen: torch.Tensor | NF4State | None) -> torch.Tensor:
        """The base plus DoRA's update, as the fused update rescaled. Without dropout it is
        g ⊙ (W x + scale · B A x) + b, keeping for backward x, A x (r per token) and the (..., out)
        product g multiplies (for m's gradient): one tensor of the output's size, where the modules
        as written keep two (W x and B A x) and build W + ΔW through an identity matrix. With dropout
        (h = dropout(x), drawn as the equation draws it; peft applies W to h too):

            W x + b + (g - 1) ⊙ W h + g ⊙ scale · B A h  =  base(x - h) + g ⊙ (W h + scale · B A h)

        two base products, as the equation, keeping h besides (in the adapter's dtype: on a 16-bit
        base the base multiplies h cast to its dtype, as in the equation). frozen: the base weight
        lora_linear can take (_frozen_weight), or None."""
        base = self.base_layer
        bias = getattr(base, "bias", None)
        a, b, scale, p = self._fused_args(name)
        h = self.lora_dropout[name](x.to(a.dtype)) if p > 0 else x
        hx = h.to(x.dtype)  # what the base multiplies
        if frozen is not None and h.dtype == x.dtype:
            z = lora_linear(h, frozen, None, a, b, scale, 0.0)
        else:
            wh = base(hx)
            z = lora_update(wh if bias is None else wh - bias, h, a, b, scale, 0.0)
        y = rescale(z, self.magnitude_scale(name).to(z.dtype))
        if p > 0:
            return y + base(x - hx)
        return y if bias is None else y + bias

    def _fused_args(self, name: str) -> tuple:
        """(A, B, scale, p) of adapter `name` for fused.py; p = 0 outside training."""
        return self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], self.dropout_p(name)


# --- initialisations ---------------------------------------------------------------------------
# How a new adapter's A and B start (LoraConfig.init), by name: the seam where an initialisation
# that also rewrites the frozen weight (PiSSA, OLoRA, LoftQ) plugs in. Each takes the layer, the
# adapter's name and the config's init_options(); A and B already exist with nn.Linear's own
# initialisation.

def _init_default(layer: LoraLinear, name: str) -> None:
    """A ~ kaiming-uniform (nn.Linear's), B = 0: ΔW = 0 at the start, the adapted model equals the
    base (Hu et al. 2021, section 4.1)."""
    nn.init.kaiming_uniform_(layer.lora_A[name].weight, a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B[name].weight)


def _init_gaussian(layer: LoraLinear, name: str) -> None:
    """A ~ N(0, 1/r²), B = 0 (peft's init_lora_weights="gaussian")."""
    nn.init.normal_(layer.lora_A[name].weight, std=1 / layer.rank[name])
    nn.init.zeros_(layer.lora_B[name].weight)


def _init_random(layer: LoraLinear, name: str) -> None:
    """A and B both kaiming-uniform: ΔW != 0 from the start (peft's init_lora_weights=False; for tests)."""
    nn.init.kaiming_uniform_(layer.lora_A[name].weight, a=math.sqrt(5))
    nn.init.kaiming_uniform_(layer.lora_B[name].weight, a=math.sqrt(5))


def _weight_to_split(layer: LoraLinear, init: str) -> torch.Tensor:
    """The base weight, (out, in) float32, for an initialisation that splits it; refusals first."""
    base = layer.base_layer
    if isinstance(base, NF4Linear):
        raise ValueError(
            f"init={init!r} rewrites the base weight, and this base is 4-bit: the trained model would run "
            "on NF4(W_res), which the adapter saved for the original base cannot reproduce. Initialise on a "
            "16/32-bit base (method lora)" + (", or use init='loftq', which quantizes W itself" if init != "loftq"
                                               else "; LoftQ quantizes the full-precision weight itself: add the "
                                               "adapter to the unquantized model and it stores the base in NF4"))
    if base.weight.is_meta:
        raise ValueError(f"init={init!r} starts from the base weight, which is not loaded yet (meta device): "
                         "add the adapter to a loaded model")
    w = base.weight.detach().float()
    return w.T if layer.fan_in_fan_out else w


def _set_split(layer: LoraLinear, name: str, a: torch.Tensor, b: torch.Tensor, residual: torch.Tensor) -> None:
    """A, B in their dtype, the base weight <- residual (in its layout and dtype), and a CPU copy of
    (A₀, B₀) for the conversion to an adapter of the original base (initial_adapters)."""
    a_param, b_param = layer.lora_A[name].weight, layer.lora_B[name].weight
    weight = layer.base_layer.weight
    with torch.no_grad():
        a_param.copy_(a)
        b_param.copy_(b)
        weight.copy_(residual.T if layer.fan_in_fan_out else residual)
    layer.initial_adapters[name] = (a_param.detach().cpu().clone(), b_param.detach().cpu().clone())


def _init_pissa(layer: LoraLinear, name: str, niter: int | None = None) -> None:
    """PiSSA: B A the top-r singular part of W, the base keeps the rest (initialisation.pissa)."""
    w = _weight_to_split(layer, "pissa")
    _set_split(layer, name, *initialisation.pissa(w, layer.rank[name], layer.scaling[name], niter))


def _init_olora(layer: LoraLinear, name: str) -> None:
    """OLoRA: B A from W's QR decomposition, the base keeps the rest (initialisation.olora)."""
    w = _weight_to_split(layer, "olora")
    _set_split(layer, name, *initialisation.olora(w, layer.rank[name], layer.scaling[name]))


def _init_loftq(layer: LoraLinear, name: str, iters: int = 1) -> None:
    """LoftQ: the base becomes 4-bit NF4 (blocksize 64, double quantization: QLoRA's) holding Q,
    and A, B are such that Q + scale · B A approximates W (initialisation.loftq). The adapter
    belongs to that 4-bit base: there is no low-rank adapter for the original W to convert to."""
    w = _weight_to_split(layer, "loftq")
    a, b, state = initialisation.loftq(w, layer.rank[name], layer.scaling[name], iters)
    base = layer.base_layer
    quantized = NF4Linear.from_linear(base, compute_dtype=base.weight.dtype).requires_grad_(False)
    quantized.set_quant_state(state)
    layer.base_layer = quantized
    layer.fan_in_fan_out = False  # the 4-bit weight is (out, in), also for a Conv1D's
    with torch.no_grad():
        layer.lora_A[name].weight.copy_(a)
        layer.lora_B[name].weight.copy_(b)


LINEAR_INITS = {"default": _init_default, "gaussian": _init_gaussian, "random": _init_random,
                "pissa": _init_pissa, "olora": _init_olora, "loftq": _init_loftq}


class LoraEmbedding(LoraLayer):
    """LoRA on an embedding table E: (num_embeddings, dim). A: (r, num_embeddings), B: (dim, r);
    the lookup of token t adds scale · B A[:, t]. As in PEFT, A starts at zero and B ~ N(0, 1)
    (also for the inits that split a linear weight, as PEFT does).

    DoRA: one magnitude per embedding dimension, the norm taken over the vocabulary (PEFT's):
    the lookup is g ⊙ (E[t] + scale · B A[:, t]), g = m / ||E + ΔE|| (dim,)."""

    norm_dim = 0  # E + ΔE: (num_embeddings, dim), a norm per dimension

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: str,
                    dtype: torch.dtype, device: torch.device, dora: bool = False,
                    init_options: dict | None = None) -> None:
        num, dim = self.base_layer.weight.shape
        a = torch.zeros(r, num, dtype=dtype, device=device)
        b = torch.randn(dim, r, dtype=dtype, device=device)
        if init == "random":
            nn.init.normal_(a)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        self.scaling[name], self.rank[name] = scaling, r
        if dora:
            self.add_magnitude(name, dtype, device)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔE = scale · (B A)ᵀ: (num_embeddings, dim), float32."""
        b, a = self.lora_embedding_B[name].float(), self.lora_embedding_A[name].float()
        return self.scaling[name] * (b @ a).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """E[x] + Σ_active scale · (B A)ᵀ[x]; DoRA: + (g - 1) ⊙ E[x] + g ⊙ scale · (B A)ᵀ[x]."""
        y0 = y = self.base_layer(x)
        if self.disabled:
            return y
        base = self.base_layer
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            # Look up columns of A for the tokens: (..., r), then project to the model width.
            h = F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type,
                            base.scale_grad_by_freq, base.sparse)
            update = self.scaling[name] * (h @ b.T)
            if name in self.lora_magnitude_vector:
                g = self.magnitude_scale(name)
                update = (g - 1) * y0.to(update.dtype) + g * update
            y = y + update.to(y.dtype)
        return y


class ModulesToSave(nn.Module):
    """A module trained in full: a trainable copy per adapter; the original stays frozen."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        module = copy.deepcopy(self.original_module)
        module.requires_grad_(True)
        self.modules_to_save[name] = module

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def active_module(self) -> nn.Module:
        live = [n for n in self.active_adapters if n in self.modules_to_save]
        if self.disabled or not live:
            return self.original_module
        return self.modules_to_save[live[-1]]

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)


class LoraParameter(nn.Module):
    """LoRA on a parameter: a parametrization (torch.nn.utils.parametrize) of a module's weight
    W -> W + Σ_active ΔW, so the module keeps its class and forward (peft's target_parameters).

    Made for transformers 5's mixture-of-experts weights, one 3-D parameter per layer, e.g.
    Mixtral's `experts.gate_up_proj` (E, out, in), or (E, in, out) when the module says
    `is_transposed` (gpt-oss). Each expert e gets its own rank-r update, as peft defines it:

        A: (r·E, in)    expert e's A_e = A[e·r:(e+1)·r]        (rows grouped by expert)
        B: (out, r·E)   expert e's B_e = B[:, e::E]            (columns interleaved by expert)
        ΔW[e] = scale · B_e A_e  (out, in)   (transposed for an (E, in, out) weight)

    A 2-D weight (out, in) is the case E = 1. After a 4-bit weight's nf4.NF4Weight in the same
    chain, the module computes with dequantize(W_nf4) + ΔW (QLoRA). Adapters merged into W
    (merge) are skipped here. Attribute names (lora_A.<name>, lora_B.<name>, nn.Linear's weight)
    are peft's; adapter_io writes them under peft's keys, nested by `position`: the parameter's
    place among the module's adapted parameters, in the order the module's class registers them.
    """

    def __init__(self, shape: torch.Size, transposed: bool, position: int = 0):
        super().__init__()
        self.position = position
        if len(shape) not in (2, 3):
            raise ValueError(f"LoRA on a parameter of shape {list(shape)}: only 2-D (out, in) and 3-D "
                             "(experts, out, in) parameters can be adapted")
        self.shape, self.transposed = torch.Size(shape), transposed and len(shape) == 3
        self.num_experts = shape[0] if len(shape) == 3 else 1
        out_in = tuple(shape[-2:]) if len(shape) == 2 else tuple(shape[1:])
        self.out_features, self.in_features = out_in[::-1] if self.transposed else out_in
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.rank: dict[str, int] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    def adapter_names(self) -> list[str]:
        return list(self.rank)

    def add_adapter(self, name: str, r: int, scaling: float, init: str, dtype: torch.dtype,
                    device: torch.device) -> None:
        """A (r·E, in), B (out, r·E), started by LINEAR_INITS[init] as a linear layer's (on the
        stacked A and B, as peft does); inits that rewrite the base weight are refused by config."""
        experts = self.num_experts
        self.lora_A[name] = nn.Linear(self.in_features, r * experts, bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Linear(r * experts, self.out_features, bias=False, dtype=dtype, device=device)
        self.scaling[name], self.rank[name] = scaling, r
        LINEAR_INITS[init](self, name)

    def delete_adapter(self, name: str) -> None:
        for store in (self.lora_A, self.lora_B):
            del store[name]
        for store in (self.scaling, self.rank):
            store.pop(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter `name` in the parameter's layout, in the adapter's dtype."""
        experts, r = self.num_experts, self.rank[name]
        a = self.lora_A[name].weight.reshape(experts, r, self.in_features)               # (E, r, in)
        b = self.lora_B[name].weight.reshape(self.out_features, r, experts).permute(2, 0, 1)  # (E, out, r)
        delta = self.scaling[name] * torch.bmm(b, a)                                    # (E, out, in)
        if self.transposed:
            delta = delta.transpose(1, 2)                                               # (E, in, out)
        return delta.reshape(self.shape)

    def live_adapters(self) -> list[str]:
        """The adapters the forward adds: active, not merged into the weight, not disabled."""
        return [] if self.disabled else [n for n in self.active_adapters if n not in self.merged_adapters]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """W + Σ_live ΔW, in W's dtype."""
        for name in self.live_adapters():
            weight = weight + self.delta_weight(name).to(weight.dtype)
        return weight

    def extra_repr(self) -> str:
        layout = "(experts, in, out)" if self.transposed else "(experts, out, in)" if len(self.shape) == 3 else "(out, in)"
        return f"shape={list(self.shape)} {layout}, adapters={self.adapter_names()}"
