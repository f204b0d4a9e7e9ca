"""4-bit NormalFloat (NF4) weights, bit-exact with bitsandbytes' format.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314)
freezes the base model in NF4: each block of 64 consecutive weights is scaled by its absolute
maximum and every scaled value is replaced by the nearest of 16 quantiles of N(0, 1):

    c_i   = argmin_k |w_i / absmax_b - NF4[k]|        (4-bit code, two per byte)
    w'_i  = NF4[c_i] * absmax_b                        (dequantized, in float32)

"Double quantization" (DQ) then stores the float32 absmax of each 64-block as an 8-bit code of
(absmax - mean(absmax)) in blocks of 256, with bitsandbytes' signed dynamic 8-bit map:

    absmax_b = DYNAMIC[q_b] * nested_absmax_{b // 256} + offset

which costs 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter instead of 4 + 32/64 = 4.5.

Everything here is pure PyTorch (CPU or GPU) and reproduces bitsandbytes 0.50 on CPU byte for
byte: packed codes, absmax codes, constants and the safetensors layout transformers writes for a
``Linear4bit``. bitsandbytes itself is only a test-time reference; this module never imports it.

Where bitsandbytes has a quirk, we reproduce it and say so at the place we do:
- full 64-blocks are scaled by ``x * (1 / absmax)``, a partial last block by ``x / absmax``;
- a partial last block stores ``max(absmax, 1e-38)``, a full block its raw absmax (0 if all-zero);
- the 8-bit DQ codes follow bnb's CPU kernel, which rounds through a 65536-entry lookup table,
  not exact nearest rounding (they differ for ~6% of absmax values near the block's zero);
  bnb's CUDA kernel rounds to the nearest code, so a checkpoint quantized by bnb on a GPU can
  hold different absmax *codes*. Decoding is the same formula everywhere, so loading any bnb
  checkpoint and dequantizing it here is exact either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .dtypes import DTYPES, name_of

__all__ = [
    "FP4_CODE",
    "NF4_CODE",
    "NF4Linear",
    "NF4State",
    "NF4Weight",
    "SUPPORTED_BLOCKSIZES",
    "create_dynamic_map",
    "dequantize",
    "dequantize_absmax",
    "from_bnb_tensors",
    "nf4_weights",
    "quantize_nf4",
    "quantize_parameter_",
    "storage_bits_per_parameter",
    "to_bnb_tensors",
]

# ----------------------------------------------------------------------------------------------
# Code tables
# ----------------------------------------------------------------------------------------------

# The 16 NF4 values, index = 4-bit code. Quantiles of N(0, 1) with an exact zero, normalised to
# [-1, 1] (QLoRA, Appendix E); the float32 values bitsandbytes ships, sorted ascending.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2), QLoRA's comparison point. Index = bit
# pattern: bit 3 is the sign, bits 0-2 encode {0, 1/16, 8, 12, 4, 6, 2, 3}; divided by the max
# (12) in float32, exactly as bitsandbytes builds its table. Not sorted. Code 8 ("-0") is +0.0 in
# bnb's table (its list holds the integer -0, which is 0), so we store +0.0 too: bit-equal quant_map.
FP4_CODE = torch.tensor(
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=torch.float32,
) / 12.0

_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
QUANT_TYPES = tuple(_CODES)

# The layers an NF4Linear stands for, exactly these types (not subclasses): nn.Linear and
# transformers' Conv1D (GPT-2's linear layer, its weight stored (in, out)).
FULL_PRECISION_LINEARS = (nn.Linear, Conv1D)
# transformers' subclasses of nn.Linear whose forward is nn.Linear's, x @ W.T + b (qualified names).
PLAIN_LINEAR_SUBCLASSES = ("transformers.models.falcon.modeling_falcon.FalconLinear",)


def is_full_precision_linear(module: nn.Module) -> bool:
    """Whether an NF4Linear computes what `module` does: an nn.Linear, a transformers Conv1D, or
    one of PLAIN_LINEAR_SUBCLASSES (Falcon's); other subclasses (routers, grouped linears) may
    compute something else and are left as they are."""
    kind = type(module)
    return kind in FULL_PRECISION_LINEARS or f"{kind.__module__}.{kind.__qualname__}" in PLAIN_LINEAR_SUBCLASSES


# Blocksizes bitsandbytes' quantize_4bit / dequantize_4bit accept.
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCKSIZE = 256  # DQ blocksize, fixed by bitsandbytes' quantize_4bit


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' "dynamic" 8-bit map: 2**total_bits float32 values in [-1, 1], sorted.

    Dynamic tree quantization (Dettmers 2016, "8-Bit Approximations for Parallelism in Deep
    Learning", arXiv:1511.04561): the decade 10**(e - max_exponent_bits + 1), e = 0 .. E-1,
    is split linearly between 0.1 and 1 into 2**(e + bits - E) (signed) intervals whose midpoints
    are the code values, so small magnitudes get finer steps. Plus 0 and 1; zero-padded to 256.

    The float32 arithmetic (linspace in float32, midpoints, then one float32 multiply by the
    decade) is what makes the 256 values bit-identical to bitsandbytes'.
    """
    value_bits = total_bits - 1  # the sign bit is always spent, even for unsigned maps
    values: list[float] = []
    for e in range(max_exponent_bits):
        intervals = 2 ** (e + value_bits - max_exponent_bits + (0 if signed else 1))
        edges = torch.linspace(0.1, 1, intervals + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (e - max_exponent_bits + 1)
        values += (decade * mids).tolist()
        if signed:
            values += (-decade * mids).tolist()
    # Codes where all exponent bits are zero, when there are more value bits than exponent bits:
    # they reuse the last (largest) decade.
    extra = 2 ** (value_bits - max_exponent_bits) - 1
    if extra > 0:
        edges = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (max_exponent_bits - 1 - max_exponent_bits + 1)
        values += (decade * mids).tolist()
        if signed:
            values += (-decade * mids).tolist()
    values += [0.0, 1.0]
    if len(values) > 2**total_bits:
        raise ValueError(
            f"create_dynamic_map(signed={signed}, max_exponent_bits={max_exponent_bits}, "
            f"total_bits={total_bits}) yields {len(values)} values, more than 2**total_bits; "
            "max_exponent_bits must be at most total_bits - 1"
        )
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = create_dynamic_map()


def _dynamic_lut() -> torch.Tensor:
    """The 65536-entry table bnb's CPU kernel rounds DQ values with (int64 codes, CPU).

    Entry j holds the code nearest to g_j = (j / 65535) * 2 - 1 (the lower one on a tie); a value
    v in [-1, 1] is looked up at j = trunc(((v + 1) * 0.5) * 65535 + 0.5), all float32.
    """
    grid = torch.arange(65536, dtype=torch.float32) / 65535 * 2 - 1  # (65536,)
    # The map is sorted, so the nearest code is one of the two around g.
    right = torch.searchsorted(DYNAMIC_CODE, grid).clamp(1, 255)  # first code >= g
    left = right - 1
    closer_right = (grid - DYNAMIC_CODE[right]).abs() < (grid - DYNAMIC_CODE[left]).abs()
    return torch.where(closer_right, right, left)


_DYNAMIC_LUT: dict[torch.device, torch.Tensor] = {}


def _dynamic_lut_on(device: torch.device) -> torch.Tensor:
    if device not in _DYNAMIC_LUT:
        cpu = _DYNAMIC_LUT.get(torch.device("cpu"))
        if cpu is None:
            cpu = _DYNAMIC_LUT[torch.device("cpu")] = _dynamic_lut()
        _DYNAMIC_LUT[device] = cpu.to(device)
    return _DYNAMIC_LUT[device]


def _sorted_code(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between consecutive sorted code values (15,) and the sort order (16,).

    A scaled value goes to the bucket bucketize() finds among the midpoints: nearest value,
    an exact tie to the lower one.
    FP4 holds 0 twice (codes 0 and 8); the stable sort puts code 0 first, so exact zeros get
    code 0 and tiny positives code 8, as in bitsandbytes.
    """
    code = _CODES[quant_type]
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    return (sorted_code[:-1] + sorted_code[1:]) / 2, order


_BOUNDS = {quant_type: _sorted_code(quant_type) for quant_type in QUANT_TYPES}


# ----------------------------------------------------------------------------------------------
# Quantization state
# ----------------------------------------------------------------------------------------------


_TENSOR_FIELDS = ("packed", "absmax", "code", "nested_absmax", "nested_code", "offset")


@dataclass(frozen=True)
class NF4State:
    """A quantized weight: everything needed to rebuild it, in bitsandbytes' layout.

    packed:         uint8 ((n + 1) // 2, 1), code of element 2i in the high nibble of byte i
    absmax:         uint8 (n_blocks,) 8-bit codes with DQ, float32 (n_blocks,) without
    code:           float32 (16,) the 4-bit code table (NF4 or FP4)
    shape, dtype:   shape and dtype of the original weight
    nested_absmax:  float32 (ceil(n_blocks / 256),) DQ scales, or None
    nested_code:    float32 (256,) the dynamic 8-bit map, or None
    offset:         float32 () mean of the block absmaxes, or None
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> list[torch.Tensor]:
        """The state's tensors (no Nones), e.g. to count bytes or to save for backward."""
        fields = (self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code, self.offset)
        return [t for t in fields if t is not None]

    def without_tensors(self) -> NF4State:
        """The layout alone (shape, dtypes, blocksize, ...), every tensor field None: what an
        autograd Function keeps on its ctx while the tensors go through save_for_backward."""
        return replace(self, **dict.fromkeys(_TENSOR_FIELDS))

    def with_tensors(self, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> NF4State:
        """The inverse of (without_tensors, tensors): this layout holding the tensors of tensors()."""
        packed, absmax, code, *nested = tensors
        state = replace(self, packed=packed, absmax=absmax, code=code)
        if nested:
            nested_absmax, nested_code, offset = nested
            state = replace(state, nested_absmax=nested_absmax, nested_code=nested_code, offset=offset)
        return state

    def to(self, device: torch.device | str) -> NF4State:
        """The same state on another device; dtypes never change."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            packed=self.packed.to(device),
            absmax=self.absmax.to(device),
            code=self.code.to(device),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
            offset=move(self.offset),
        )


def _check_quant_type(quant_type: object) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not supported; valid choices: {', '.join(QUANT_TYPES)}")


def _check_blocksize(blocksize: object) -> None:
    if isinstance(blocksize, bool) or blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(
            f"blocksize={blocksize!r} is not supported: bitsandbytes' 4-bit kernels take a power of "
            f"two from 32 to 4096; valid choices: {', '.join(map(str, SUPPORTED_BLOCKSIZES))}"
        )


def _check_float_dtype(dtype: object, what: str) -> None:
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(f"torch.{name_of(d)}" for d in SUPPORTED_DTYPES)
        raise ValueError(f"{what} is {dtype}; it must be a 16/32-bit float dtype, one of: {names}")


# ----------------------------------------------------------------------------------------------
# Quantize / dequantize
# ----------------------------------------------------------------------------------------------


def _blockwise_absmax(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax (n_blocks,) and x scaled into [-1, 1] (n,), bnb's float32 arithmetic."""
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].view(-1, blocksize)  # (n_full_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # stored as is: 0 for an all-zero block
    # Multiply by the reciprocal (not divide): the exact rounding bnb uses for full blocks.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        # bnb's partial last block: absmax stored *after* the 1e-38 guard, and a true division.
        tail_absmax = x[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, (x[full:] / tail_absmax).clamp(-1, 1)])
    return absmax, scaled


def _quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of the float32 block absmaxes (QLoRA, section 3).

    offset = mean(absmax);  c = absmax - offset, in blocks of 256 with scale s = max|c|;
    q = LUT[trunc(((c * (1 / s) + 1) * 0.5) * 65535 + 0.5)]  (bnb's CPU rounding, see _dynamic_lut)
    Returns codes uint8 (n_blocks,), nested_absmax float32 (ceil(n_blocks / 256),), offset ().
    """
    offset = absmax.mean()
    if not torch.isfinite(offset):
        raise ValueError(
            "double quantization: the mean of the block absmaxes overflows float32 (weights near "
            "float32's max); quantize with double_quant=False"
        )
    centered = absmax - offset  # (m,)
    m = centered.numel()
    pad = -m % NESTED_BLOCKSIZE
    # Zero padding changes neither a block's max |c| nor the codes of the real entries.
    blocks = F.pad(centered, (0, pad)).view(-1, NESTED_BLOCKSIZE)  # (ceil(m / 256), 256)
    nested_absmax = blocks.abs().amax(dim=1)
    v = (blocks * (1.0 / nested_absmax)[:, None]).clamp(-1, 1)
    # An all-zero 256-block (every absmax equal to the mean) has scale 0 and v = NaN; bnb's CPU
    # kernel writes code 0 there. Its decoded value is code * 0 + offset = offset either way.
    zero_block = nested_absmax == 0
    v = torch.where(zero_block[:, None], -1.0, v)  # LUT index 0 -> code 0
    index = (((v + 1) * 0.5) * 65535 + 0.5).to(torch.int64)  # trunc == floor, v + 1 >= 0
    codes = _dynamic_lut_on(absmax.device)[index].reshape(-1)[:m].to(torch.uint8)
    return codes, nested_absmax, offset


def quantize_nf4(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4"
) -> NF4State:
    """Quantize a weight to 4 bits, blockwise (QLoRA, Dettmers et al. 2023, eq. 4-6).

    The weight is flattened row-major in float32 and cut into blocks of ``blocksize``;
    each value becomes the code of the nearest entry of NF4 (or FP4) after scaling by its block's
    absmax: c_i = argmin_k |w_i / absmax_b - code[k]|, an exact tie going to the lower value.
    With ``double_quant`` the absmaxes are themselves 8-bit quantized (see ``_quantize_absmax``).

    Byte-identical to ``bitsandbytes.functional.quantize_4bit(w, blocksize, compress_statistics=
    double_quant, quant_type=quant_type)`` on CPU, for float32, float16 and bfloat16 inputs.
    """
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant={double_quant!r} must be True or False")
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"quantize_nf4 expects a torch.Tensor, got {type(w).__name__}")
    _check_float_dtype(w.dtype, "the weight's dtype")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")

    x = w.detach().reshape(-1).float()  # (n,) row-major
    absmax, scaled = _blockwise_absmax(x, blocksize)
    if not torch.isfinite(absmax).all():  # amax propagates NaN and inf: one check per block
        raise ValueError("cannot quantize a weight holding NaN or inf: its block's absmax would poison the block")
    if scaled.numel() % 2:
        scaled = F.pad(scaled, (0, 1))  # the odd last nibble encodes 0
    bounds, order = (t.to(x.device) for t in _BOUNDS[quant_type])
    ranks = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)  # (n or n + 1,) sorted index
    packed = ((ranks[0::2] << 4) | ranks[1::2])[:, None]  # ((n + 1) // 2, 1)
    if quant_type != "nf4":
        # FP4's table is not sorted: map each byte's two sorted ranks to codes, one gather per byte.
        byte_codes = (order.repeat_interleave(16) << 4) | order.repeat(16)  # (256,)
        packed = byte_codes.to(torch.uint8)[packed.long()]

    code = _CODES[quant_type].to(x.device)
    if not double_quant:
        return NF4State(packed, absmax, code, w.shape, w.dtype, blocksize, quant_type)
    qabsmax, nested_absmax, offset = _quantize_absmax(absmax)
    return NF4State(
        packed,
        qabsmax,
        code,
        w.shape,
        w.dtype,
        blocksize,
        quant_type,
        nested_absmax=nested_absmax,
        nested_code=DYNAMIC_CODE.to(x.device),
        offset=offset,
    )


def dequantize_absmax(state: NF4State) -> torch.Tensor:
    """The float32 block absmaxes (n_blocks,): absmax = code[q] * nested_absmax[b // 256] + offset."""
    if not state.double_quant:
        return state.absmax
    m, nested = state.absmax.numel(), state.nested_blocksize
    codes = torch.index_select(state.nested_code, 0, state.absmax.int())  # (m,); int32 index: see dequantize
    if m % nested:
        codes = F.pad(codes, (0, -m % nested))  # whole 256-blocks, the padding dropped below
    # Two separately rounded float32 ops (no fused multiply-add), like bnb.
    scaled = codes.view(-1, nested).mul_(state.nested_absmax[:, None])  # (ceil(m / 256), 256)
    return scaled.add_(state.offset).view(-1)[:m]


# Byte b holds two 4-bit codes, b >> 4 first: row b of this (256, 2) index table is (b >> 4, b & 15).
_BYTE_NIBBLES = torch.stack([torch.arange(16).repeat_interleave(16), torch.arange(16).repeat(16)], dim=1)
_BYTE_NIBBLES_ON: dict[torch.device, torch.Tensor] = {}


def _byte_table(code: torch.Tensor) -> torch.Tensor:
    """(256,) int64: entry b holds the float32 pair (code[b >> 4], code[b & 15]), its bytes in memory
    order, so that looking up a packed byte writes both of its values with one 8-byte copy."""
    if code.device not in _BYTE_NIBBLES_ON:
        _BYTE_NIBBLES_ON[code.device] = _BYTE_NIBBLES.reshape(-1).to(code.device, torch.int32)
    pairs = torch.index_select(code, 0, _BYTE_NIBBLES_ON[code.device])  # (512,) float32: 256 rows of 2
    return pairs.view(torch.int64)


def _code_values(state: NF4State) -> torch.Tensor:
    """The code value of every packed nibble, float32 (2 * bytes,): n values, and a pad nibble when
    n is odd. One lookup per byte in a 2 KiB table. index_select, 1-D: PyTorch's tight copy loop (a
    2-D table takes its row-copy path, a memcpy call per row), with int32 indices (~70x faster
    than int64 advanced indexing). A 1 MiB table of every byte pair (four values a lookup) was
    1.1x faster with the table in cache, but in a training step the layers' products evict it
    between two dequantizations, and cold it took 1.6x as long as this one (bench/README.md,
    session 12)."""
    return torch.index_select(_byte_table(state.code), 0, state.packed.view(-1).int()).view(torch.float32)


def dequantize(state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild the weight: w'_i = code[c_i] * absmax[i // blocksize], in float32, cast to ``dtype``.

    ``dtype`` defaults to the original weight's. Equal to bnb's ``dequantize_4bit``.

    Two passes over the weight: a table lookup that writes both code values of each packed byte
    (_code_values), then one blockwise multiply by the absmaxes, in place for a float32 result and
    otherwise into the result in ``dtype`` (computed in float32 and rounded once, as a float32
    product cast afterwards would be). In place matters on the CPU: a second weight-sized buffer
    alive beside the first makes glibc return the pair to the kernel when both are freed, and the
    next call pays a page fault per 4 KiB again (1,900 faults, 3.4 ms of a 3.6 ms call for a
    1536 x 576 weight; 0.8 ms in place).
    """
    dtype = state.dtype if dtype is None else dtype
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dequantize: dtype={dtype!r} must be a floating-point torch.dtype")
    n, blocksize = state.numel, state.blocksize
    values = _code_values(state)
    absmax = dequantize_absmax(state)  # (n_blocks,)
    padded = absmax.numel() * blocksize  # a partial last block is padded to a whole one
    values = F.pad(values, (0, padded - values.numel())) if padded > values.numel() else values[:padded]
    if dtype == torch.float32:
        w = values.view(-1, blocksize).mul_(absmax[:, None]).view(-1)  # (n_blocks, blocksize), flattened
    else:
        w = torch.empty(padded, dtype=dtype, device=values.device)
        torch.mul(values.view(-1, blocksize), absmax[:, None], out=w.view(-1, blocksize))
    return (w if padded == n else w[:n]).view(state.shape)


def storage_bits_per_parameter(obj: NF4State | NF4Linear) -> float:
    """Measured storage of a quantized weight, in bits per weight element.

    Counts every tensor of the state (packed codes, absmaxes, DQ scales and offset, and the
    code tables, which are per layer in the checkpoint). For a large layer this tends to
    4 + 8/64 + 32/(64*256) = 4.127 with DQ and 4 + 32/64 = 4.5 without (QLoRA, section 3).
    """
    state = obj.quant_state if isinstance(obj, NF4Linear) else obj
    if not isinstance(state, NF4State):
        raise ValueError(f"storage_bits_per_parameter expects an NF4State or NF4Linear, got {type(obj).__name__}")
    nbytes = sum(t.numel() * t.element_size() for t in state.tensors())
    return 8 * nbytes / state.numel


# ----------------------------------------------------------------------------------------------
# transformers + bitsandbytes safetensors layout
# ----------------------------------------------------------------------------------------------


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _blob_key(prefix: str, quant_type: str) -> str:
    return _key(prefix, f"weight.quant_state.bitsandbytes__{quant_type}")


def to_bnb_tensors(state: NF4State, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes' ``Linear4bit`` state_dict holds for module path ``prefix``.

    ``P.weight`` (packed uint8), ``P.weight.absmax``, ``P.weight.quant_map`` and, with DQ,
    ``P.weight.nested_absmax`` and ``P.weight.nested_quant_map``; plus
    ``P.weight.quant_state.bitsandbytes__nf4``: a uint8 tensor of the UTF-8 JSON
    ``{"quant_type", "blocksize", "dtype", "shape", ["nested_blocksize", "nested_dtype",
    "nested_offset"]}`` in that order, written with ``json.dumps`` defaults, as bnb's
    ``QuantState.as_dict(packed=True)`` does. Tensors are cloned: safe to save with safetensors.
    """
    meta: dict[str, object] = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": name_of(state.dtype),
        "shape": list(state.shape),
    }
    tensors = {
        _key(prefix, "weight"): state.packed.clone(),
        _key(prefix, "weight.absmax"): state.absmax.clone(),
        _key(prefix, "weight.quant_map"): state.code.clone(),
    }
    if state.double_quant:
        meta["nested_blocksize"] = state.nested_blocksize
        meta["nested_dtype"] = "float32"
        meta["nested_offset"] = state.offset.item()  # float32 -> Python float: exact, and repr round-trips
        tensors[_key(prefix, "weight.nested_absmax")] = state.nested_absmax.clone()
        tensors[_key(prefix, "weight.nested_quant_map")] = state.nested_code.clone()
    blob = json.dumps(meta).encode("utf-8")
    tensors[_blob_key(prefix, state.quant_type)] = torch.tensor(list(blob), dtype=torch.uint8)
    return tensors


def from_bnb_tensors(
    tensors: Mapping[str, torch.Tensor], prefix: str, device: torch.device | str | None = None
) -> NF4State:
    """Read the quantized weight of module path ``prefix`` from a bnb/transformers state dict.

    The inverse of ``to_bnb_tensors``; other keys in ``tensors`` are ignored. ``device`` defaults
    to the packed weight's device.
    """
    blob_keys = [k for k in (_blob_key(prefix, t) for t in QUANT_TYPES) if k in tensors]
    if len(blob_keys) != 1:
        found = sorted(k for k in tensors if k.startswith(_key(prefix, "weight")))
        raise ValueError(
            f"expected exactly one of {[_blob_key(prefix, t) for t in QUANT_TYPES]} for module "
            f"'{prefix}', found {blob_keys or 'none'}; keys under it: {found}"
        )
    meta = json.loads(bytes(tensors[blob_keys[0]].cpu().tolist()).decode("utf-8"))
    quant_type, blocksize = meta.get("quant_type"), meta.get("blocksize")
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    if meta.get("dtype") not in DTYPES:  # torch's names, as bitsandbytes writes them ("bfloat16")
        raise ValueError(f"'{blob_keys[0]}': dtype {meta.get('dtype')!r} is not one of "
                         f"{[name_of(d) for d in SUPPORTED_DTYPES]}")
    double_quant = "nested_offset" in meta or _key(prefix, "weight.nested_absmax") in tensors
    needed = ["weight", "weight.absmax", "weight.quant_map"]
    if double_quant:
        needed += ["weight.nested_absmax", "weight.nested_quant_map"]
        if meta.get("nested_blocksize") != NESTED_BLOCKSIZE or "nested_offset" not in meta:
            raise ValueError(
                f"'{blob_keys[0]}': double quantization needs nested_blocksize={NESTED_BLOCKSIZE} and a "
                f"nested_offset, got {meta}"
            )
    missing = [_key(prefix, k) for k in needed if _key(prefix, k) not in tensors]
    if missing:
        raise ValueError(f"module '{prefix}' is missing 4-bit state tensors: {missing}")

    packed = tensors[_key(prefix, "weight")]
    device = packed.device if device is None else torch.device(device)

    def get(name: str) -> torch.Tensor:
        return tensors[_key(prefix, name)].to(device)

    state = NF4State(
        packed=packed.to(device).view(torch.uint8).reshape(-1, 1),
        absmax=get("weight.absmax"),
        code=get("weight.quant_map"),
        shape=torch.Size(meta["shape"]),
        dtype=DTYPES[meta["dtype"]],
        blocksize=blocksize,
        quant_type=quant_type,
    )
    if double_quant:
        offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=device)
        state = replace(
            state,
            nested_absmax=get("weight.nested_absmax"),
            nested_code=get("weight.nested_quant_map"),
            offset=offset,
        )
    n_blocks = -(-state.numel // blocksize)
    if state.packed.numel() != (state.numel + 1) // 2 or state.absmax.numel() != n_blocks:
        raise ValueError(
            f"module '{prefix}': shape {list(state.shape)} with blocksize {blocksize} needs "
            f"{(state.numel + 1) // 2} packed bytes and {n_blocks} absmax values, got "
            f"{state.packed.numel()} and {state.absmax.numel()}"
        )
    return state


# ----------------------------------------------------------------------------------------------
# The frozen 4-bit linear layer
# ----------------------------------------------------------------------------------------------


class _DequantizeLinear(torch.autograd.Function):
    """y = x @ dequantize(state).T, keeping only the 4-bit state alive for backward.

    The weight is frozen, so backward needs W only to compute dL/dx = dL/dy @ W; it dequantizes
    W again instead of saving the full-precision copy from forward (QLoRA's memory saving: ~0.5
    bytes per parameter kept between forward and backward instead of 2 or 4).
    """

    @staticmethod
    def forward(ctx, x, state: NF4State, *state_tensors):
        # state_tensors are state.tensors(), passed separately so save_for_backward tracks them.
        # Non-tensor fields (shape, dtype, blocksize, ...) ride on ctx; tensors go through
        # save_for_backward, so saved-tensor hooks (offloading, checks) see exactly these.
        ctx.layout = state.without_tensors()
        ctx.save_for_backward(*state_tensors)
        ctx.n_state = len(state_tensors)  # backward's count of None gradients, without unpacking
        w = dequantize(state, x.dtype)  # (out, in), freed when forward returns
        return x @ w.t()  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        no_grads = [None] * ctx.n_state  # the state tensors: frozen
        if not ctx.needs_input_grad[0]:
            return (None, None, *no_grads)
        # ctx.saved_tensors is read exactly once: each read unpacks every saved tensor, and
        # non-reentrant activation checkpointing (torch.utils.checkpoint, use_reentrant=False)
        # recomputes a tensor for its first unpack and refuses a second one (CheckpointError).
        state = ctx.layout.with_tensors(ctx.saved_tensors)
        w = dequantize(state, grad_out.dtype)  # (out, in)
        grad_x = grad_out @ w  # (..., out) @ (out, in) -> (..., in)
        return (grad_x, None, *no_grads)


def _placeholder_state(
    shape: tuple[int, int],
    dtype: torch.dtype,
    blocksize: int,
    double_quant: bool,
    quant_type: str,
    device: torch.device | str | None,
) -> NF4State:
    """A state of the right layout that dequantizes to zeros, without computing anything
    (so it also works on the meta device); load_state_dict or from_linear overwrite it."""
    n = shape[0] * shape[1]
    n_blocks = -(-n // blocksize)
    zero_code = int(torch.argmin(_CODES[quant_type].abs()))  # NF4: 7, FP4: 0
    packed = torch.full(((n + 1) // 2, 1), zero_code * 17, dtype=torch.uint8, device=device)
    code = _CODES[quant_type].to(device)
    if not double_quant:
        absmax = torch.zeros(n_blocks, dtype=torch.float32, device=device)
        return NF4State(packed, absmax, code, torch.Size(shape), dtype, blocksize, quant_type)
    return NF4State(
        packed,
        torch.zeros(n_blocks, dtype=torch.uint8, device=device),
        code,
        torch.Size(shape),
        dtype,
        blocksize,
        quant_type,
        nested_absmax=torch.zeros(-(-n_blocks // NESTED_BLOCKSIZE), dtype=torch.float32, device=device),
        nested_code=DYNAMIC_CODE.to(device),
        offset=torch.zeros((), dtype=torch.float32, device=device),
    )


# Buffers holding the state (all non-persistent: _save_to_state_dict writes bnb's dotted keys).
_STATE_BUFFERS = (
    "weight",
    "weight_absmax",
    "weight_quant_map",
    "weight_nested_absmax",
    "weight_nested_quant_map",
    "weight_nested_offset",
)


class NF4Linear(nn.Module):
    """A linear layer whose frozen weight is stored in 4 bits (QLoRA's base layer).

        y = x @ dequantize(W_nf4).T + b,   computed in ``compute_dtype``, returned in x's dtype

    The quantized state lives in buffers, so ``.to(device)`` moves it, while ``.to(dtype)`` /
    ``.half()`` leave it alone (its dtypes are part of the format; only the bias is cast).
    ``state_dict()`` is bitsandbytes' ``Linear4bit`` layout (``weight``, ``bias``,
    ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
    ``weight.quant_state.bitsandbytes__nf4``), so a transformers+bnb checkpoint loads 1:1 with
    ``load_state_dict``, whatever blocksize / DQ setting it was made with.

    ``fan_in_fan_out``: the layer stands for a transformers ``Conv1D`` (GPT-2), which computes
    x @ W + b with W stored (in, out). The 4-bit state holds Wᵀ, (out, in), exactly what
    transformers + bitsandbytes store for a Conv1D (they make it a ``Linear4bit`` of the transposed
    weight), so the layer computes the same as the Conv1D and its checkpoint is bnb's. The flag
    only says which layout the weight goes back to when it leaves 4 bits (``to_plain``).

    LoRA wraps this module like any nn.Linear; quantization stays a property of the frozen weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        blocksize: int = 64,
        double_quant: bool = True,
        quant_type: str = "nf4",
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        fan_in_fan_out: bool = False,
    ):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"NF4Linear: {name}={value!r} must be a positive int")
        _check_float_dtype(compute_dtype, "compute_dtype")
        _check_float_dtype(weight_dtype, "weight_dtype")
        _check_blocksize(blocksize)
        _check_quant_type(quant_type)
        if not isinstance(double_quant, bool):
            raise ValueError(f"double_quant={double_quant!r} must be True or False")
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.compute_dtype = compute_dtype
        shape = (out_features, in_features)
        self.set_quant_state(_placeholder_state(shape, weight_dtype, blocksize, double_quant, quant_type, device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        compute_dtype: torch.dtype | None = None,
        double_quant: bool = True,
        blocksize: int = 64,
        quant_type: str = "nf4",
    ) -> NF4Linear:
        """Quantize an nn.Linear's (or a transformers Conv1D's) weight on its device; the bias is
        copied unquantized. A Conv1D's (in, out) weight is quantized transposed, as (out, in).

        ``compute_dtype`` defaults to the linear's weight dtype.
        """
        if not isinstance(linear, (nn.Linear, Conv1D)):
            raise ValueError(f"NF4Linear.from_linear expects an nn.Linear or a transformers Conv1D, "
                             f"got {type(linear).__name__}")
        fan_in_fan_out = isinstance(linear, Conv1D)
        weight = linear.weight.detach()
        in_features, out_features = weight.shape if fan_in_fan_out else weight.shape[::-1]
        module = cls(
            in_features,
            out_features,
            bias=linear.bias is not None,
            compute_dtype=weight.dtype if compute_dtype is None else compute_dtype,
            blocksize=blocksize,
            double_quant=double_quant,
            quant_type=quant_type,
            weight_dtype=weight.dtype if weight.dtype in SUPPORTED_DTYPES else torch.float32,
            device="meta",  # the placeholder is replaced right away: allocate nothing
            fan_in_fan_out=fan_in_fan_out,
        )
        module.quantize_weight_(weight, double_quant)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return module

    def quantize_weight_(self, weight: torch.Tensor, double_quant: bool) -> None:
        """Replace the 4-bit weight by ``weight`` quantized, with this layer's blocksize and quant type.

        ``weight`` comes in the source layer's layout: (out, in), or (in, out) when
        ``fan_in_fan_out`` (a Conv1D's, e.g. from a GPT-2 checkpoint), then quantized transposed.
        """
        weight = weight.detach()
        if self.fan_in_fan_out:
            weight = weight.T.contiguous()  # (in, out) -> (out, in): bnb's Linear4bit layout
        self.set_quant_state(quantize_nf4(weight, self.blocksize, double_quant, self.quant_type))

    def to_plain(self, weight: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """The full-precision layer this one stands for: an nn.Linear, or a Conv1D when
        ``fan_in_fan_out``, holding ``weight`` ((out, in); default: the dequantized weight) in
        ``dtype`` (default: compute_dtype) and a copy of the bias; frozen."""
        dtype = self.compute_dtype if dtype is None else dtype
        weight = self.dequantize_weight(torch.float32) if weight is None else weight  # (out, in)
        if self.fan_in_fan_out:
            plain = Conv1D(self.out_features, self.in_features)  # its weight: (in, out)
            plain.to(device=weight.device, dtype=dtype)
            weight = weight.T
            if self.bias is None:
                plain.bias = None
        else:
            plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              dtype=dtype, device=weight.device)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain.requires_grad_(False)

    def set_quant_state(self, state: NF4State) -> None:
        """Replace the quantized weight (buffers may change shape, e.g. with another blocksize)."""
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"NF4Linear(in_features={self.in_features}, out_features={self.out_features}) needs a "
                f"weight of shape [{self.out_features}, {self.in_features}], the 4-bit state holds "
                f"{list(state.shape)}"
            )
        tensors = (state.packed, state.absmax, state.code, state.nested_absmax, state.nested_code, state.offset)
        for name, tensor in zip(_STATE_BUFFERS, tensors):
            self.register_buffer(name, tensor, persistent=False)
        self.weight_dtype, self.blocksize, self.quant_type = state.dtype, state.blocksize, state.quant_type

    @property
    def quant_state(self) -> NF4State:
        """The buffers seen as an NF4State (no copies)."""
        return NF4State(
            packed=self.weight,
            absmax=self.weight_absmax,
            code=self.weight_quant_map,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            nested_absmax=self.weight_nested_absmax,
            nested_code=self.weight_nested_quant_map,
            offset=self.weight_nested_offset,
        )

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the layer computes with, (out, in), in ``dtype`` (default: compute_dtype)."""
        return dequantize(self.quant_state, self.compute_dtype if dtype is None else dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.quant_state
        y = _DequantizeLinear.apply(x.to(self.compute_dtype), state, *state.tensors())  # (..., out)
        if self.bias is not None:
            y = y + self.bias.to(self.compute_dtype)  # outside the Function: a trainable bias just works
        return y.to(x.dtype)  # as bnb's Linear4bit: output in the input's dtype

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.weight_nested_absmax is not None else ""
        conv = ", fan_in_fan_out (a Conv1D's weight, stored transposed)" if self.fan_in_fan_out else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}{dq}, compute_dtype={self.compute_dtype}{conv}"
        )

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() cast every floating buffer; the 4-bit state's float32 tensors
        # must keep their dtype, so fn only gets to choose their device.
        before = {name: self._buffers[name] for name in _STATE_BUFFERS if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, tensor in before.items():
            moved = self._buffers[name]
            if moved.dtype != tensor.dtype:
                self._buffers[name] = tensor.to(moved.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # bnb's order: weight, bias, then the quant state; tensors cloned (safetensors refuses
        # shared storage, and a saved state must not change if the module is reloaded).
        tensors = to_bnb_tensors(self.quant_state, prefix.rstrip("."))
        weight_key = prefix + "weight"
        destination[weight_key] = tensors.pop(weight_key)
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        destination.update(tensors)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        blob_keys = [prefix + f"weight.quant_state.bitsandbytes__{t}" for t in QUANT_TYPES]
        if any(key in state_dict for key in blob_keys):
            try:
                self.set_quant_state(from_bnb_tensors(state_dict, prefix.rstrip("."), device=self.weight.device))
            except ValueError as error:
                error_msgs.append(f"NF4Linear '{prefix.rstrip('.')}': {error}")
        else:
            missing_keys.append(blob_keys[0])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # Module's loader flags every "weight*" key as unexpected: the buffers are non-persistent.
        ours = {prefix + "weight", *blob_keys} | {prefix + "weight." + k for k in _BNB_SUFFIXES}
        unexpected_keys[:] = [key for key in unexpected_keys if key not in ours]


_BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def quantize_linears(model: nn.Module, compute_dtype: torch.dtype | None = None, skip: set[str] = frozenset(),
                     double_quant: bool = True, blocksize: int = 64, quant_type: str = "nf4") -> nn.Module:
    """Replace every nn.Linear and transformers Conv1D (GPT-2's linear layers) of `model` (except
    the names in `skip`, e.g. the output head) by an NF4Linear, in place, one layer at a time (at
    most one full-precision layer is freed per step). Embeddings and other modules are left as
    they are."""
    names = [n for n, m in model.named_modules() if is_full_precision_linear(m) and n not in skip]
    for name in names:
        q = NF4Linear.from_linear(model.get_submodule(name), compute_dtype, double_quant, blocksize, quant_type)
        model.set_submodule(name, q.requires_grad_(False))
    return model


# ----------------------------------------------------------------------------------------------
# NF4 weights of any shape: mixture-of-experts weights (E, out, in)
# ----------------------------------------------------------------------------------------------


class NF4Weight(nn.Module):
    """A frozen weight of any shape stored in NF4, as a parametrization of the parameter
    (torch.nn.utils.parametrize): quantization is a property of the weight, the module that
    holds it keeps its class, its forward and its parameter names.

    Made for transformers 5's mixture-of-experts weights, which are one 3-D parameter per layer
    (Mixtral's `mlp.experts.gate_up_proj`, (E, 2 * intermediate, hidden)) read in the experts'
    forward in three ways (a loop over `W[e]`, a gather `W[ids]`, a grouped matmul over all of W):
    whichever it uses, `module.gate_up_proj` evaluates to

        W' = dequantize(W_nf4)   (same shape, in compute_dtype)

    right_inverse quantizes (the float weight -> its packed codes, which parametrize keeps as
    `parametrizations.<name>.original0`); the block absmaxes and DQ scales are buffers of this
    module. Flattened row-major and quantized in 64-blocks exactly like an NF4Linear's (out, in)
    weight, so expert e's slice W'[e] is what NF4Linear would compute from W[e] when
    out * in is a multiple of 64. Storage: 4.127 bits per element with DQ, 4.5 without.

    Memory in training: the dequantized weight of a layer exists while that layer runs, and autograd
    keeps it for the backward of the matmuls that read it (the experts' own code does the matmul);
    activation checkpointing frees it until the backward recomputes the layer.
    """

    def __init__(self, compute_dtype: torch.dtype = torch.float32, blocksize: int = 64, double_quant: bool = True,
                 quant_type: str = "nf4"):
        super().__init__()
        _check_float_dtype(compute_dtype, "compute_dtype")
        _check_blocksize(blocksize)
        _check_quant_type(quant_type)
        self.compute_dtype, self.blocksize, self.double_quant, self.quant_type = (
            compute_dtype, blocksize, double_quant, quant_type)
        self.shape: torch.Size | None = None  # set by right_inverse
        self.weight_dtype = torch.float32

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor]:
        """Quantize `weight`: its packed codes are returned (parametrize stores them as
        `original0`: a 1-tuple, since a single tensor may not change dtype), the rest of the state
        goes into this module's buffers."""
        state = quantize_nf4(weight.detach(), self.blocksize, self.double_quant, self.quant_type)
        self.shape, self.weight_dtype = state.shape, state.dtype
        for name, tensor in zip(_STATE_BUFFERS[1:], (state.absmax, state.code, state.nested_absmax,
                                                     state.nested_code, state.offset)):
            self.register_buffer(name, tensor, persistent=True)
        return (state.packed,)

    def state(self, packed: torch.Tensor) -> NF4State:
        """The 4-bit state, given the packed codes parametrize holds (no copies)."""
        return NF4State(packed, self.weight_absmax, self.weight_quant_map, self.shape, self.weight_dtype,
                        self.blocksize, self.quant_type, self.weight_nested_absmax,
                        self.weight_nested_quant_map, self.weight_nested_offset)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return dequantize(self.state(packed), self.compute_dtype)  # (*shape), compute_dtype

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"shape={list(self.shape or [])}, quant_type={self.quant_type}, blocksize={self.blocksize}{dq}, "
                f"compute_dtype={self.compute_dtype}")

    def _apply(self, fn, recurse=True):
        # As NF4Linear: .to(dtype) / .half() must not cast the state's float32 tensors.
        before = {name: t for name, t in self._buffers.items() if t is not None}
        super()._apply(fn, recurse)
        for name, tensor in before.items():
            if self._buffers[name].dtype != tensor.dtype:
                self._buffers[name] = tensor.to(self._buffers[name].device)
        return self


def quantize_parameter_(module: nn.Module, name: str, compute_dtype: torch.dtype | None = None,
                        double_quant: bool = True, blocksize: int = 64, quant_type: str = "nf4") -> NF4Weight:
    """Store `module.<name>` (a parameter of any shape) in NF4, in place: afterwards the
    attribute evaluates to the dequantized weight, frozen. `compute_dtype` defaults to the
    weight's dtype. Returns the parametrization (its state: nf4_weights)."""
    from torch.nn.utils import parametrize

    weight = getattr(module, name)
    if not isinstance(weight, torch.Tensor) or parametrize.is_parametrized(module, name):
        raise ValueError(f"quantize_parameter_: {type(module).__name__}.{name} is not a plain parameter")
    # Kept as a buffer, so parametrize keeps the packed codes as a buffer too (never a parameter:
    # optimizers, parameter counts and FSDP's parameter sharding leave them alone, as NF4Linear's).
    del module._parameters[name]
    module.register_buffer(name, weight.detach())
    quantizer = NF4Weight(compute_dtype or weight.dtype, blocksize, double_quant, quant_type)
    parametrize.register_parametrization(module, name, quantizer, unsafe=True)
    return quantizer


def nf4_weights(model: nn.Module) -> dict[str, NF4State]:
    """Every NF4 weight of `model` by full name ("model.layers.0.mlp.experts.gate_up_proj",
    "model.layers.0.self_attn.q_proj.weight"): NF4Weight parametrizations and NF4Linear layers."""
    out = {}
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        if isinstance(module, NF4Linear):
            out[prefix + "weight"] = module.quant_state
        for leaf, plist in getattr(module, "parametrizations", {}).items():
            if isinstance(plist[0], NF4Weight):
                out[prefix + leaf] = plist[0].state(plist.original0)
    return out
