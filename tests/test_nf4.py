"""NF4 quantization: exact values, byte equality with bitsandbytes, the layer's autograd contract.

bitsandbytes (0.50.x, CPU) is the reference; tests that need it skip cleanly without it.
"""

import dataclasses
import json
import math

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn

from lorakit import nf4
from lorakit.nf4 import (NF4Linear, NF4State, dequantize, from_bnb_tensors, is_full_precision_linear, quantize_nf4,
                         to_bnb_tensors)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (torch.equal says -0.0 == 0.0; a file would not)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def bnb_functional():
    return pytest.importorskip("bitsandbytes").functional


def random_weight(gen: torch.Generator, dtype: torch.dtype, blocksize: int) -> torch.Tensor:
    """A seeded weight with an awkward shape, magnitude and, sometimes, all-zero blocks."""
    rows = int(torch.randint(1, 40, (), generator=gen))
    cols = int(torch.randint(1, 300, (), generator=gen))
    # fp16 overflows beyond 65504 and has no normal numbers below 6e-5: keep its range modest.
    low, high = (-5.0, 3.0) if dtype == torch.float16 else (-30.0, 30.0)
    scale = 10 ** float(torch.empty(()).uniform_(low, high, generator=gen))
    w = torch.randn(rows, cols, generator=gen) * scale
    choice = int(torch.randint(0, 4, (), generator=gen))
    if choice == 0:
        w.view(-1)[:blocksize] = 0  # an all-zero (maybe partial) first block
    elif choice == 1:
        w.view(-1)[-(w.numel() % blocksize or blocksize) :] = 0  # an all-zero last block
    return w.to(dtype)


