"""What would stop an adapter from loading in a multi-LoRA server (`lorakit inspect --serving`).

Facts, with where they come from (vLLM's source as rendered in its API docs, docs.vllm.ai):
- vllm/lora/peft_helper.py, PEFTHelper._validate_features: an adapter with modules_to_save is
  refused ("vLLM only supports modules_to_save being None"), and so is DoRA (use_dora).
- vllm/lora/peft_helper.py, PEFTHelper.bias: Literal["none"] (current docs): trained biases are
  not loaded.
- vllm/config/lora.py, LoRAConfig.max_lora_rank: default 16, one of 1, 8, 16, 32, 64, 128, 256,
  320, 512 (`--max-lora-rank`); a higher-rank adapter is refused.
SGLang and LoRAX are not covered yet.
"""

from __future__ import annotations

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_RANK = 16


def serving_problems(config: dict) -> list[str]:
    """One line per reason the adapter (its adapter_config.json as a dict) would not load, or
    would need a non-default server flag."""
    problems = []
    if config.get("modules_to_save"):
        problems.append(f"vLLM: modules_to_save {config['modules_to_save']} is refused (only None is supported); "
                        "merge the adapter (lorakit merge / lorakit export) to serve it")
    if config.get("use_dora"):
        problems.append("vLLM: DoRA adapters (use_dora) are refused")
    if config.get("bias", "none") != "none":
        problems.append(f"vLLM: bias={config['bias']!r}: trained biases are not supported (bias must be 'none')")
    ranks = [int(config.get("r", 8)), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    top = max(ranks)
    if top > VLLM_RANKS[-1]:
        problems.append(f"vLLM: rank {top} is above the largest --max-lora-rank ({VLLM_RANKS[-1]})")
    elif top > VLLM_DEFAULT_MAX_RANK:
        needed = next(r for r in VLLM_RANKS if r >= top)
        problems.append(f"vLLM: rank {top} is above the default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}; "
                        f"start vLLM with --max-lora-rank {needed}")
    return problems
