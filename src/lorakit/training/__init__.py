"""Training a model: the loop (loop.train) and its parts, each in a module named after it.

    setup        the base model and its adapters, the data, the checks made before any weight is read
    objectives   what a step minimises (SFT, DPO, ORPO): batch layout, loss, item count, metrics
    evaluate     held-out loss, generation, exact match (also `lorakit eval`)
    checkpoint   save / load / resume, RunState (state.json), the last good checkpoint
    output       rank 0's sink: log lines, progress, metrics.jsonl, summary.json, loss.png
    run_dir      the run directory's checks and lock
    loop         train(): the algorithm
"""

from .loop import Hooks, train
from .objectives import SFT, Objective, dpo, objective_for, orpo
from .setup import Prepared

__all__ = ["Hooks", "Objective", "Prepared", "SFT", "dpo", "objective_for", "orpo", "train"]
