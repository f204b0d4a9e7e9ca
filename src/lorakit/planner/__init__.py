"""The memory planner: predict peak accelerator memory of one training step, and recommend full
fine-tuning, LoRA or QLoRA.

Modules, leaves first (each imports only those above it):
  architecture   Architecture (a model's shapes), arch_from_config, targeted_modules
  presets        shapes of popular models (PRESETS, find_preset), resolve_model
  memory         PlanConfig, Plan, the formulas (one function per part of the step; the objective's
                 loss term: logits_bytes for SFT, preference_logits_bytes for DPO / ORPO), fits
  recommend      recommend_method, device_warning, available_memory
  render         render_plan (what `lorakit plan` prints), memory_plan_line (what `lorakit train` logs)
  plans          plan(model, ...), plan_run(run_config, arch, ...), arch_for_run

`lorakit plan` (cli/plan.py) is a thin layer over plan_run; docs/planner.md explains the model.
"""

from ..config import METHODS
from .architecture import (
    CONFIG_RANGES,
    DEFAULT_TARGETS,
    SUPPORTED_MODEL_TYPES,
    Architecture,
    arch_from_config,
    targeted_modules,
)
from .memory import (
    CUDA_CONTEXT_BYTES,
    DEVICES,
    FRAGMENTATION,
    GPUS,
    NCCL_BYTES,
    OPTIMIZERS,
    GiB,
    Plan,
    PlanConfig,
    Recommendation,
    activation_bytes,
    fits,
    head_activation_bytes,
    layer_activation_bytes,
    logits_bytes,
    phase_bytes,
    preference_logits_bytes,
    predict,
    trainable_parameters,
)
from .plans import arch_for_run, plan, plan_config, plan_run, run_device
from .presets import PRESETS, find_preset, resolve_model
from .recommend import (
    DEFAULT_BUDGET_GIB,
    MAX_BUDGET_GIB,
    available_memory,
    device_warning,
    recommend_method,
)
from .render import memory_plan_line, render_plan

__all__ = [
    "CONFIG_RANGES", "CUDA_CONTEXT_BYTES", "DEFAULT_BUDGET_GIB", "DEFAULT_TARGETS", "DEVICES", "FRAGMENTATION",
    "GPUS", "GiB", "MAX_BUDGET_GIB", "METHODS", "NCCL_BYTES", "OPTIMIZERS", "PRESETS", "SUPPORTED_MODEL_TYPES",
    "Architecture", "Plan", "PlanConfig", "Recommendation", "activation_bytes", "arch_for_run", "arch_from_config",
    "available_memory", "device_warning", "find_preset", "fits", "head_activation_bytes", "layer_activation_bytes",
    "logits_bytes", "memory_plan_line", "phase_bytes", "plan",
    "preference_logits_bytes", "plan_config", "plan_run", "predict",
    "recommend_method", "render_plan", "resolve_model", "run_device", "targeted_modules", "trainable_parameters",
]
