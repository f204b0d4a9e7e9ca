"""Architecture numbers of popular open model families, copied from their published `config.json` files.

The planner needs only shapes, never weights, so these presets let `lorakit plan` work without a
model hub. Each entry gives the hub id whose config the numbers come from. Parameter totals implied
by these numbers are pinned in `tests/test_planner_architecture.py` against the totals the model
cards publish. `resolve_model` turns what a user types (a preset, a path, a hub id) into an
Architecture.
"""

from __future__ import annotations

import re
from pathlib import Path

from .architecture import Architecture, arch_from_config


def _llama(name, hub_id, h, inter, layers, heads, kv, vocab, tied, head_dim=None, **kw):
    return Architecture(
        name=name, hub_id=hub_id, hidden_size=h, intermediate_size=inter, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim or h // heads, vocab_size=vocab,
        tie_embeddings=tied, **kw,
    )


_PRESETS = [
    # Llama 2: multi-head attention except 70B (GQA, 8 kv heads); 32,000-token SentencePiece vocab.
    _llama("llama-2-7b", "meta-llama/Llama-2-7b-hf", 4096, 11008, 32, 32, 32, 32000, False),
    _llama("llama-2-13b", "meta-llama/Llama-2-13b-hf", 5120, 13824, 40, 40, 40, 32000, False),
    _llama("llama-2-70b", "meta-llama/Llama-2-70b-hf", 8192, 28672, 80, 64, 8, 32000, False),
    # Llama 3.x: 128,256-token tiktoken vocab, GQA with 8 kv heads; 1B/3B tie embeddings.
    _llama("llama-3.2-1b", "meta-llama/Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128256, True),
    _llama("llama-3.2-3b", "meta-llama/Llama-3.2-3B", 3072, 8192, 28, 24, 8, 128256, True),
    _llama("llama-3.1-8b", "meta-llama/Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, False),
    _llama("llama-3.1-70b", "meta-llama/Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, False),
    _llama("llama-3.1-405b", "meta-llama/Llama-3.1-405B", 16384, 53248, 126, 128, 8, 128256, False),
    _llama("mistral-7b", "mistralai/Mistral-7B-v0.1", 4096, 14336, 32, 32, 8, 32000, False),
    # Mixtral: 8 experts of Mistral-7B's MLP shape, 2 active per token.
    _llama("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", 4096, 14336, 32, 32, 8, 32000, False,
           num_experts=8, experts_per_token=2, chunked_loss=False),
    # Qwen2.5: biases on q/k/v; up to 3B tie embeddings; vocab 151,936 (small) / 152,064 (7B+).
    _llama("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151936, True, attention_bias=True),
    _llama("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", 1536, 8960, 28, 12, 2, 151936, True, attention_bias=True),
    _llama("qwen2.5-3b", "Qwen/Qwen2.5-3B", 2048, 11008, 36, 16, 2, 151936, True, attention_bias=True),
    _llama("qwen2.5-7b", "Qwen/Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, False, attention_bias=True),
    _llama("qwen2.5-14b", "Qwen/Qwen2.5-14B", 5120, 13824, 48, 40, 8, 152064, False, attention_bias=True),
    _llama("qwen2.5-32b", "Qwen/Qwen2.5-32B", 5120, 27648, 64, 40, 8, 152064, False, attention_bias=True),
    _llama("qwen2.5-72b", "Qwen/Qwen2.5-72B", 8192, 29568, 80, 64, 8, 152064, False, attention_bias=True),
    # Gemma 2: 256,000-token vocab (tied), head_dim independent of hidden size, four norms per layer,
    # eager attention with logit soft-capping (so attention probabilities are stored: s^2 memory).
    _llama("gemma-2-2b", "google/gemma-2-2b", 2304, 9216, 26, 8, 4, 256000, True, head_dim=256,
           norms_per_layer=4, attention="eager", attn_softcap=True, final_softcap=True,
           chunked_loss=False),
    _llama("gemma-2-9b", "google/gemma-2-9b", 3584, 14336, 42, 16, 8, 256000, True, head_dim=256,
           norms_per_layer=4, attention="eager", attn_softcap=True, final_softcap=True,
           chunked_loss=False),
    _llama("gemma-2-27b", "google/gemma-2-27b", 4608, 36864, 46, 32, 16, 256000, True, head_dim=128,
           norms_per_layer=4, attention="eager", attn_softcap=True, final_softcap=True,
           chunked_loss=False),
    # Phi-3: fused qkv_proj and gate_up_proj; 32,064-token vocab.
    _llama("phi-3-mini", "microsoft/Phi-3-mini-4k-instruct", 3072, 8192, 32, 32, 32, 32064, False,
           fused_projections=True),
    _llama("phi-3-medium", "microsoft/Phi-3-medium-4k-instruct", 5120, 17920, 40, 40, 10, 32064, False,
           fused_projections=True),
    # SmolLM2: Llama architecture, 49,152-token vocab, tied embeddings.
    _llama("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, True),
    _llama("smollm2-360m", "HuggingFaceTB/SmolLM2-360M", 960, 2560, 32, 15, 5, 49152, True),
    _llama("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B", 2048, 8192, 24, 32, 32, 49152, True),
]

PRESETS: dict[str, Architecture] = {a.name: a for a in _PRESETS}

# Other names people type for the same shapes (identical architecture numbers).
ALIASES: dict[str, str] = {
    "llama-3-8b": "llama-3.1-8b",
    "llama-3-70b": "llama-3.1-70b",
    "llama-3.3-70b": "llama-3.1-70b",
    "mistral-7b-v0.1": "mistral-7b",
    "phi-3.5-mini": "phi-3-mini",
}
for _a in _PRESETS:
    ALIASES[_a.hub_id.lower()] = _a.name
ALIASES["meta-llama/meta-llama-3-8b"] = "llama-3.1-8b"
ALIASES["meta-llama/meta-llama-3-70b"] = "llama-3.1-70b"
ALIASES["meta-llama/llama-3.3-70b-instruct"] = "llama-3.1-70b"
# lorakit's default model (models.DEFAULT_MODEL): the instruct tune, same shapes as the base
ALIASES["smollm2-135m-instruct"] = "smollm2-135m"
ALIASES["huggingfacetb/smollm2-135m-instruct"] = "smollm2-135m"


def find_preset(name: str) -> Architecture | None:
    """The preset called `name` (case-insensitive; aliases and hub ids accepted), or None."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return PRESETS.get(key)


def resolve_model(model: str | Architecture | dict) -> Architecture:
    """A preset name or hub id of a preset, a local directory / config.json, or a reachable hub id."""
    if isinstance(model, Architecture):
        return model
    if isinstance(model, dict):
        return arch_from_config(model)
    preset = find_preset(model)
    if preset is not None:
        return preset
    if Path(model).exists():
        return arch_from_config(model)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        try:
            from huggingface_hub import hf_hub_download

            return arch_from_config(hf_hub_download(model, "config.json"), name=model)
        except Exception as err:  # offline, gated, missing: all mean "not reachable"
            reason = f"hub id {model!r} is not reachable ({type(err).__name__})"
    else:
        reason = f"{model!r} is neither a preset, an existing path nor a hub id"
    raise ValueError(f"model {reason}; presets: {', '.join(PRESETS)}")
