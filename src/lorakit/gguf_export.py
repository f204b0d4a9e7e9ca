"""GGUF export: a merged model, or an adapter alone, as a file llama.cpp runs (and so Ollama, LM
Studio and llama-cpp-python).

A GGUF file is a header of typed key/value metadata followed by named tensors. llama.cpp finds
everything it needs in it: the architecture's hyperparameters under `<arch>.*` keys, the
tokenizer under `tokenizer.*` keys, and the weights under its own names (`blk.3.attn_q.weight`,
not `model.layers.3.self_attn.q_proj.weight`). The names come from the `gguf` package's
TensorNameMap, the same table llama.cpp's converter uses.

Layouts. A GGUF tensor lists its dimensions fastest first (ne0 = columns), so a PyTorch
(out, in) weight is written as it is and read as ne = [in, out]. One layout differs: rotary
embeddings. transformers' Llama rotates each head's first half of dimensions against its second
half (x_i with x_{i+d/2}); llama.cpp's "llama" architecture rotates adjacent pairs (x_{2i} with
x_{2i+1}). The two agree if the rows of W_q and W_k are reordered inside every head so that
row 2i+t of the llama.cpp head is row t·d/2 + i of the transformers head (t in {0, 1}); this is
`permute_rotary_rows`. Qwen2 is run by llama.cpp with the half-rotation ("neox" rope), so its
rows are written unchanged.

Rotary scaling. Linear scaling (positions divided by a factor) is llama.cpp's rope scaling type
and factor keys; Llama 3.1's ("llama3": long wavelengths stretched, short ones kept) is a
rope_freqs.weight tensor of per-frequency divisors, `llama3_rope_factors`. Others are refused.

Tokenizer. Two kinds are written. Byte-level BPE (SmolLM2, Llama 3, Qwen2) as llama.cpp's "gpt2"
tokenizer model: token strings, token types, merges, special token ids, whether BOS is added, and
the chat template. llama.cpp also needs the name of the pre-tokenizer (the regex that splits text
before BPE), which it knows by name; `pre_tokenizer_name` recognises it from tokenizer.json.
SentencePiece BPE with byte fallback (Llama 2, Mistral 7B) as its "llama" model: no merges but a
score per token (`merge_scores`), byte tokens <0xNN> for characters outside the vocabulary, and
whether "▁" is put before the text (`space_prefix`).

Quantized outputs (q8_0, q4_0) come from the `gguf` package's quantizers. As in llama.cpp, 1-D
tensors (norms, biases) stay float32, and a matrix whose rows are not a whole number of 32-value
blocks is written in float16.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .files import replacing
from .surgery import output_head_names

GGUF_HINT = "pip install 'gguf>=0.10' (lorakit's extra: pip install 'lorakit[gguf]')"
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
ADAPTER_QUANTS = ("f32", "f16", "bf16")
BLOCK = 32  # values per q8_0 / q4_0 block along a row


@dataclass(frozen=True)
class Architecture:
    gguf_name: str          # llama.cpp's architecture name
    permute_rotary: bool    # llama.cpp rotates adjacent pairs: reorder W_q, W_k rows (see module doc)


# transformers model_type -> how llama.cpp runs it. Mistral is llama.cpp's "llama" architecture
# (its sliding window only matters beyond `sliding_window` tokens; llama.cpp attends to all).
ARCHITECTURES = {
    "llama": Architecture("llama", permute_rotary=True),
    "mistral": Architecture("llama", permute_rotary=True),
    "qwen2": Architecture("qwen2", permute_rotary=False),
}

# Rotary embedding types (transformers' rope_type) written per llama.cpp architecture: "linear"
# as llama.cpp's rope scaling type and factor, "llama3" (Llama 3.1's) as a rope_freqs tensor.
ROPE_TYPES = {"llama": ("default", "linear", "llama3"), "qwen2": ("default", "linear")}

# Pre-tokenizer regexes as they appear in tokenizer.json (Split pre-tokenizers), by llama.cpp's name.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEXES = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}
SPACE = "\u2581"  # SentencePiece's visible space, "▁"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(f"GGUF export needs the gguf package: {GGUF_HINT}") from None
    return gguf


def architecture(config) -> Architecture:
    """llama.cpp's architecture for a transformers config; ValueError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} cannot be exported to GGUF; supported: "
                         f"{', '.join(ARCHITECTURES)} (Llama 2/3, SmolLM2, Mistral, Qwen2)")
    rope_type = rope_parameters(config).get("rope_type", "default")
    supported = ROPE_TYPES[ARCHITECTURES[model_type].gguf_name]
    if rope_type not in supported:
        raise ValueError(f"rope scaling {rope_type!r} on {model_type} cannot be exported to GGUF; supported: "
                         f"{', '.join(supported)}")
    for flag in ("mlp_bias",):
        if getattr(config, flag, False):
            raise ValueError(f"{model_type} with {flag}=True cannot be exported to GGUF: llama.cpp's "
                             f"{ARCHITECTURES[model_type].gguf_name} architecture has no such tensors")
    return ARCHITECTURES[model_type]


