"""lorakit adapters trained by transformers' Trainer and trl's SFTTrainer (lorakit.hf_trainer):
checkpoints and save_model hold PEFT adapters that reload exactly (lorakit and peft), resuming
gives the uninterrupted run's losses, and ChunkedLoss gives transformers' loss and gradients."""

import copy
import math
import shutil

import pytest
import torch
from conftest import char_tokenizer, tiny_llama

from lorakit import LoraConfig, add_lora, load_adapter, merge_and_unload, save_adapter
from lorakit.hf_trainer import ChunkedLoss

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
from transformers import Trainer, TrainingArguments  # noqa: E402

CONFIG = LoraConfig(r=4, alpha=8, dropout=0.1, targets="all-linear", init="default")
FULL_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def lora_model(seed=0, vocab=96, config=CONFIG):
    model = tiny_llama(vocab=vocab)
    torch.manual_seed(seed)  # the adapters' initial A: a resumed run must not depend on it
    return add_lora(model, config)


def token_dataset(rows=12, length=10, vocab=96, labels=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (rows, length), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, **({"labels": ids} if labels else {})})


def arguments(out, cls=TrainingArguments, **kwargs):
    defaults = dict(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=2,
                    learning_rate=2e-2, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=3)
    return cls(**{**defaults, **kwargs})


def losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_trainer_checkpoints_and_save_model_hold_peft_adapters_that_reload_exactly(tmp_path, tokens):
    peft = pytest.importorskip("peft")
    model = lora_model()
    trainer = Trainer(model=model, args=arguments(tmp_path / "run", max_steps=4), train_dataset=token_dataset())
    trainer.train()
    trainer.save_model(tmp_path / "final")
    save_adapter(model, tmp_path / "reference")
    reference = (tmp_path / "reference" / "adapter_model.safetensors").stat().st_size
    for where in (tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4", tmp_path / "final"):
        assert (where / "adapter_config.json").is_file()
        assert not any((where / f).exists() for f in FULL_WEIGHTS)
        assert abs((where / "adapter_model.safetensors").stat().st_size - reference) <= 1024
    assert (tmp_path / "run/checkpoint-4/adapter_model.safetensors").read_bytes() == \
        (tmp_path / "reference/adapter_model.safetensors").read_bytes()
    assert (tmp_path / "run/checkpoint-2/adapter_model.safetensors").read_bytes() != \
        (tmp_path / "reference/adapter_model.safetensors").read_bytes()  # it trained in between

    trained = logits(model, tokens)
    assert not torch.allclose(trained, logits(tiny_llama(), tokens), atol=1e-3)
    torch.testing.assert_close(logits(load_adapter(tiny_llama(), tmp_path / "final"), tokens), trained,
                               rtol=0, atol=1e-6)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "final")
    torch.testing.assert_close(logits(theirs, tokens), trained, rtol=0, atol=1e-6)

    model.save_pretrained(tmp_path / "direct")  # the model's own save_pretrained: the same adapter
    assert sorted(p.name for p in (tmp_path / "direct").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    assert (tmp_path / "direct/adapter_model.safetensors").read_bytes() == \
        (tmp_path / "reference/adapter_model.safetensors").read_bytes()


def test_trainer_resume_gives_the_uninterrupted_losses(tmp_path):
    out = tmp_path / "run"
    uninterrupted = Trainer(model=lora_model(), args=arguments(out), train_dataset=token_dataset())
    uninterrupted.train()
    expected = losses(uninterrupted)
    assert sorted(expected) == [1, 2, 3, 4]
    assert not any((out / "checkpoint-2" / f).exists() for f in FULL_WEIGHTS)  # the adapter alone resumes
    shutil.rmtree(out / "checkpoint-4")  # as if killed during step 3

    model = lora_model(seed=7)  # other initial adapters: the checkpoint's must replace them
    resumed = Trainer(model=model, args=arguments(out), train_dataset=token_dataset())
    resumed.train(resume_from_checkpoint=True)
    got = losses(resumed)  # steps 1-2 come from the checkpoint's trainer_state.json
    assert sorted(got) == [1, 2, 3, 4] and resumed.state.global_step == 4
    for step in got:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    final = uninterrupted.model.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=1e-6)



