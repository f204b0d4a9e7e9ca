"""What would stop an adapter from loading, or from being served as trained, in the common
multi-LoRA servers (`lorakit inspect --serving`): vLLM, SGLang and LoRAX.

Each rule reads the adapter's adapter_config.json (PEFT's keys) and says what the server does
with it. Facts, with where they come from:

vLLM (its source as rendered in its API docs, https://docs.vllm.ai):
- vllm/lora/peft_helper.py, PEFTHelper._validate_features: an adapter with modules_to_save is
  refused ("vLLM only supports modules_to_save being None"), and so is DoRA (use_dora).
- vllm/lora/peft_helper.py, PEFTHelper.bias: Literal["none"] (current docs): trained biases are
  not loaded.
- vllm/config/lora.py, LoRAConfig.max_lora_rank: default 16, one of 1, 8, 16, 32, 64, 128, 256,
  320, 512 (`--max-lora-rank`); a higher-rank adapter is refused.

SGLang (docs https://docs.sglang.io/advanced_features/lora.html; source of sglang 0.5.23 on PyPI,
https://github.com/sgl-project/sglang/tree/main/python/sglang/srt/lora):
- lora_manager.py, LoRAManager.validate_new_adapter: DoRA adapters are refused ("LoRA serving
  currently doesn't support DoRA adapters").
- lora_manager.py, LoRAManager.init_lora_shapes: target_modules given as one string must be
  "all" or "all-linear" (else "SGLang does not recognize target_modules=...").
- lora.py, LoRAAdapter: one scale lora_alpha / r for the whole adapter. rank_pattern,
  alpha_pattern and use_rslora (alpha / sqrt(r)) are not read, so modules they change are served
  with the wrong scale. (--max-lora-rank is inferred from --lora-paths when not given: no rule.)

LoRAX (docs https://loraexchange.ai/models/adapters/lora; source
https://github.com/predibase/lorax/blob/main/server/lorax_server/adapters/lora.py):
- LoraConfig.load reads only r, target_modules, fan_in_fan_out, lora_alpha and use_rslora;
  LoraConfig.map_weights_for_model takes only the lora_A / lora_B tensors. So DoRA's magnitudes,
  modules_to_save, trained biases and rank_pattern / alpha_pattern are dropped without an error:
  the adapter loads and answers differently from the one trained.
- docs, "Supported Target Modules": for Llama, Mistral and Qwen2 q_proj, k_proj, v_proj, o_proj,
  gate_proj, up_proj, down_proj and lm_head; other targets are ignored with a warning.
"""

from __future__ import annotations

SERVERS = ("vLLM", "SGLang", "LoRAX")

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_RANK = 16
LORAX_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def serving_problems(config: dict) -> list[str]:
    """One line per reason the adapter (its adapter_config.json as a dict) would not load, would
    need a non-default server flag, or would be served differently from how it was trained."""
    return vllm_problems(config) + sglang_problems(config) + lorax_problems(config)


def vllm_problems(config: dict) -> list[str]:
    problems = []
    if config.get("modules_to_save"):
        problems.append(f"vLLM: modules_to_save {config['modules_to_save']} is refused (only None is supported); "
                        "merge the adapter (lorakit merge / lorakit export) to serve it")
    if config.get("use_dora"):
        problems.append("vLLM: DoRA adapters (use_dora) are refused")
    if config.get("bias", "none") != "none":
        problems.append(f"vLLM: bias={config['bias']!r}: trained biases are not supported (bias must be 'none')")
    top = max(ranks(config))
    if top > VLLM_RANKS[-1]:
        problems.append(f"vLLM: rank {top} is above the largest --max-lora-rank ({VLLM_RANKS[-1]})")
    elif top > VLLM_DEFAULT_MAX_RANK:
        needed = next(r for r in VLLM_RANKS if r >= top)
        problems.append(f"vLLM: rank {top} is above the default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}; "
                        f"start vLLM with --max-lora-rank {needed}")
    return problems


def sglang_problems(config: dict) -> list[str]:
    problems = []
    if config.get("use_dora"):
        problems.append("SGLang: DoRA adapters (use_dora) are refused")
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets not in ("all", "all-linear"):
        problems.append(f"SGLang: target_modules {targets!r} (a pattern) is refused: it reads a list of module "
                        "names, or 'all' / 'all-linear'")
    if config.get("use_rslora"):
        problems.append(f"SGLang: use_rslora is not read: every module would be served with scale lora_alpha/r "
                        f"instead of lora_alpha/sqrt(r) (sqrt({config.get('r', 8)}) times too small)")
    elif wrongly_scaled(config):
        problems.append(f"SGLang: rank_pattern/alpha_pattern are not read (one scale lora_alpha/r): "
                        f"{', '.join(wrongly_scaled(config))} would be served with the wrong scale")
    return problems


def lorax_problems(config: dict) -> list[str]:
    dropped = []
    if config.get("use_dora"):
        dropped.append("DoRA's magnitude vectors (use_dora)")
    if config.get("modules_to_save"):
        dropped.append(f"modules_to_save {config['modules_to_save']}")
    if config.get("bias", "none") != "none":
        dropped.append(f"trained biases (bias={config['bias']!r})")
    if wrongly_scaled(config):
        dropped.append(f"the rank_pattern/alpha_pattern scales of {', '.join(wrongly_scaled(config))}")
    problems = [f"LoRAX: loads the adapter but ignores {', '.join(dropped)}: it would answer differently from "
                "the adapter trained"] if dropped else []
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)):
        ignored = sorted({t.rsplit(".", 1)[-1] for t in targets} - set(LORAX_TARGETS))
        if ignored:
            problems.append(f"LoRAX: target modules {', '.join(ignored)} are ignored (with a warning) on Llama, "
                            f"Mistral and Qwen2; supported: {', '.join(LORAX_TARGETS)}")
    return problems


def ranks(config: dict) -> list[int]:
    """r and every rank_pattern rank."""
    return [int(config.get("r", 8)), *(int(r) for r in (config.get("rank_pattern") or {}).values())]


def scale(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's scale of B A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / rank ** 0.5 if rslora else alpha / rank


def wrongly_scaled(config: dict) -> list[str]:
    """The rank_pattern / alpha_pattern keys whose modules' scale differs from the adapter's one
    scale (lora_alpha, r): what a server that reads only lora_alpha and r gets wrong."""
    r, alpha, rslora = int(config.get("r", 8)), float(config.get("lora_alpha", 8)), bool(config.get("use_rslora"))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    return sorted(key for key in {*rank_pattern, *alpha_pattern}
                  if abs(scale(float(alpha_pattern.get(key, alpha)), int(rank_pattern.get(key, r)), rslora)
                         - scale(alpha, r, rslora)) > 1e-9 * scale(alpha, r, rslora))