def rope_parameters(config) -> dict:
    """{'rope_type', 'rope_theta', ...}: transformers 5 keeps them in rope_parameters, older
    versions in rope_theta and rope_scaling."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama3_rope_factors(config) -> torch.Tensor:
    """Llama 3.1's rope scaling as llama.cpp's rope_freqs.weight: (d/2,) float32 divisors of the
    rotary frequencies, θ_i = p · base^(-2i/d) / f_i.

    With the wavelength λ_i = 2π / ω_i of ω_i = base^(-2i/d), the context L (original_max_position
    _embeddings), the factor s and α, β (low_freq_factor, high_freq_factor), Llama 3.1 keeps the
    short waves (λ < L/β: f = 1), stretches the long ones (λ > L/α: f = s) and in between blends
    ω/s and ω with γ = (L/λ - α) / (β - α): ω' = (1 - γ) ω/s + γ ω, so f = 1 / ((1 - γ)/s + γ).
    (transformers: _compute_llama3_parameters; llama.cpp's converter writes the same tensor.)
    """
    rope = rope_parameters(config)
    d = head_dim(config)
    omega = float(rope.get("rope_theta", 10000.0)) ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)
    wavelength = 2 * torch.pi / omega
    s, alpha, beta = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    context = float(rope["original_max_position_embeddings"])
    gamma = (context / wavelength - alpha) / (beta - alpha)
    factors = 1 / ((1 - gamma) / s + gamma)
    factors = torch.where(wavelength < context / beta, 1.0, factors)
    factors = torch.where(wavelength > context / alpha, s, factors)
    return factors.float()


def permute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' half-rotation row order -> llama.cpp's pair order, inside each head.

    weight: (n_heads·d, ...) for W_q, W_k, their biases, or a LoRA B. Per head the rows
    [0..d/2) and [d/2..d) are interleaved: new row 2i+t = old row t·d/2 + i.
    """
    shape = weight.shape
    return weight.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def unpermute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_rotary_rows: llama.cpp's pair order -> transformers' half order."""
    shape = weight.shape
    return weight.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _rotary_heads(hf_name: str, config) -> int | None:
    """Heads whose rows to reorder for a q/k projection tensor, else None."""
    if ".q_proj." in hf_name:
        return config.num_attention_heads
    if ".k_proj." in hf_name:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


# --- tensors ------------------------------------------------------------------------------------

@dataclass
class GGUFTensor:
    name: str              # llama.cpp's name, e.g. blk.0.attn_q.weight
    hf_name: str | None    # the transformers state-dict key it comes from (None: rope_freqs)
    data: np.ndarray       # encoded: float32/float16 values, or the quantized bytes (uint8)
    qtype: object          # gguf.GGMLQuantizationType


def tensor_type(quant: str, shape: tuple[int, ...]):
    """The GGML type a tensor of `shape` gets in a `quant` export (1-D: float32, as llama.cpp)."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or quant == "f32":
        return T.F32
    if quant in ("q8_0", "q4_0") and shape[-1] % BLOCK:
        return T.F16  # rows are not whole blocks
    return {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]


def model_tensors(model: nn.Module, quant: str = "f16", progress=None) -> list[GGUFTensor]:
    """The merged model's weights, renamed, reordered and encoded for llama.cpp.

    `model` is a plain transformers causal LM (no LoRA layers left: merge_and_unload first).
    A tied output head is written once, as token_embd.weight; llama.cpp reuses it.
    """
    gguf = _gguf()
    if quant not in QUANTS:
        raise ValueError(f"quant {quant!r}: valid choices are {', '.join(QUANTS)}")
    config = model.config
    arch = architecture(config)
    names = gguf.get_tensor_name_map(_model_arch(arch.gguf_name), config.num_hidden_layers)
    state = model.state_dict()
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        for head_name in output_head_names(model):  # tied: GGUF stores the embedding once
            del state[head_name + ".weight"]
    out = []
    items = [(k, v) for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")]
    for key, value in (progress(items) if progress else items):
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"tensor {key!r} has no llama.cpp name for architecture {arch.gguf_name!r}; "
                             "this model's layout is not supported by GGUF export")
        value = value.detach().float().cpu()
        heads = _rotary_heads(key, config) if arch.permute_rotary else None
        if heads:
            value = permute_rotary_rows(value, heads)
        array = value.numpy()
        qtype = tensor_type(quant, array.shape)
        out.append(GGUFTensor(name, key, gguf.quants.quantize(array, qtype), qtype))
    if rope_parameters(config).get("rope_type") == "llama3":
        factors = llama3_rope_factors(config).numpy()
        out.append(GGUFTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None, factors,
                              gguf.GGMLQuantizationType.F32))
    return out


