"""Which method to train with, and whether a step fits the device it is about to run on.

`recommend_method` applies the seed's rules to predicted peaks; `device_warning` is what `lorakit
train` prints when its planned step will not fit; `available_memory` is the device's memory as the
training loop reads it.
"""

from __future__ import annotations

import os
from dataclasses import replace

from ..config import METHODS
from .memory import GPUS, GiB, Plan, Recommendation, fits, predict

DEFAULT_BUDGET_GIB = 24.0
MAX_BUDGET_GIB = 1 << 20  # a GiB budget above a petabyte per GPU is a typo


def budget_problem(budget_gib) -> str | None:
    """Why `budget_gib` is not a GPU size in GiB (None when it is one)."""
    if budget_gib is None or (isinstance(budget_gib, (int, float)) and not isinstance(budget_gib, bool)
                              and 0 < budget_gib <= MAX_BUDGET_GIB):
        return None
    return (f"budget_gib (lorakit plan --gpu-gb) = {budget_gib!r} must be a number of GiB in "
            f"(0, {MAX_BUDGET_GIB:,}] (e.g. {', '.join(map(str, GPUS))})")


def _as_method(plan_: Plan, method: str) -> Plan:
    """The same step trained with `method`; QLoRA of a float32 plan computes in bfloat16."""
    dtype = "bfloat16" if method == "qlora" and plan_.config.dtype == "float32" else plan_.config.dtype
    return predict(plan_.arch, replace(plan_.config, method=method, dtype=dtype))


def recommend_method(plan_: Plan, budget_gib: float | None = None, domain_shift: bool = False) -> Recommendation:
    """The seed's rules, applied to predicted peaks on `budget_gib` per GPU (default: one 24 GiB GPU):
    full fine-tuning only for a large domain shift (and only if it fits); LoRA for models up to ~7B when
    it fits; QLoRA for 7B-70B on limited memory, i.e. whenever LoRA does not fit. DPO is never full
    fine-tuning (its reference is the model with the adapters disabled)."""
    budget = DEFAULT_BUDGET_GIB if budget_gib is None else budget_gib
    n = plan_.config.n_gpus
    # sorted: full, lora, qlora (most memory first), the order of the JSON's peaks_gib
    peaks = {m: _as_method(plan_, m).peak / GiB for m in sorted(METHODS)}
    on = f"{n} x {budget:g} GiB" if n > 1 else f"{budget:g} GiB"
    billions = plan_.total_params / 1e9
    fit = {m: peaks[m] <= budget for m in METHODS}
    if plan_.config.objective == "dpo" and domain_shift:  # its reference is the adapters switched off
        return _recommend_adapters(plan_, peaks, budget, on, billions, fit,
                                   "lorakit's DPO trains adapters only (its reference model is the model "
                                   "with them disabled; full fine-tuning would need a frozen copy); ")
    if domain_shift and fit["full"]:
        return Recommendation("full", f"a large domain shift warrants updating every weight, and full "
                              f"fine-tuning fits ({peaks['full']:.1f} of {on})", budget, peaks)
    prefix = (f"full fine-tuning would need {peaks['full']:.1f} GiB, more than {on}; " if domain_shift else "")
    return _recommend_adapters(plan_, peaks, budget, on, billions, fit, prefix)


def _recommend_adapters(plan_: Plan, peaks: dict[str, float], budget: float, on: str, billions: float,
                        fit: dict[str, bool], prefix: str) -> Recommendation:
    """LoRA when it fits (up to ~7B, or with 10% to spare), else QLoRA, with what to change when
    nothing fits; `prefix` says why full fine-tuning was not chosen."""
    if fit["lora"] and (billions < 7 or peaks["lora"] <= 0.9 * budget):
        return Recommendation("lora", prefix + f"a {billions:.1f}B model fits in 16-bit with LoRA "
                              f"({peaks['lora']:.1f} of {on}): no quantization error, faster steps than QLoRA",
                              budget, peaks)
    if fit["qlora"]:
        return Recommendation("qlora", prefix + f"LoRA on 16-bit weights needs {peaks['lora']:.1f} GiB; "
                              f"with the {billions:.1f}B base in 4-bit NF4, QLoRA needs {peaks['qlora']:.1f} "
                              f"of {on}", budget, peaks)
    qlora = _as_method(plan_, "qlora")
    more = next((k for k in (2, 4, 8, 16, 32) if fits(qlora, budget, k)), None)
    hint = f"shard over {more} GPUs" if more else "use larger GPUs"
    if not plan_.config.grad_checkpointing:
        hint += " or enable gradient checkpointing"
    return Recommendation("qlora", prefix + f"nothing fits on {on} (QLoRA needs {peaks['qlora']:.1f} GiB); "
                          f"QLoRA is the smallest: {hint}, or shorten batch x sequence", budget, peaks)


def device_warning(plan_: Plan, device_gib: float) -> str | None:
    """A warning for `lorakit train` when the planned step will not fit the device it runs on."""
    if plan_.peak <= device_gib * GiB:
        return None
    return (f"warning: the planned step needs {plan_.peak / GiB:.1f} GiB but the device has {device_gib:.1f} "
            f"GiB; try gradient checkpointing, a smaller batch or sequence, or method 'qlora' "
            f"(`lorakit plan` shows the breakdown)")


def available_memory(device) -> int:
    """Bytes the step may use on `device` (a torch.device): a CUDA device's total memory, or the
    physical memory the CPU has free now."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
