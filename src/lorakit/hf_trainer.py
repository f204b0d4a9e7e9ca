"""lorakit adapters inside transformers' Trainer and trl's SFTTrainer: save, resume, chunked loss.

    add_lora(model, LoraConfig(...))                    # on any transformers model (NF4 base too)
    trainer = Trainer(model=model, args=TrainingArguments(save_steps=...), ...,
                      compute_loss_func=ChunkedLoss(model))        # optional: the chunked loss
    trainer.train(); trainer.save_model(D)              # checkpoints and D hold PEFT adapters
    trainer.train(resume_from_checkpoint=True)          # a new process: same model + add_lora first

Saving. Trainer writes the model with `model.save_pretrained(dir, state_dict=..., is_main_process=...)`
at every checkpoint and in save_model (Trainer._save). add_lora gives a transformers model its own
`save_pretrained` (an attribute of the instance, shadowing the class's method) that writes every
adapter in PEFT's layout with adapter_io.save_adapter: "default" in `dir`, any other adapter in
`dir/<name>`, as PEFT does. Without an adapter left (merge_and_unload, delete_adapter) it is the
class's method again, writing the full model. transformers' own adapter hook (the
`_hf_peft_config_loaded` path of save_pretrained) was not used: it calls into peft.

Checkpoints vs the final save. A PiSSA/OLoRA adapter trains on a rewritten (residual) base; the
adapter to ship is converted for the original base (rank 2r, adapter_io.save_adapter's
original_base=True), and that is what save_model, model.save_pretrained and model.push_to_hub
write. A checkpoint is what Trainer resumes from: it holds the adapter as trained (rank r, its init
in adapter_config.json), which load_adapter_checkpoint copies back into a model given the same
add_lora. Both reach save_pretrained through Trainer.save_model, so lorakit wraps the methods that
write checkpoints (Trainer._save_checkpoint, _tune_save_checkpoint): inside them save_pretrained
writes the adapter as trained. For other initialisations both are the same file.

Resuming. Trainer reloads a checkpoint's weights in `Trainer._load_from_checkpoint` and
`_load_best_model`, which know full weights and peft's PeftModel, and transformers offers no hook
there: a checkpoint holding only an adapter fails with "Can't find a checkpoint index". So lorakit
wraps these two methods on transformers' Trainer class, once (if transformers.trainer is not
imported yet when add_lora runs, a one-shot import hook wraps them when it is): for a model carrying lorakit adapters and a checkpoint holding adapters, the saved
tensors are copied into the model's adapters, strictly (the same config, every tensor present,
same shapes; otherwise ValueError); everything else goes to transformers' methods unchanged.
Optimizer, scheduler, RNG and data order are restored by Trainer itself.

Chunked loss. `ChunkedLoss(model)` is a `compute_loss_func` (transformers' Trainer and trl's
SFTTrainer take one) computing the causal-LM loss with loss.causal_lm_loss from the last hidden
state, so that the (tokens, vocabulary) logits never exist, and only at the positions with a
target (a prompt masked with -100, as trl's completion-only loss masks it, costs no head product).
Trainer calls the model before the loss, so the model itself must skip its logits: a forward
pre-hook (torch's, removable) asks it, in training with gradients on, for no logits
(`logits_to_keep` an empty index) and for its hidden states, the last of which is the head's input.
In evaluation the model computes its logits as usual and the loss is transformers' own on them.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch import nn

from .adapter_io import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict, copy_into, read_adapter_config, \
    read_adapter_tensors, save_adapter
from .inject import adapter_configs, when_first_adapter_added
from .loss import CHUNKED_LOSS_MODEL_TYPES, DEFAULT_CHUNK_SIZE, causal_lm_loss, supports_chunked_loss

DEFAULT_ADAPTER = "default"  # saved at the top of the directory; other adapters in a subdirectory
# True while Trainer writes a checkpoint (wrap_trainer): save_pretrained then writes adapters as trained.
_WRITING_CHECKPOINT = contextvars.ContextVar("lorakit_writing_checkpoint", default=False)


def attach(model: nn.Module) -> None:
    """Make `model.save_pretrained` (hence Trainer's checkpoints and save_model) write PEFT adapters,
    and teach transformers' Trainer to resume from them. Called by add_lora (registered below); no-op on models that
    are not transformers PreTrainedModels."""
    modeling = sys.modules.get("transformers.modeling_utils")  # imported wherever such a model exists
    if modeling is None or not isinstance(model, modeling.PreTrainedModel):
        return
    if not isinstance(model.__dict__.get("save_pretrained"), functools.partial):
        model.save_pretrained = functools.partial(save_pretrained, model)
    wrap_trainer()


when_first_adapter_added(attach)  # add_lora calls it (inject sits below this module and does not import it)


def adapter_directory(directory: str | os.PathLike, name: str) -> Path:
    """Where adapter `name` lives in a directory written by save_pretrained (PEFT's layout)."""
    return Path(directory) if name == DEFAULT_ADAPTER else Path(directory) / name


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                    state_dict: dict | None = None, push_to_hub: bool = False, original_base: bool | None = None,
                    **kwargs) -> None:
    """transformers' save_pretrained for a model with lorakit adapters: every adapter, in PEFT's
    layout (adapter_config.json + adapter_model.safetensors), and nothing of the frozen base.

    original_base: a PiSSA/OLoRA adapter converted for the original base (rank 2r), or (False) as
    trained, to resume from. None (the default): as trained inside a Trainer checkpoint, else
    converted (see the module docstring).
    `state_dict` (Trainer passes one under model or data parallelism) must hold the adapters'
    current values; max_shard_size, safe_serialization and token do not apply to an adapter.
    """
    configs = adapter_configs(model)
    if not configs:  # merged and unloaded, or every adapter deleted: a plain model again
        return type(model).save_pretrained(model, save_directory, is_main_process=is_main_process,
                                           state_dict=state_dict, push_to_hub=push_to_hub, **kwargs)
    problems = []
    if push_to_hub:
        problems.append("push_to_hub=True: use model.push_to_hub(repo_id), which calls this save")
    if kwargs.get("variant") is not None:
        problems.append(f"variant={kwargs['variant']!r}: an adapter is always {WEIGHTS_NAME}")
    if kwargs.get("distributed_checkpoint"):
        problems.append("distributed_checkpoint=True: adapters are saved whole, by one process")
    if kwargs.get("save_peft_format") is False:
        problems.append("save_peft_format=False: lorakit writes PEFT's format only")
    if problems:
        raise ValueError("save_pretrained of a model with lorakit adapters (only the adapters are saved): "
                         + "; ".join(problems))
    if not is_main_process:
        return None
    if state_dict is not None:
        _check_state_dict_matches(model, state_dict)
    if original_base is None:
        original_base = not _WRITING_CHECKPOINT.get()
    for name in configs:
        save_adapter(model, adapter_directory(save_directory, name), name, original_base=original_base)
    return None


def _check_state_dict_matches(model: nn.Module, state_dict: dict) -> None:
    """The adapters are written from the model; a given state dict must agree with it (a gathered
    FSDP / DeepSpeed state dict whose adapters live elsewhere would otherwise be ignored)."""
    names = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    wrong = []
    for adapter in adapter_configs(model):
        for key, live in adapter_state_dict(model, adapter).items():
            own = names.get(id(live))
            given = state_dict.get(own)
            if given is None or given.shape != live.shape or not torch.equal(given.detach().cpu(),
                                                                               live.detach().cpu()):
                wrong.append(own or key)
    if wrong:
        raise ValueError(f"save_pretrained(state_dict=...): the state dict does not hold the adapters' current "
                         f"values for {', '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}; lorakit saves "
                         "adapters from the model itself (sharded FSDP / DeepSpeed ZeRO-3 training through "
                         "Trainer is not supported: use `lorakit train` for sharded training)")


def load_adapter_checkpoint(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy the adapters saved by save_pretrained in `directory` (a Trainer checkpoint: adapters as
    trained) into the model's adapters of the same names. The model must carry the same adapters (same configs: add_lora as for the saved run);
    a missing file, another config, a missing or unexpected tensor or a shape mismatch is a
    ValueError, raised before any adapter of the model is changed."""
    configs = adapter_configs(model)
    loaded = {}
    for name, config in configs.items():
        where = adapter_directory(directory, name)
        if not (where / CONFIG_NAME).is_file():
            raise ValueError(f"{directory}: no saved adapter {name!r} (expected {where / CONFIG_NAME}); "
                             f"the model's adapters: {', '.join(configs)}")
        saved = read_adapter_config(where).to_peft_dict()
        ours = config.to_peft_dict()
        differ = [f"{k}: saved {saved[k]!r}, model {ours[k]!r}" for k in sorted(ours)
                  if k != "base_model_name_or_path" and saved.get(k) != ours[k]]
        if differ:
            raise ValueError(f"{where}: adapter {name!r} was saved with another config than the model's "
                             f"({'; '.join(differ)}); call add_lora with the config of the saved run")
        loaded[name] = (where, read_adapter_tensors(where))
    for name, (where, tensors) in loaded.items():
        copy_into(model, name, tensors, where)


def _holds_adapters(directory: str | os.PathLike | None) -> bool:
    return directory is not None and (Path(directory) / CONFIG_NAME).is_file() and \
        (Path(directory) / WEIGHTS_NAME).is_file()


class AfterImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook: `callback(module)` right after module `name` first runs. It finds
    nothing itself: it takes itself off sys.meta_path, asks the other finders for the module's
    spec, and has that spec's loader call back once the module's code has run."""

    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            self.callback(module)

        spec.loader.exec_module = exec_module  # this spec's own loader object
        return spec


def writes_checkpoints(method):
    """`method` (a Trainer method that writes a checkpoint) with save_pretrained writing adapters as
    trained while it runs."""

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        token = _WRITING_CHECKPOINT.set(True)
        try:
            return method(*args, **kwargs)
        finally:
            _WRITING_CHECKPOINT.reset(token)

    return wrapped


def wrap_trainer() -> None:
    """Wrap transformers' Trainer._load_from_checkpoint and _load_best_model, and the methods that
    write checkpoints (_save_checkpoint, _tune_save_checkpoint; see the module docstring), once:
    now if transformers.trainer is imported, else when it is."""
    module = sys.modules.get("transformers.trainer")
    if module is None:
        if not any(isinstance(f, AfterImport) and f.name == "transformers.trainer" for f in sys.meta_path):
            sys.meta_path.insert(0, AfterImport("transformers.trainer", lambda _: wrap_trainer()))
        return
    trainer = getattr(module, "Trainer", None)
    if trainer is None or getattr(trainer, "_lorakit_resumes_adapters", False):
        return

    load_checkpoint = trainer._load_from_checkpoint
    load_best = trainer._load_best_model

    @functools.wraps(load_checkpoint)
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not (adapter_configs(target) and _holds_adapters(resume_from_checkpoint)):
            return load_checkpoint(self, resume_from_checkpoint, model)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError("resuming lorakit adapters under FSDP or DeepSpeed through Trainer is not "
                             "supported; use `lorakit train` for sharded training")
        load_adapter_checkpoint(target, resume_from_checkpoint)

    @functools.wraps(load_best)
    def _load_best_model(self):
        target = self.accelerator.unwrap_model(self.model)
        if not (adapter_configs(target) and _holds_adapters(self.state.best_model_checkpoint)):
            return load_best(self)
        load_adapter_checkpoint(target, self.state.best_model_checkpoint)

    trainer._load_from_checkpoint = _load_from_checkpoint
    trainer._load_best_model = _load_best_model
    for name in ("_save_checkpoint", "_tune_save_checkpoint"):
        if hasattr(trainer, name):
            setattr(trainer, name, writes_checkpoints(getattr(trainer, name)))
    trainer._lorakit_resumes_adapters = True


class ChunkedLoss:
    """A `compute_loss_func` for transformers' Trainer (and trl's SFTTrainer): transformers'
    causal-LM loss, computed in chunks of tokens from the last hidden state (loss.py).

        trainer = Trainer(model=model, ..., compute_loss_func=ChunkedLoss(model))

    While the model trains with gradients on, a forward pre-hook asks it for no logits (its
    `logits.shape[1]` is 0) and for its hidden states; `remove()` takes the hook off.
    """

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE):
        import inspect

        if not supports_chunked_loss(model):
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            raise ValueError(f"ChunkedLoss: model type {model_type!r} with output head {type(head).__name__} is "
                             "not supported: the chunked loss needs a plain nn.Linear head applied to the last "
                             f"hidden state (model types: {', '.join(CHUNKED_LOSS_MODEL_TYPES)}); leave "
                             "compute_loss_func unset to use transformers' loss")
        if "logits_to_keep" not in inspect.signature(type(model).forward).parameters:
            raise ValueError(f"ChunkedLoss: {type(model).__name__}.forward takes no `logits_to_keep`, so it "
                             "cannot skip its logits (transformers >= 4.50 has it); leave compute_loss_func "
                             "unset to use transformers' loss")
        self.model, self.chunk_size = model, chunk_size
        self._hook = model.register_forward_pre_hook(self._skip_logits, with_kwargs=True)
        wrap_trainer()

    @staticmethod
    def _skip_logits(module, args, kwargs):
        if not (module.training and torch.is_grad_enabled()) or kwargs.get("labels") is not None \
                or "logits_to_keep" in kwargs:
            return None
        device = module.get_input_embeddings().weight.device
        empty = torch.empty(0, dtype=torch.long, device=device)  # keep no position: logits (B, 0, V)
        return args, {**kwargs, "logits_to_keep": empty, "output_hidden_states": True}

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        if labels is None:
            raise ValueError("ChunkedLoss: the batch has no labels (the loss needs them)")
        logits = outputs["logits"]
        if logits.shape[1] != 0:  # the model made its logits (evaluation): transformers' loss on them
            from transformers.loss.loss_utils import ForCausalLMLoss

            return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)
        hidden = outputs["hidden_states"][-1]  # (B, T, d): the input of the output head
        head = self.model.get_output_embeddings()
        return causal_lm_loss(hidden, head.weight, labels, head.bias, num_items_in_batch,
                              chunk_size=self.chunk_size)

    def remove(self) -> None:
        """Take the pre-hook off: the model computes its logits in training again."""
        self._hook.remove()