def decode(tensors: list[GGUFTensor], config) -> dict[str, torch.Tensor]:
    """transformers state dict from encoded GGUF tensors: what a reader of the file gets back."""
    gguf = _gguf()
    arch = architecture(config)
    state = {}
    for t in (t for t in tensors if t.hf_name is not None):
        value = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.qtype), dtype=np.float32))
        heads = _rotary_heads(t.hf_name, config) if arch.permute_rotary else None
        state[t.hf_name] = unpermute_rotary_rows(value, heads) if heads else value
    return state


def _model_arch(name: str):
    gguf = _gguf()
    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)


# --- metadata -----------------------------------------------------------------------------------

def add_hyperparameters(writer, config) -> None:
    """The `<arch>.*` keys llama.cpp reads to build the graph."""
    n_heads = config.num_attention_heads
    d = head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":  # positions divided by the factor: θ = (p / s) · ω
        gguf = _gguf()
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_rope_dimension_count(d)
    if d != config.hidden_size // n_heads:
        writer.add_key_length(d)
        writer.add_value_length(d)
    writer.add_vocab_size(config.vocab_size)


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json.

    gpt-2: ByteLevel's own GPT-2 regex; smollm: single digits split off first, then GPT-2's
    regex; llama-bpe (Llama 3) and qwen2: a Split with their regex, then ByteLevel without one.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in SPLIT_REGEXES:
            return SPLIT_REGEXES[regex]
    raise ValueError(f"pre-tokenizer {json.dumps(pre)[:200]} is not one llama.cpp knows by name; "
                     "supported: gpt-2, smollm (SmolLM2), llama-bpe (Llama 3), qwen2")


def tokenizer_kind(spec: dict) -> str:
    """llama.cpp's tokenizer model for a tokenizer.json: "gpt2" (byte-level BPE) or "llama"
    (SentencePiece BPE with byte fallback, as Llama 2 and Mistral 7B); ValueError otherwise."""
    model = spec.get("model", {})
    decoder = spec.get("decoder") or {}
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    if model.get("type") == "BPE" and decoder.get("type") == "ByteLevel":
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback") and any(
            d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == SPACE for d in steps):
        return "llama"
    raise ValueError(f"tokenizer model {model.get('type')!r} with decoder {decoder.get('type')!r} cannot be "
                     "written to GGUF: supported are byte-level BPE (SmolLM2, Llama 3, Qwen2) and SentencePiece "
                     "BPE with byte fallback (Llama 2, Mistral 7B)")