def test_pissa_checkpoints_hold_the_trained_adapter_and_save_model_the_one_for_the_original_base(tmp_path, tokens):
    """Checkpoints (what Trainer resumes from) hold the adapter as trained, rank r on the residual
    base; save_model writes it converted for the original base (rank 2r), the one to ship."""
    import json

    from lorakit.adapter_io import read_adapter_tensors

    pissa = CONFIG.replace(init="pissa")
    out = tmp_path / "run"
    model = lora_model(config=pissa)
    uninterrupted = Trainer(model=model, args=arguments(out), train_dataset=token_dataset())
    uninterrupted.train()
    expected = losses(uninterrupted)
    assert sorted(expected) == [1, 2, 3, 4]
    for step in (2, 4):
        saved = json.loads((out / f"checkpoint-{step}" / "adapter_config.json").read_text())
        assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (4, 8, "pissa")
    save_adapter(model, tmp_path / "as_trained", original_base=False)
    assert (out / "checkpoint-4/adapter_model.safetensors").read_bytes() == \
        (tmp_path / "as_trained/adapter_model.safetensors").read_bytes()

    trained = logits(model, tokens)
    uninterrupted.save_model(tmp_path / "final")
    final = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert (final["r"], final["lora_alpha"], final["init_lora_weights"]) == (8, 16, True)
    a = read_adapter_tensors(tmp_path / "final")["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.shape == (8, 32)
    # applies to the original base (not the residual one the model trained on)
    torch.testing.assert_close(logits(load_adapter(tiny_llama(), tmp_path / "final"), tokens), trained,
                               rtol=0, atol=1e-5)

    shutil.rmtree(out / "checkpoint-4")  # as if killed during step 3
    resumed_model = lora_model(seed=7, config=pissa)
    resumed = Trainer(model=resumed_model, args=arguments(out), train_dataset=token_dataset())
    resumed.train(resume_from_checkpoint=True)
    got = losses(resumed)
    assert sorted(got) == [1, 2, 3, 4] and resumed.state.global_step == 4
    for step in got:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    state = model.state_dict()
    for key, value in resumed_model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=1e-6)

def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path):
    from lorakit.adapter_io import adapter_state_dict, read_adapter_tensors

    model = lora_model()
    args = arguments(tmp_path / "run", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                     metric_for_best_model="loss", greater_is_better=True)  # "best": the earlier checkpoint
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(), eval_dataset=token_dataset(rows=4))
    trainer.train()
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert evals[2] > evals[4]
    assert trainer.state.best_model_checkpoint == str(tmp_path / "run" / "checkpoint-2")
    saved = read_adapter_tensors(trainer.state.best_model_checkpoint)
    live = adapter_state_dict(model)
    assert saved.keys() == live.keys() and len(saved) == 28
    for key, value in saved.items():
        assert torch.equal(live[key].detach(), value), key