def assert_state_equals_bnb(ours: NF4State, packed: torch.Tensor, qs) -> None:
    assert bits_equal(ours.packed, packed) and ours.packed.shape == ((ours.numel + 1) // 2, 1)
    assert bits_equal(ours.absmax, qs.absmax)
    assert bits_equal(ours.code, qs.code)
    assert (ours.shape, ours.dtype) == (qs.shape, qs.dtype)
    assert (ours.blocksize, ours.quant_type) == (qs.blocksize, qs.quant_type)
    assert ours.double_quant == qs.nested
    if qs.nested:
        assert bits_equal(ours.nested_absmax, qs.state2.absmax)
        assert bits_equal(ours.nested_code, qs.state2.code)
        assert bits_equal(ours.offset, qs.offset)


# ----------------------------------------------------------------------------------------------
# Code tables
# ----------------------------------------------------------------------------------------------


def test_nf4_table_is_the_papers_quantiles():
    # The 16 float32 values of the format spec (QLoRA appendix E), by index.
    expected = [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]  # fmt: skip
    assert nf4.NF4_CODE.tolist() == expected
    fp4 = torch.tensor([0.0, 0.0625, 8, 12, 4, 6, 2, 3, 0.0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12
    assert bits_equal(nf4.FP4_CODE, fp4)
    assert not nf4.FP4_CODE[8].signbit()  # bnb's "-0" is the integer -0: +0.0, bit for bit


def test_dynamic_map_shape_and_range():
    dyn = nf4.create_dynamic_map()
    assert dyn.shape == (256,) and dyn.dtype == torch.float32
    assert torch.all(dyn[1:] >= dyn[:-1])
    assert dyn[-1] == 1.0 and (dyn == 0).sum() == 1
    assert dyn[0] == pytest.approx(-0.99297, abs=1e-5)  # the signed map never reaches -1


def test_code_tables_equal_bnb():
    F = bnb_functional()
    assert bits_equal(nf4.NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert bits_equal(nf4.FP4_CODE, F.get_4bit_type("fp4", device="cpu"))
    for args in [(True, 7, 8), (True, 5, 8), (True, 4, 6), (True, 3, 4), (False, 7, 8)]:
        assert bits_equal(nf4.create_dynamic_map(*args), F.create_dynamic_map(*args)), args


# ----------------------------------------------------------------------------------------------
# Exact values from hand-set weights (no reference library)
# ----------------------------------------------------------------------------------------------


def test_hand_set_block_codes_and_packing():
    code = nf4.NF4_CODE
    tie = ((code[7] + code[8]) / 2).item()  # exactly between 0 and 0.0796: goes to the lower code
    w = torch.tensor([1.0, -1.0, 0.0, code[13].item(), tie, 0.9, -0.75, 0.05, 0.5])  # absmax 1, n odd
    state = quantize_nf4(w, blocksize=32, double_quant=False)
    # codes 15, 0, 7, 13, 7 (the tie), 15 (0.9 > 0.8615), 1 (-0.75 > -0.848), 8 (0.05 > 0.0398),
    # 12 (0.5 < 0.5017, the midpoint of 0.4407 and 0.5626), then 7 pads the odd count
    assert state.packed.flatten().tolist() == [0xF0, 0x7D, 0x7F, 0x18, 0xC7]
    assert state.absmax.tolist() == [1.0]
    expected = code[torch.tensor([15, 0, 7, 13, 7, 15, 1, 8, 12])]
    assert torch.equal(dequantize(state), expected)


def test_all_zero_blocks():
    w = torch.zeros(3, 64)
    w[1] = torch.linspace(-2, 2, 64)
    w = w.reshape(-1)[:-10]  # 182 values: blocks 0 (zeros), 1 (ramp), 2 (partial, zeros)
    state = quantize_nf4(w, blocksize=64, double_quant=False)
    # A full zero block stores absmax 0, a partial one bnb's 1e-38 guard; both write code 7 (= 0.0).
    assert state.absmax.tolist() == [0.0, 2.0, torch.tensor(1e-38).item()]
    assert torch.all(state.packed[:32] == 0x77) and torch.all(state.packed[64:] == 0x77)
    assert torch.equal(dequantize(state)[:64], torch.zeros(64))
    # An all-zero weight: every absmax equals the mean, the 256-block of DQ codes has scale 0 -> code 0.
    zero = quantize_nf4(torch.zeros(4, 64 * 300))
    assert zero.offset.item() == 0 and torch.all(zero.nested_absmax == 0) and torch.all(zero.absmax == 0)
    assert torch.equal(dequantize(zero), torch.zeros(4, 64 * 300))


def test_double_quant_rounds_like_bnbs_cpu_lookup_table():
    """DQ codes: bnb's CPU rule (65536-cell LUT), which is not nearest rounding. State it exactly."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(512, 256, generator=gen) * torch.rand(512, 1, generator=gen)
    state = quantize_nf4(w)
    absmax = quantize_nf4(w, double_quant=False).absmax  # (2048,) float32
    c = (absmax - absmax.mean()).view(-1, 256)
    s = c.abs().amax(dim=1, keepdim=True)
    v = (c * (1.0 / s)).reshape(-1)
    dyn = nf4.create_dynamic_map()
    index = (((v + 1) * 0.5) * 65535 + 0.5).long()  # the cell v falls in
    grid = (index.float() / 65535) * 2 - 1  # the cell's representative value
    lut_codes = (grid[:, None] - dyn[None]).abs().argmin(dim=1)
    nearest = (v[:, None] - dyn[None]).abs().argmin(dim=1)
    assert torch.equal(state.absmax.long(), lut_codes)
    differ = (lut_codes != nearest).float().mean().item()
    assert 0 < differ < 0.01  # rare but real (3 of 2048 here): near a block's zero, codes are dense
    # ... and a small one: the chosen code is never further from v than half a LUT cell + the gap.
    err_lut = (dyn[lut_codes] - v).abs()
    err_nearest = (dyn[nearest] - v).abs()
    assert torch.all(err_lut <= err_nearest + 2.0 / 65535)
    # The decoded absmax: code * scale + offset
    decoded = nf4.dequantize_absmax(state)
    expected = dyn[lut_codes].view(-1, 256) * s + absmax.mean()
    assert torch.equal(decoded, expected.reshape(-1))


# ----------------------------------------------------------------------------------------------
# Byte equality with bitsandbytes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_byte_equal_bnb(quant_type, double_quant, dtype):
    F = bnb_functional()
    gen = torch.Generator().manual_seed(100 * DTYPES.index(dtype) + 10 * double_quant + (quant_type == "fp4"))
    for trial in range(12):
        blocksize = nf4.SUPPORTED_BLOCKSIZES[trial % len(nf4.SUPPORTED_BLOCKSIZES)]
        w = random_weight(gen, dtype, blocksize)
        ours = quantize_nf4(w, blocksize, double_quant, quant_type)
        packed, qs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
        assert_state_equals_bnb(ours, packed, qs)


def test_quantize_byte_equal_bnb_large_and_tiny_magnitudes():
    F = bnb_functional()
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(64, 96, generator=gen)
    w[0] *= 1e30
    w[0, 0] = 1.2e38  # near float32's max: 1 / absmax is subnormal
    w[1] *= 1e-38  # subnormal absmax: bnb's 1e-38 clamp of the reciprocal kicks in
    w[2] *= 1e-44
    w[3, :5] = torch.tensor([1.0e38, -1.0e38, 1e-45, -1e-45, 0.0])  # sum of absmaxes stays finite
    for quant_type in ("nf4", "fp4"):
        ours = quantize_nf4(w, 64, True, quant_type)
        packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
        assert_state_equals_bnb(ours, packed, qs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_equal_bnb(dtype):
    """Equal bits wherever bnb's native CPU kernel blocks correctly (see the next test), but for
    the sign of FP4's code 8 (sign bit set, magnitude 0): bnb's code table, its PyTorch path and
    its AVX-512 kernel give +0.0 (as we do), its kernel for other CPUs (AVX2) -0.0. So FP4 is
    compared with every zero made +0.0 (x + 0.0), NF4 bit for bit."""
    F = bnb_functional()
    gen = torch.Generator().manual_seed(5)
    for trial in range(12):
        blocksize = (64, 128, 32, 256)[trial % 4]
        rows = int(torch.randint(1, 20, (), generator=gen))
        if trial % 3:
            cols = blocksize * int(torch.randint(1, 4, (), generator=gen))  # rows of whole blocks
        else:
            cols = 2 * int(torch.randint(1, 90, (), generator=gen)) + 1  # odd: bnb's torch fallback
        w = (torch.randn(rows, cols, generator=gen) * 3).to(dtype)
        for quant_type in ("nf4", "fp4"):
            double_quant = bool(trial % 2)
            ours = quantize_nf4(w, blocksize, double_quant, quant_type)
            packed, qs = F.quantize_4bit(
                w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
            )
            for out_dtype in DTYPES:
                qs.dtype = out_dtype
                # bnb's pure-PyTorch fallback (odd cols) is torch.compile'd: eager keeps the test fast.
                with torch.compiler.set_stance("force_eager"):
                    expected = F.dequantize_4bit(packed, qs)
                result = dequantize(ours, out_dtype)
                if quant_type == "fp4":
                    result, expected = result + 0.0, expected + 0.0  # -0.0 + 0.0 is +0.0
                assert bits_equal(result, expected), (rows, cols, blocksize, quant_type)


def reference_dequantize(state: NF4State) -> torch.Tensor:
    """code[c_i] * absmax[i // blocksize] by advanced indexing, float32, with the double-quantized
    absmax as its formula: nested_code[q_b] * nested_absmax[b // 256] + offset."""
    codes = torch.stack([state.packed.view(-1) >> 4, state.packed.view(-1) & 15], 1).view(-1).long()
    blocks = torch.arange(state.numel) // state.blocksize
    absmax = state.absmax
    if state.double_quant:
        absmax = state.nested_code[state.absmax.long()] * state.nested_absmax[torch.arange(absmax.numel()) // 256]
        absmax = absmax + state.offset
    return (state.code[codes[: state.numel]] * absmax[blocks]).view(state.shape)


@pytest.mark.parametrize("shape", [(6, 64), (4, 3), (5, 66), (3, 7), (130, 130)])
def test_dequantize_is_the_formula(shape):
    """dequantize is code[c_i] * absmax[i // blocksize] bit for bit, in float32, and in a 16-bit
    dtype that product rounded once: even and odd counts of packed bytes ((6, 64), (4, 3), (130, 130):
    265 blocks, two DQ blocks; (5, 66), (3, 7)). A code table holding -0.0 (a loaded one may) gets
    its own lookup table."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    w.view(-1)[::5] = 0  # code 0.0
    for double_quant in (False, True):
        state = quantize_nf4(w, 64, double_quant)
        expected = reference_dequantize(state)
        assert bits_equal(dequantize(state, torch.float32), expected), (shape, double_quant)
        for dtype in (torch.bfloat16, torch.float16):
            assert bits_equal(dequantize(state, dtype), expected.to(dtype))
    negative_zero = dataclasses.replace(state, code=torch.where(state.code == 0, -0.0, state.code))
    assert bits_equal(dequantize(negative_zero), reference_dequantize(negative_zero))
    assert bits_equal(dequantize(state), reference_dequantize(state))  # the +0.0 table still its own
    zeros = w == 0
    assert torch.signbit(dequantize(negative_zero)[zeros]).all() and not torch.signbit(dequantize(state)[zeros]).any()


def test_bnb_cpu_dequantize_differs_when_rows_split_blocks():
    """Known difference, on purpose. bnb 0.50's native CPU dequantize_4bit on an AVX-512 CPU assumes
    that a row is a whole number of blocks: it scales element (r, c) by
    absmax[r * (cols // blocksize) + c // blocksize]. bnb's quantizer (and its CUDA / pure-PyTorch
    paths, and its native kernel on other CPUs, e.g. AVX2) block the *flattened* weight, so for
    cols % blocksize != 0 (cols even) the AVX-512 kernel disagrees with bnb's own quantization. We
    follow the format: flattened blocks. Real LLM layers (cols a multiple of 64) never hit this.
    Which kernel ran depends on the machine; either must be one of the two formulas."""
    F = bnb_functional()
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(6, 96, generator=gen)  # 96 % 64 != 0: blocks straddle rows
    ours = quantize_nf4(w, 64, double_quant=False)
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    native = F.dequantize_4bit(packed, qs)
    codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], 1).flatten().long().view(6, 96)
    flat_blocks = (torch.arange(6 * 96) // 64).view(6, 96)
    row_blocks = torch.arange(6)[:, None] * (96 // 64) + torch.arange(96)[None] // 64
    flat, by_rows = nf4.NF4_CODE[codes] * qs.absmax[flat_blocks], nf4.NF4_CODE[codes] * qs.absmax[row_blocks]
    assert not torch.equal(flat, by_rows)  # the case tells the two apart
    assert torch.equal(dequantize(ours), flat)
    assert torch.equal(native, by_rows) or torch.equal(native, flat)


# ----------------------------------------------------------------------------------------------
# Numbers from the paper
# ----------------------------------------------------------------------------------------------


def test_relative_error_on_normal_data():
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))

    def rel_error(**kwargs):
        return ((dequantize(quantize_nf4(w, **kwargs)) - w).norm() / w.norm()).item()

    assert rel_error() == pytest.approx(0.092, abs=0.002)  # measured 0.0920 on 4096x4096 with bnb
    assert rel_error(double_quant=False) == pytest.approx(0.092, abs=0.002)  # DQ costs ~nothing
    assert rel_error(quant_type="fp4") > 1.1 * rel_error()  # NF4 beats FP4 on normal weights


@pytest.mark.parametrize(("double_quant", "expected"), [(True, 4 + 8 / 64 + 32 / (64 * 256)), (False, 4.5)])
def test_storage_bits_per_parameter(double_quant, expected):
    layer = NF4Linear(8192, 8192, double_quant=double_quant, device="meta")  # layout only: no memory
    assert nf4.storage_bits_per_parameter(layer) == pytest.approx(expected, abs=2e-4)
    small = quantize_nf4(torch.randn(48, 200), double_quant=double_quant)  # exact byte count
    n = 48 * 200
    nbytes = n // 2 + (n // 64 * (1 if double_quant else 4)) + 64 + (4 + 4 + 1024 if double_quant else 0)
    assert nf4.storage_bits_per_parameter(small) == 8 * nbytes / n


# ----------------------------------------------------------------------------------------------
# The safetensors layout
# ----------------------------------------------------------------------------------------------


def bnb_linear4bit(linear: nn.Linear, double_quant: bool, quant_type: str):
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=torch.float32,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, compress_statistics=double_quant, quant_type=quant_type
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone())
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize(
    ("quant_type", "double_quant", "dtype", "bias"),
    [("nf4", True, torch.bfloat16, True), ("nf4", False, torch.float32, False), ("fp4", True, torch.float16, True)],
)
def test_state_dict_byte_equal_bnb_linear4bit(quant_type, double_quant, dtype, bias, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    linear = nn.Linear(200, 48, bias=bias).to(dtype)
    torch.nn.init.normal_(linear.weight, generator=torch.Generator().manual_seed(1))
    expected = bnb_linear4bit(linear, double_quant, quant_type).state_dict()
    ours = NF4Linear.from_linear(linear, double_quant=double_quant, quant_type=quant_type).state_dict()
    assert list(ours) == list(expected)
    for key in expected:
        assert ours[key].dtype == expected[key].dtype and torch.equal(ours[key], expected[key]), key
    meta = json.loads(bytes(ours[f"weight.quant_state.bitsandbytes__{quant_type}"].tolist()))
    assert meta["dtype"] == str(dtype).removeprefix("torch.") and meta["shape"] == [48, 200]
    # Same tensors -> the same safetensors file, byte for byte.
    safetensors.save_file(dict(expected), tmp_path / "bnb.safetensors")
    safetensors.save_file(dict(ours), tmp_path / "ours.safetensors")
    assert (tmp_path / "bnb.safetensors").read_bytes() == (tmp_path / "ours.safetensors").read_bytes()


def test_to_bnb_tensors_equals_quant_state_as_dict():
    F = bnb_functional()
    w = torch.randn(33, 70, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    packed, qs = F.quantize_4bit(w, blocksize=128, compress_statistics=True, quant_type="nf4")
    expected = {"model.q_proj.weight": packed}
    expected |= {f"model.q_proj.weight.{k}": v for k, v in qs.as_dict(packed=True).items()}
    ours = to_bnb_tensors(quantize_nf4(w, blocksize=128), "model.q_proj")
    assert list(ours) == list(expected)
    assert all(bits_equal(ours[k], expected[k]) for k in expected)


@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_tensors_round_trip(double_quant):
    state = quantize_nf4(torch.randn(17, 130).half(), blocksize=32, double_quant=double_quant)
    tensors = to_bnb_tensors(state, "layers.0.mlp.up_proj") | {"unrelated.weight": torch.ones(1)}
    back = from_bnb_tensors(tensors, "layers.0.mlp.up_proj")
    assert (back.shape, back.dtype, back.blocksize, back.quant_type) == (state.shape, state.dtype, 32, "nf4")
    assert len(back.tensors()) == len(state.tensors())
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(back.tensors(), state.tensors()))
    assert torch.equal(dequantize(back), dequantize(state))
    assert next(iter(to_bnb_tensors(state, ""))) == "weight"  # a bare module: keys without a prefix


def test_load_bnb_checkpoint_into_nf4linear():
    """A transformers+bnb state dict maps 1:1, whatever blocksize / DQ the skeleton was built with."""
    linear = nn.Linear(128, 40)
    reference = bnb_linear4bit(linear, double_quant=True, quant_type="nf4")
    layer = NF4Linear(128, 40, blocksize=256, double_quant=False)  # deliberately another layout
    result = layer.load_state_dict(reference.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert layer.blocksize == 64 and layer.weight_nested_absmax is not None
    F = bnb_functional()
    expected = F.dequantize_4bit(reference.weight.data, reference.weight.quant_state)
    assert torch.equal(layer.dequantize_weight(), expected)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)
    # The state dict comes back out unchanged.
    out = layer.state_dict()
    assert all(torch.equal(out[k], v) for k, v in reference.state_dict().items())


def test_load_state_dict_reports_problems():
    layer = NF4Linear(64, 8)
    with pytest.raises(RuntimeError, match="weight.quant_state.bitsandbytes__nf4"):
        layer.load_state_dict({"bias": torch.zeros(8)})
    other = NF4Linear.from_linear(nn.Linear(32, 8)).state_dict()
    with pytest.raises(RuntimeError, match=r"needs a weight of shape \[8, 64\]"):
        layer.load_state_dict(other)


# ----------------------------------------------------------------------------------------------
# NF4Linear: forward, backward, devices and dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_forward_equals_dequantized_matmul(compute_dtype):
    gen = torch.Generator().manual_seed(4)
    linear = nn.Linear(96, 24)
    layer = NF4Linear.from_linear(linear, compute_dtype=compute_dtype)
    x = torch.randn(2, 3, 96, generator=gen)
    w = dequantize(quantize_nf4(linear.weight), compute_dtype)  # (24, 96)
    expected = (x.to(compute_dtype) @ w.t() + linear.bias.to(compute_dtype)).float()
    assert torch.equal(layer(x), expected)
    assert torch.equal(layer.dequantize_weight(), w)


def test_backward_grad_input_and_saved_tensors_are_4bit_only():
    gen = torch.Generator().manual_seed(6)
    layer = NF4Linear.from_linear(nn.Linear(256, 128))
    x = torch.randn(4, 256, generator=gen, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    grad_out = torch.randn(4, 128, generator=gen)
    y.backward(grad_out)

    w = layer.dequantize_weight()  # (128, 256)
    assert torch.equal(x.grad, grad_out @ w)
    assert torch.equal(layer.bias.grad, grad_out.sum(0))
    assert not any(b.requires_grad for b in layer.buffers())
    # Only the 4-bit state was kept for backward: the very buffers, ~0.5 bytes per weight.
    state = layer.quant_state.tensors()
    assert len(saved) == len(state)
    assert all(any(s is t or s.data_ptr() == t.data_ptr() for t in state) for s in saved)
    saved_bytes = sum(s.numel() * s.element_size() for s in saved)
    assert saved_bytes < 0.6 * 128 * 256


def test_to_dtype_keeps_the_4bit_state_and_casts_the_bias():
    layer = NF4Linear.from_linear(nn.Linear(64, 16), double_quant=False)
    before = [t.clone() for t in layer.quant_state.tensors()]
    layer.half()
    after = layer.quant_state.tensors()
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(after, before))
    assert layer.bias.dtype == torch.float16
    assert layer(torch.randn(2, 64, dtype=torch.float16)).dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    w = torch.randn(300, 257, generator=torch.Generator().manual_seed(9))
    cpu = quantize_nf4(w, double_quant=False)
    gpu = quantize_nf4(w.cuda(), double_quant=False)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(gpu.tensors(), cpu.tensors()))
    assert torch.equal(dequantize(gpu).cpu(), dequantize(cpu))
    layer = NF4Linear.from_linear(nn.Linear(257, 300)).to("cuda")
    assert layer.weight.is_cuda and layer.weight_absmax.dtype == torch.uint8
    x = torch.randn(3, 257, device="cuda", requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize_weight().sum(0).expand(3, -1))


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: quantize_nf4(torch.randn(64), quant_type="int4"), r"quant_type='int4'.*valid choices: nf4, fp4"),
        (lambda: quantize_nf4(torch.randn(64), blocksize=48), r"blocksize=48.*valid choices: 32, 64, .*4096"),
        (lambda: quantize_nf4(torch.randn(64), blocksize=8192), r"blocksize=8192"),
        (lambda: quantize_nf4(torch.randn(64), blocksize=True), r"blocksize=True"),
        (lambda: quantize_nf4(torch.arange(64)), r"torch.int64.*torch.float32, torch.float16, torch.bfloat16"),
        (lambda: quantize_nf4(torch.randn(64, dtype=torch.float64)), r"torch.float64"),
        (lambda: quantize_nf4([1.0, 2.0]), r"expects a torch.Tensor, got list"),
        (lambda: quantize_nf4(torch.empty(0, 8)), r"empty tensor \(shape \(0, 8\)\)"),
        (lambda: quantize_nf4(torch.tensor([1.0, math.nan])), r"NaN or inf"),
        (lambda: quantize_nf4(torch.full((4, 64), 3e38)), r"overflows float32.*double_quant=False"),
        (lambda: quantize_nf4(torch.randn(64), double_quant="yes"), r"double_quant='yes' must be True or False"),
        (lambda: dequantize(quantize_nf4(torch.randn(64)), torch.int32), r"dtype=torch.int32 must be a floating"),
        (lambda: NF4Linear(0, 8), r"in_features=0 must be a positive int"),
        (lambda: NF4Linear(8, 8, compute_dtype=torch.int8), r"compute_dtype is torch.int8"),
        (lambda: NF4Linear(8, 8, blocksize=100), r"blocksize=100"),
        (lambda: NF4Linear.from_linear(nn.Conv1d(1, 1, 1)), r"expects an nn.Linear or a transformers Conv1D, got Conv1d"),
        (lambda: nf4.storage_bits_per_parameter(nn.Linear(2, 2)), r"NF4State or NF4Linear, got Linear"),
        (
            lambda: from_bnb_tensors({"a.weight": torch.zeros(1)}, "a"),
            r"a.weight.quant_state.bitsandbytes__nf4.*found none; keys under it: \['a.weight'\]",
        ),
    ],
)
def test_validation_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_from_bnb_tensors_names_missing_tensors():
    tensors = to_bnb_tensors(quantize_nf4(torch.randn(8, 64)), "m")
    del tensors["m.weight.nested_absmax"]
    with pytest.raises(ValueError, match=r"missing 4-bit state tensors: \['m.weight.nested_absmax'\]"):
        from_bnb_tensors(tensors, "m")
    tensors = to_bnb_tensors(quantize_nf4(torch.randn(8, 64)), "m")
    tensors["m.weight.absmax"] = tensors["m.weight.absmax"][:-1]
    with pytest.raises(ValueError, match=r"needs 256 packed bytes and 8 absmax values, got 256 and 7"):
        from_bnb_tensors(tensors, "m")


# --- NF4 weights of any shape: mixture-of-experts weights (E, out, in) ---------------------------

def test_an_expert_weight_in_nf4_computes_as_its_dequantization_and_costs_4_14_bits():
    """NF4Weight (a parametrization) on a 3-D (E, out, in) weight: the module reads the
    dequantized weight wherever it reads the parameter; the 4-bit state's bytes are
    n/2 codes + n/64 absmax codes + 16 fp32 code values + ceil(n/64/256) fp32 DQ scales + the
    256-entry fp32 DQ map + one fp32 offset."""
    from lorakit.nf4 import NF4Weight, nf4_weights, quantize_parameter_

    torch.manual_seed(0)
    module = torch.nn.Module()
    weight = torch.randn(4, 256, 512)
    module.w = torch.nn.Parameter(weight.clone())
    expected = dequantize(quantize_nf4(weight), torch.float32)
    quantizer = quantize_parameter_(module, "w")
    assert isinstance(quantizer, NF4Weight) and not list(module.parameters())
    assert torch.equal(module.w, expected) and module.w.shape == (4, 256, 512)
    state = nf4_weights(module)["w"]
    n = 4 * 256 * 512
    nbytes = sum(t.numel() * t.element_size() for t in state.tensors())
    assert nbytes == n // 2 + n // 64 + 16 * 4 + (n // 64 // 256) * 4 + 256 * 4 + 4 == 271_556
    assert 4.14 < 8 * nbytes / n < 4.15
    # without DQ, expert e's slice is exactly what an NF4Linear makes of W[e] (out * in: whole 64-blocks)
    plain = torch.nn.Module()
    plain.w = torch.nn.Parameter(weight.clone())
    quantize_parameter_(plain, "w", double_quant=False)
    linear = torch.nn.Linear(512, 256, bias=False)
    linear.weight.data.copy_(weight[2])
    assert torch.equal(plain.w[2], NF4Linear.from_linear(linear, double_quant=False).dequantize_weight())
    x = torch.randn(3, 512, requires_grad=True)
    y = x @ module.w[2].T
    y.sum().backward()
    assert x.grad is not None  # gradients reach the input; the frozen weight has none to take
    module.to(torch.bfloat16)  # a dtype cast leaves the 4-bit state's float32 tensors alone
    assert quantizer.weight_absmax.dtype == torch.uint8 and quantizer.weight_nested_absmax.dtype == torch.float32


def test_full_precision_linears_are_what_quantize_linears_replaces():
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    assert sum(is_full_precision_linear(m) for m in llama.modules()) == 15  # 7 per block + lm_head
    assert sum(is_full_precision_linear(m) for m in gpt2.modules()) == 9    # 4 Conv1D per block + lm_head
    assert not is_full_precision_linear(NF4Linear.from_linear(nn.Linear(64, 8)))
    assert not is_full_precision_linear(nn.Embedding(4, 4))