def space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece tokenizer.json puts "▁" before the text (add_dummy_prefix): as a
    Prepend normalizer (Llama 2's files) or a Metaspace pre-tokenizer that prepends.

    llama.cpp prepends it to the text and again after every special token, as transformers'
    legacy Llama tokenizer (prepend_scheme "always") does; with prepend_scheme "first" the two
    differ only on text that follows a special token inside the string.
    """
    normalizer = spec.get("normalizer") or {}
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    if any(n.get("type") == "Prepend" and n.get("prepend") == SPACE for n in steps):
        return True
    pre = spec.get("pre_tokenizer") or {}
    pre_steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    for step in pre_steps:
        if step.get("type") == "Metaspace":
            if step.get("split", False):
                raise ValueError("a Metaspace pre-tokenizer with split=true cuts the text at every space; llama.cpp's "
                                 "SentencePiece tokenizer does not, so tokens would differ: supported is split=false")
            return step.get("prepend_scheme", "always") != "never"
    return False


def merge_scores(merges: list, vocab: dict[str, int]) -> dict[int, float]:
    """token id -> score for llama.cpp's SentencePiece tokenizer: -(rank of the first merge that
    makes the token).

    llama.cpp merges, among adjacent pairs whose concatenation is a token, the one whose token
    has the highest score (leftmost on ties); transformers' BPE merges the pair of lowest rank.
    The two agree when the scores fall with the rank, and transformers' converter lists every
    split of every token as a merge, ordered by the SentencePiece scores. Tokens no merge makes
    (characters, bytes, special tokens) are never the result of a merge: score 0.
    """
    scores = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token = vocab.get(left + right)
        if token is not None and token not in scores:
            scores[token] = -float(rank)
    return scores


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The `tokenizer.*` keys: a byte-level BPE vocabulary as llama.cpp's "gpt2" tokenizer model,
    or a SentencePiece one as its "llama" model (token scores, byte tokens <0xNN>, space prefix)."""
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no tokenizer.json (a slow tokenizer): "
                         "GGUF export reads the fast tokenizer's vocabulary; load it with use_fast=True")
    spec = json.loads(backend.to_str())
    kind = tokenizer_kind(spec)
    model = spec["model"]
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(pre_tokenizer_name(spec))

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    if max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has id {max(by_id)}, beyond the model's {vocab_size} embeddings")
    T = gguf.TokenType
    merges = model.get("merges", [])
    scores = merge_scores(merges, model.get("vocab", {})) if kind == "llama" else {}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows no token uses (vocabularies padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i == tokenizer.unk_token_id and kind == "llama":
            tokens.append(by_id[i])
            types.append(T.UNKNOWN)
        elif i in added:
            tokens.append(by_id[i])
            types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            byte = kind == "llama" and len(by_id[i]) == 6 and by_id[i].startswith("<0x") and by_id[i].endswith(">")
            types.append(T.BYTE if byte else T.NORMAL)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "llama":
        writer.add_token_scores([scores.get(i, 0.0) for i in range(vocab_size)])
        writer.add_add_space_prefix(space_prefix(spec))
    else:
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        writer.add_add_space_prefix(False)

    for special in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{special}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{special}_token_id")(token_id)
    # Whether the tokenizer adds BOS/EOS around a text: as transformers does it, seen from the ids.
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(len(full) > len(plain) and full[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(full) > len(plain) and full[-1] == tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


# --- files ---------------------------------------------------------------------------------------

FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0"}


def check_output_path(path: str | os.PathLike) -> Path:
    """The output file as a Path; ValueError if it exists or its directory is missing or read-only."""
    out = Path(path)
    if out.exists():
        raise ValueError(f"output {out} already exists; choose a new file name (nothing is overwritten)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"output {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output {out}: directory {parent} is not writable")
    return out


def write_gguf(path: str | os.PathLike, arch_name: str, metadata, tensors: list[GGUFTensor],
               progress: bool = False) -> Path:
    """Write a GGUF file atomically: to a temporary name in the same directory, renamed at the end.

    metadata(writer) adds the key/value pairs; tensors are written in the given order.
    """
    gguf = _gguf()
    out = Path(path)
    with replacing(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch_name)
        metadata(writer)
        for t in tensors:
            writer.add_tensor(t.name, t.data, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    return out


def model_metadata(config, tokenizer, quant: str, name: str):
    """metadata(writer) for a whole model: general.*, hyperparameters and the tokenizer."""
    gguf = _gguf()

    def add(writer):
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[quant]))
        if quant in ("q8_0", "q4_0"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hyperparameters(writer, config)
        add_tokenizer(writer, tokenizer, config.vocab_size)
    return add


# --- adapters ------------------------------------------------------------------------------------

def adapter_tensors(model: nn.Module, quant: str = "f32") -> tuple[list[GGUFTensor], float]:
    """(tensors, alpha) of the active LoRA adapter as a llama.cpp LoRA adapter.

    Refused (ValueError, suggesting the merged export): embedding adapters, modules_to_save,
    Conv1D layers, several active adapters, LoRA on a tied head, and DoRA (llama.cpp's LoRA GGUF
    holds A and B only; the merged export merges DoRA's W' = m ⊙ (W + ΔW) / ||W + ΔW||).

    llama.cpp adds scale · B A with scale = alpha / r, r read from each B (ne0 = r). lora_a is
    PEFT's A as it is ((r, in): ne = [in, r]); lora_b is B ((out, r): ne = [r, out]) with the rows
    of q/k projections reordered as the base weights are. When every module has the same
    scale·r, that product is alpha; otherwise (rank or alpha patterns) each B carries its module's
    scale and alpha is written as 0, which llama.cpp reads as scale 1.
    """
    gguf = _gguf()
    from .inject import lora_layers
    from .layer import LoraLinear, ModulesToSave

    if quant not in ADAPTER_QUANTS:
        raise ValueError(f"--adapter-only with quant {quant!r}: valid choices are {', '.join(ADAPTER_QUANTS)}")
    config = model.config
    arch = architecture(config)
    names = gguf.get_tensor_name_map(_model_arch(arch.gguf_name), config.num_hidden_layers)
    problems = [f"{n}: modules_to_save (a full copy of the module)" for n, m in model.named_modules()
                if isinstance(m, ModulesToSave)]
    layers = []
    for module_name, layer in lora_layers(model):
        live = [a for a in layer.active_adapters if a not in layer.merged_adapters]
        if not isinstance(layer, LoraLinear):
            problems.append(f"{module_name}: {type(layer).__name__} (embedding adapters)")
        elif len(live) != 1:
            problems.append(f"{module_name}: {len(live)} active adapters (export one: set_adapter)")
        elif layer.fan_in_fan_out:
            problems.append(f"{module_name}: a Conv1D layer")
        else:
            layers.append((module_name, layer, live[0]))
    dora = [n for n, layer, a in layers if a in layer.lora_magnitude_vector]
    if dora:  # llama.cpp adds scale · B A and nothing else: it would silently run plain LoRA
        problems.append(f"DoRA on {len(dora)} modules ({', '.join(dora[:3])}{', ...' if len(dora) > 3 else ''}): "
                        "llama.cpp's LoRA GGUF has no magnitude vector, so DoRA's m would be dropped")
    if getattr(config, "tie_word_embeddings", False):
        head = output_head_names(model)
        problems += [f"{n}: LoRA on a tied output head (the base GGUF has no output.weight)"
                     for n, _, _ in layers if n in head]
    if problems:
        raise ValueError("this adapter cannot be written as a llama.cpp LoRA adapter: " + "; ".join(problems)
                         + ". Supported: LoRA on linear layers of the attention and MLP (export the merged "
                         "model instead)")
    if not layers:
        raise ValueError("the model has no active LoRA adapter to export")
    products = {round(layer.scaling[a] * layer.rank[a], 9) for _, layer, a in layers}
    uniform = len(products) == 1
    out = []
    for module_name, layer, adapter in layers:
        name = names.get_name(module_name + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise ValueError(f"module {module_name!r} has no llama.cpp tensor to apply a LoRA adapter to")
        a = layer.lora_A[adapter].weight.detach().float().cpu()
        b = layer.lora_B[adapter].weight.detach().float().cpu()
        if not uniform:
            b = b * layer.scaling[adapter]
        heads = _rotary_heads(module_name + ".", config) if arch.permute_rotary else None
        if heads:
            b = permute_rotary_rows(b, heads)
        for suffix, value in ((".lora_a", a), (".lora_b", b)):
            qtype = tensor_type(quant, tuple(value.shape))
            out.append(GGUFTensor(name + suffix, f"{module_name}{suffix}", gguf.quants.quantize(value.numpy(), qtype),
                                  qtype))
    return out, (products.pop() if uniform else 0.0)


def export_adapter(model: nn.Module, path: str | os.PathLike, quant: str = "f32",
                   name: str = "lorakit adapter") -> Path:
    """Write the model's active LoRA adapter as a llama.cpp LoRA adapter GGUF (llama.cpp --lora)."""
    gguf = _gguf()
    out = check_output_path(path)
    tensors, alpha = adapter_tensors(model, quant)

    def metadata(writer):
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    return write_gguf(out, architecture(model.config).gguf_name, metadata, tensors)


# --- the whole export, checked ---------------------------------------------------------------------

def export_merged(model: nn.Module, tokenizer, path: str | os.PathLike, quant: str = "f16",
                  check_ids: list[list[int]] | None = None, check: bool = True, name: str = "lorakit export",
                  progress: bool = False):
    """Merge the model's active adapters (if any) in float32 and write it as one GGUF file.

    With check=True (the merge check, merge_check.py) the adapter on its base is compared with the
    merged float32 model, then with the merged weights as decoded from the bytes about to be
    written, on held-out texts; beyond the tolerances (float32, then `quant`'s) nothing is
    written and MergeCheckError says why. check_ids: token ids of the held-out texts (default:
    merge_check.BUILTIN_TEXTS). Returns (path, the second MergeCheck, or None without a check).
    """
    from .inject import merge_and_unload
    from .merge_check import BUILTIN_TEXTS, check_inputs, compare, logits_of, require

    out = check_output_path(path)
    if quant not in QUANTS:
        raise ValueError(f"quant {quant!r}: valid choices are {', '.join(QUANTS)}")
    architecture(model.config)  # refuse an unsupported model before the work
    inputs = [] if not check else ([torch.tensor([ids]) for ids in check_ids] if check_ids
                                   else check_inputs(tokenizer, BUILTIN_TEXTS))
    reference = logits_of(model, inputs) if check else []
    merged = merge_and_unload(model, dtype=torch.float32).float()
    result = None
    if check:  # the merge itself, before any rounding
        require(compare(reference, logits_of(merged, inputs), "float32"))
    tensors = model_tensors(merged, quant)
    if check:  # the weights as written
        decoded = decode(tensors, merged.config)
        missing, unexpected = merged.load_state_dict(decoded, strict=False)
        assert not unexpected and all(k.endswith(("lm_head.weight", "inv_freq")) for k in missing), (missing, unexpected)
        result = require(compare(reference, logits_of(merged, inputs), quant))
    metadata = model_metadata(merged.config, tokenizer, quant, name)
    write_gguf(out, architecture(merged.config).gguf_name, metadata, tensors, progress)
    return out, result