def test_after_import_calls_back_once_the_module_has_run(tmp_path, monkeypatch):
    """The hook that wraps Trainer when transformers.trainer is imported after add_lora."""
    import sys

    from lorakit.hf_trainer import AfterImport

    (tmp_path / "lorakit_probe_module.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = AfterImport("lorakit_probe_module", lambda module: seen.append(module.VALUE + 1))
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    import lorakit_probe_module  # noqa: F401

    assert seen == [42] and hook not in sys.meta_path
    monkeypatch.delitem(sys.modules, "lorakit_probe_module")


def test_resume_refuses_an_adapter_saved_with_another_config(tmp_path):
    out = tmp_path / "run"
    Trainer(model=lora_model(), args=arguments(out, max_steps=2), train_dataset=token_dataset()).train()
    other = Trainer(model=lora_model(config=CONFIG.replace(alpha=16)), args=arguments(out, max_steps=4),
                    train_dataset=token_dataset())
    with pytest.raises(ValueError, match=r"saved with another config than the model's \(lora_alpha: saved 8, "
                                         r"model 16\)"):
        other.train(resume_from_checkpoint=True)


def test_qlora_base_trained_by_trainer_saves_adapters_only(tmp_path, tokens):
    from lorakit.models import load_model
    from lorakit.nf4 import NF4Linear

    tiny_llama().save_pretrained(tmp_path / "base")
    char_tokenizer().save_pretrained(tmp_path / "base")
    model, _ = load_model(tmp_path / "base", quantize="nf4")
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 14
    add_lora(model, CONFIG)
    trainer = Trainer(model=model, args=arguments(tmp_path / "run", max_steps=2), train_dataset=token_dataset())
    trainer.train()
    where = tmp_path / "run" / "checkpoint-2"
    assert sorted(p.name for p in where.iterdir() if "adapter" in p.name or "model" in p.name) == \
        ["adapter_config.json", "adapter_model.safetensors"]
    fresh, _ = load_model(tmp_path / "base", quantize="nf4")
    torch.testing.assert_close(logits(load_adapter(fresh, where), tokens), logits(model, tokens), rtol=0, atol=1e-6)


def test_save_pretrained_without_adapters_and_with_a_stale_state_dict(tmp_path):
    model = lora_model()
    with pytest.raises(ValueError, match=r"does not hold the adapters' current values for "
                                         r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.default\.weight"):
        stale = {k: v.clone() for k, v in model.state_dict().items()}
        stale["model.layers.0.self_attn.q_proj.lora_A.default.weight"] += 1
        model.save_pretrained(tmp_path / "stale", state_dict=stale)
    assert not (tmp_path / "stale" / "adapter_model.safetensors").exists()
    merge_and_unload(model).save_pretrained(tmp_path / "merged")  # a plain model again: full weights
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_save_pretrained_writes_every_adapter_in_peft_layout_and_a_copy_saves_its_own(tmp_path, tokens):
    from lorakit.hf_trainer import load_adapter_checkpoint

    model = add_lora(lora_model(), CONFIG.replace(r=2, targets=["v_proj"]), name="second")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if ".lora_B." in name:
                p.add_(0.1)
    twin.save_pretrained(tmp_path / "twin")
    assert sorted(str(p.relative_to(tmp_path / "twin")) for p in (tmp_path / "twin").rglob("*")) == [
        "adapter_config.json", "adapter_model.safetensors",
        "second", "second/adapter_config.json", "second/adapter_model.safetensors"]
    assert not torch.equal(logits(model, tokens), logits(twin, tokens))
    load_adapter_checkpoint(model, tmp_path / "twin")  # both adapters: the copy's values, not the original's
    for (name, ours), theirs in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_an_adapter_directory_never_loads_as_a_model_with_random_weights(tmp_path):
    model = lora_model()
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(OSError):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")


# --- the chunked loss --------------------------------------------------------------------------

def _loss_and_grads(trainer, batch, num_items):
    model = trainer.model
    model.train()
    model.zero_grad()
    torch.manual_seed(11)  # the same dropout draws for both losses
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("num_items", [None, 37])
def test_chunked_loss_gives_transformers_loss_and_gradients(tmp_path, num_items):
    ids = torch.randint(3, 96, (3, 16), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    batch = {"input_ids": ids, "labels": labels}
    model = lora_model()
    plain = Trainer(model=model, args=arguments(tmp_path / "a"))
    chunked_model = copy.deepcopy(model)
    chunked = Trainer(model=chunked_model, args=arguments(tmp_path / "b"),
                      compute_loss_func=ChunkedLoss(chunked_model, chunk_size=7))
    want, want_grads = _loss_and_grads(plain, batch, num_items)
    got, got_grads = _loss_and_grads(chunked, batch, num_items)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(got_grads) == 28
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=0, atol=1e-5)
    chunked_model.train()
    assert chunked_model(ids).logits.shape == (3, 0, 96)  # in training the model skipped its logits
    chunked_model.eval()
    assert chunked_model(ids).logits.shape == (3, 16, 96)


def test_trainer_with_chunked_loss_trains_and_evaluates_as_transformers_loss(tmp_path):
    runs = {}
    for name in ("plain", "chunked"):
        model = lora_model()
        trainer = Trainer(model=model, args=arguments(tmp_path / name, max_steps=3, gradient_accumulation_steps=2,
                                                      save_strategy="no"),
                          train_dataset=token_dataset(), eval_dataset=token_dataset(rows=4),
                          compute_loss_func=ChunkedLoss(model) if name == "chunked" else None)
        trainer.train()
        runs[name] = (losses(trainer), trainer.evaluate()["eval_loss"])
    (want, want_eval), (got, got_eval) = runs["plain"], runs["chunked"]
    assert sorted(got) == [1, 2, 3]
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5)
    assert got_eval == pytest.approx(want_eval, abs=1e-5)


def test_chunked_loss_refuses_a_model_it_cannot_skip_the_logits_of():
    model = tiny_llama()
    add_lora(model, LoraConfig(r=2, targets=["q_proj", "lm_head"]))  # the head itself carries an adapter
    with pytest.raises(ValueError, match="with output head LoraLinear is not supported"):
        ChunkedLoss(model)


# --- trl's SFTTrainer --------------------------------------------------------------------------

def test_sft_trainer_saves_adapters_and_resumes_with_the_uninterrupted_losses(tmp_path, tokens):
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    data = token_dataset(vocab=100, labels=False)

    def sft(model, out, **kwargs):
        args = arguments(out, cls=trl.SFTConfig, bf16=False, **kwargs)
        return trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=char_tokenizer())

    out = tmp_path / "run"
    uninterrupted = sft(lora_model(vocab=100), out)
    uninterrupted.train()
    expected = losses(uninterrupted)
    for step in (2, 4):
        assert sorted(p.name for p in (out / f"checkpoint-{step}").glob("*model*")) == ["adapter_model.safetensors"]
    ids = tokens.clamp(max=99)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(vocab=100), out / "checkpoint-4")
    torch.testing.assert_close(logits(peft_model, ids), logits(uninterrupted.model, ids), rtol=0, atol=1e-6)

    shutil.rmtree(out / "checkpoint-4")
    resumed = sft(lora_model(seed=7, vocab=100), out)
    resumed.train(resume_from_checkpoint=True)
    got = losses(resumed)  # steps 1-2 come from the checkpoint's trainer_state.json
    assert sorted(got) == [1, 2, 3, 4] and resumed.state.global_step == 4
    for step in got:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


