"""Deprecated: the training loop moved to the package lorakit.training (loop, setup, objectives,
evaluate, checkpoint, output, run_dir). These names are re-exported from there until the last
importers have moved; import them from lorakit.training.<module> instead."""

from .loss import SummedLoss, supervised_tokens
from .training.checkpoint import (CHECKPOINTS_KEPT, RESUME_MAY_CHANGE, check_resume, checkpoints, load_checkpoint,
                                  restore_good_checkpoint, run_settings, save_checkpoint, save_result,
                                  temporary_checkpoints)
from .training.evaluate import evaluate, evaluate_run, exact_match_accuracy, generate, heldout_loss
from .training.loop import Hooks, train
from .training.output import before_after_table
from .training.run_dir import LOCK_NAME, check_run_dir, run_lock
from .training.setup import (Prepared, check_data, check_rank, load_base, load_data, lr_lambda, memory_check,
                             prepare_model, skeleton)

__all__ = ["CHECKPOINTS_KEPT", "Hooks", "LOCK_NAME", "Prepared", "RESUME_MAY_CHANGE", "SummedLoss",
           "before_after_table", "check_data", "check_rank", "check_resume", "check_run_dir", "checkpoints",
           "evaluate", "evaluate_run", "exact_match_accuracy", "generate", "heldout_loss", "load_base",
           "load_checkpoint", "load_data", "lr_lambda", "memory_check", "prepare_model", "restore_good_checkpoint",
           "run_lock", "run_settings", "save_checkpoint", "save_result", "skeleton", "supervised_tokens",
           "temporary_checkpoints", "train"]
