"""LoRA layers: a frozen base layer plus named low-rank adapters.

    y = base(x) + Σ_active (alpha / r) · B(A(dropout(x)))          (Hu et al. 2021, eq. 3)

Attribute names (`base_layer`, `lora_A.<name>`, `lora_B.<name>`, `lora_embedding_A.<name>`, ...)
are PEFT's, so a state dict maps 1:1 to PEFT's file format (see adapter_io).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .dropout import Dropout
from .fused import lora_linear, lora_update


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
                merged += self.delta_weight(name)
            weight.copy_(merged.to(weight.dtype))
        self.merged_adapters += names

    def unmerge(self) -> None:
        """W <- W - ΔW for every merged adapter; a weight untied by merge is tied back."""
        if not self.merged_adapters:
            return
        if self._tied_weight is not None:
            self.base_layer.weight = self._tied_weight
            self._tied_weight = None
        else:
            weight = self.base_layer.weight
            with torch.no_grad():
                restored = weight.float()
                for name in self.merged_adapters:
                    restored -= self.delta_weight(name)
                weight.copy_(restored.to(weight.dtype))
        self.merged_adapters = []

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into {type(self.base_layer).__name__}; unmerge first")
        for attr in ("lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B"):
            store = getattr(self, attr, None)
            if store is not None and name in store:
                del store[name]
        self.scaling.pop(name, None)
        self.rank.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}, scale={self.scaling[n]:g}" for n, r in self.rank.items())
        return f"adapters=({ranks}), active={self.active_adapters}, merged={self.merged_adapters}"


class LoraLinear(LoraLayer):
    """LoRA on a linear map: nn.Linear, transformers' Conv1D (weight stored (in, out)), or a
    frozen 4-bit linear. A: (r, in_features), B: (out_features, r).

    fused: compute the adapters' update with fused.lora_update (the default; same loss and
    gradients, less memory) or, if False, with the modules as written (the reference in tests).
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

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: str,
                    dtype: torch.dtype, device: torch.device) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, dtype=dtype, device=device)
        self.lora_dropout[name] = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name], self.rank[name] = scaling, r
        LINEAR_INITS[init](self, name)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = scale · B A, float32, in the base weight's layout ((out, in), or (in, out) for Conv1D)."""
        delta = self.scaling[name] * (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float())
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = base(x) + Σ_active scale · B(A(dropout(x)))."""
        live = self.live_adapters()
        # Under torch.autocast each matrix multiply's dtype is autocast's choice, which the fused
        # functions (computing in the adapters' dtype) do not make: there, the modules as written.
        if self.fused and not torch.is_autocast_enabled(x.device.type):
            return self.fused_forward(x, live)
        y = self.base_layer(x)
        for name in live:
            y = y + self.update(name, x).to(y.dtype)
        return y

    def update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """scale · B(A(dropout(x))) of one adapter, computed in the adapter's dtype (float32
        adapters on a bfloat16 base compute in float32; the caller adds in the base's)."""
        a, b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        return self.scaling[name] * b(a(dropout(x.to(a.weight.dtype))))

    def live_adapters(self) -> list[str]:
        """The adapters this forward adds: active, not merged into the weight, not disabled."""
        return [] if self.disabled else [n for n in self.active_adapters if n not in self.merged_adapters]

    def fused_forward(self, x: torch.Tensor, live: list[str]) -> torch.Tensor:
        """forward's sum computed by fused.py (same loss and gradients, less memory): each update
        keeps x and the dropout sample for backward instead of dropout(x); on a frozen nn.Linear
        the base and the first adapter are one function, whose backward adds both input
        gradients in one matrix multiply."""
        base = self.base_layer
        if live and type(base) is nn.Linear and not base.weight.requires_grad:
            y = lora_linear(x, base.weight, base.bias, *self._fused_args(live[0]))
            live = live[1:]
        else:
            y = base(x)
        for name in live:
            y = lora_update(y, x, *self._fused_args(name))
        return y

    def _fused_args(self, name: str) -> tuple:
        """(A, B, scale, p) of adapter `name` for fused.py; p = 0 outside training."""
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, (Dropout, nn.Dropout)) and dropout.training else 0.0
        return self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p


# --- initialisations ---------------------------------------------------------------------------
# How a new adapter's A and B start (LoraConfig.init), by name: the seam where an initialisation
# that also rewrites the frozen weight (PiSSA, OLoRA, LoftQ) plugs in. Each takes the layer and the
# adapter's name; A and B already exist with nn.Linear's own initialisation.

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


LINEAR_INITS = {"default": _init_default, "gaussian": _init_gaussian, "random": _init_random}


class LoraEmbedding(LoraLayer):
    """LoRA on an embedding table E: (num_embeddings, dim). A: (r, num_embeddings), B: (dim, r);
    the lookup of token t adds scale · B A[:, t]. As in PEFT, A starts at zero and B ~ N(0, 1)."""

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: str,
                    dtype: torch.dtype, device: torch.device) -> None:
        num, dim = self.base_layer.weight.shape
        a = torch.zeros(r, num, dtype=dtype, device=device)
        b = torch.randn(dim, r, dtype=dtype, device=device)
        if init == "random":
            nn.init.normal_(a)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        self.scaling[name], self.rank[name] = scaling, r

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔE = scale · (B A)ᵀ: (num_embeddings, dim), float32."""
        b, a = self.lora_embedding_B[name].float(), self.lora_embedding_A[name].float()
        return self.scaling[name] * (b @ a).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
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
            y = y + (self.scaling[name] * (h @ b.T)).to(y.dtype)
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