def test_chunked_loss_in_sft_trainer_gives_trls_losses(tmp_path):
    """Without dropout: with a compute_loss_func, trl runs the model a second time (for its
    metrics), which draws other dropout masks for the next step."""
    trl = pytest.importorskip("trl")
    data = token_dataset(vocab=100, labels=False)
    runs = {}
    for name in ("trl", "chunked"):
        model = lora_model(vocab=100, config=CONFIG.replace(dropout=0.0))
        args = arguments(tmp_path / name, cls=trl.SFTConfig, bf16=False, save_strategy="no", max_steps=2)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=char_tokenizer(),
                                 compute_loss_func=ChunkedLoss(model) if name == "chunked" else None)
        trainer.train()
        runs[name] = losses(trainer)
    assert sorted(runs["chunked"]) == [1, 2]
    for step, value in runs["chunked"].items():
        assert value == pytest.approx(runs["trl"][step], abs=1e-5), step


def test_sft_trainer_with_its_default_bf16_autocast_trains_the_adapters(tmp_path):
    """SFTConfig turns bf16 autocast on by default; the adapters train under it (the fused update
    failed there with "mat1 and mat2 must have the same dtype"), and only they change."""
    trl = pytest.importorskip("trl")
    data = token_dataset(vocab=100, labels=False)
    model = lora_model(vocab=100, config=CONFIG.replace(dropout=0.0))
    args = arguments(tmp_path / "run", cls=trl.SFTConfig, save_strategy="no", max_steps=2)
    assert args.bf16
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=char_tokenizer())
    trainer.train()
    assert sorted(losses(trainer)) == [1, 2] and all(math.isfinite(v) for v in losses(trainer).values())
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all(".lora_B." in n or ".lora_A." in n for n in changed)
