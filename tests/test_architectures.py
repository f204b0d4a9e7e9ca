"""Every decoder family transformers ships that users fine-tune, built tiny from its config: LoRA
(all-linear), a training step, merge, peft interop, QLoRA from a save_pretrained checkpoint and
the planner's counts, one parametrized test. A family transformers cannot build fails here
with the reason; none is skipped.

Mixture-of-experts models keep their expert weights as 3-D parameters (transformers 5), which
all-linear does not adapt (it warns); lora.target_parameters adapts them, per expert as peft does
(test_mixture_of_experts_lora_on_experts, tests/test_moe_lora.py); QLoRA stores them in NF4.
"""

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig, add_lora
from lorakit.adapter_io import adapter_state_dict, load_adapter, save_adapter
from lorakit.inject import merge, trainable_parameters
from lorakit.layer import LoraLayer
from lorakit.models import CheckpointLoader, load_quantized
from lorakit.nf4 import NF4Linear, dequantize, nf4_weights
from lorakit.planner import arch_from_config
from lorakit.planner.memory import PlanConfig, quantized_parameters
from lorakit.planner.memory import trainable_parameters as planned_trainable
from lorakit.surgery import expert_parameters

VOCAB = 96
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts_per_tok=2)

# model_type -> config overrides (DECODER's sizes unless the family names its own)
TINY = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": dict(head_dim=8),
    "gemma2": dict(head_dim=8),
    "gemma3_text": dict(head_dim=8),
    "phi3": {},
    "olmo2": {},
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64),
    "falcon": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "mixtral": dict(num_local_experts=4, **MOE),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, **MOE),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=32, head_dim=8, **MOE),
    "gpt_oss": dict(num_local_experts=4, head_dim=8, layer_types=["sliding_attention", "full_attention"], **MOE),
}
OWN_SIZES = {"gpt2", "gpt_neox", "falcon"}  # configs whose size keys differ from DECODER's


def tiny_model(model_type: str, seed: int = 0):
    """The family's causal LM with random weights (seeded), in eval mode."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    kwargs = dict(TINY[model_type]) if model_type in OWN_SIZES else {**DECODER, **TINY[model_type]}
    config = CONFIG_MAPPING[model_type](**kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def adapted(model) -> set[str]:
    """Names of LoRA-wrapped modules relative to the base model (lorakit's or peft's)."""
    return {name.removeprefix("base_model.model.") for name, m in model.named_modules()
            if isinstance(m, (LoraLayer, peft.tuners.lora.LoraLayer))}


def with_dequantized_weights(model, quantized):
    """`model` (float) with every weight that `quantized` holds in NF4 replaced by its dequantization."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, state in nf4_weights(quantized).items():
            owner, _, leaf = name.rpartition(".")
            module = reference.get_submodule(owner)
            weight = dequantize(state, torch.float32)
            getattr(module, leaf).copy_(weight.T if isinstance(module, Conv1D) else weight)
    return reference


@pytest.mark.parametrize("model_type", list(TINY))
def test_architecture(model_type, tmp_path, tokens):
    base = tiny_model(model_type)  # builds, or the test fails naming what transformers said
    base.save_pretrained(tmp_path / "base")
    expected = logits(base, tokens)

    # LoRA on every linear layer but the head; MoE expert weights (3-D parameters) are left out
    model = add_lora(tiny_model(model_type), LoraConfig(r=4, alpha=8, targets="all-linear", init="random"))
    linears = {n for n, m in base.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    head = {n for n, m in base.named_modules() if m is base.get_output_embeddings()}
    assert adapted(model) == linears - head
    assert not any("experts" in name for name in adapted(model))  # experts: no nn.Linear in transformers 5

    # one training step: a finite loss, gradients on the adapters only
    model.train()
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n for n in with_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B" in n)
    model.eval()

    # merge: the merged model computes what the adapted one did
    unmerged = logits(model, tokens)
    assert not torch.allclose(unmerged, expected)  # init="random": B != 0, the adapters change the logits
    merge(model)
    torch.testing.assert_close(logits(model, tokens), unmerged, rtol=1e-5, atol=1e-5)

    # peft loads lorakit's adapter: the same modules, the same logits
    ours = add_lora(tiny_model(model_type), LoraConfig(r=4, alpha=8, targets="all-linear", init="random"))
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(tiny_model(model_type), tmp_path / "adapter").eval()
    assert adapted(theirs) == adapted(ours)
    torch.testing.assert_close(logits(theirs, tokens), logits(ours, tokens), rtol=1e-5, atol=1e-5)

    # lorakit loads peft's own adapter (peft's all-linear, random B; on MoE models peft adds the
    # router and the experts as target_parameters): the same tensors, the same logits
    torch.manual_seed(1)
    made_by_peft = peft.get_peft_model(tiny_model(model_type), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)).eval()
    made_by_peft.save_pretrained(tmp_path / "peft_adapter")
    loaded = load_adapter(tiny_model(model_type), tmp_path / "peft_adapter")
    assert adapter_state_dict(loaded).keys() == load_file(tmp_path / "peft_adapter" / "adapter_model.safetensors").keys()
    torch.testing.assert_close(logits(loaded, tokens), logits(made_by_peft, tokens), rtol=1e-5, atol=1e-5)

    # QLoRA from the save_pretrained checkpoint: NF4 linears (head excepted) and experts, computing
    # as the float model with those weights dequantized; unquantized, exactly from_pretrained's
    qlora = load_quantized(tmp_path / "base")
    nf4 = nf4_weights(qlora)
    quantized_linears = {n for n, m in qlora.named_modules() if isinstance(m, NF4Linear)}
    assert quantized_linears == linears - head
    experts = {f"{m}.{leaf}" for m, leaf in expert_parameters(base)}
    assert nf4.keys() == {f"{n}.weight" for n in quantized_linears} | experts
    torch.testing.assert_close(logits(qlora, tokens), logits(with_dequantized_weights(base, qlora), tokens),
                               rtol=1e-5, atol=1e-5)
    from transformers import AutoModelForCausalLM

    loader = CheckpointLoader(tmp_path / "base")  # part by part, as FSDP start-up reads it
    for name, module in loader.model.named_modules():
        if name.rsplit(".", 1)[-1].isdigit():
            loader.fill(module)
    loader.fill()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert torch.equal(logits(loader.model.eval(), tokens), logits(reference, tokens))

    # the planner's counts are the model's: trainable (LoRA r=4 all-linear), quantized, total
    arch = arch_from_config(base.config.to_dict())
    assert arch.num_parameters() == sum(p.numel() for p in base.parameters())
    lora = PlanConfig(method="lora", rank=4, targets="all-linear")
    assert planned_trainable(arch, lora) == trainable_parameters(ours).trainable
    assert quantized_parameters(arch, PlanConfig(method="qlora")) == sum(s.numel for s in nf4.values())


@pytest.mark.parametrize("model_type", [t for t in TINY if "num_experts_per_tok" in TINY[t]])  # the MoE rows
def test_mixture_of_experts_lora_on_experts(model_type, tmp_path, tokens):
    """all-linear plus the experts (target_parameters): peft loads the adapter with the same
    wrapped modules and logits; QLoRA (NF4 experts) computes as the dequantized float model with
    the same adapter and trains; each 3-D expert weight (E, out, in) trains r·E·(in + out)."""
    experts = list(dict.fromkeys(f"{m.rsplit('.', 1)[-1]}.{leaf}" for m, leaf in expert_parameters(tiny_model(model_type))))
    config = LoraConfig(r=4, alpha=8, targets="all-linear", target_parameters=experts, init="random")
    linear_only = trainable_parameters(add_lora(tiny_model(model_type), config.replace(target_parameters=None)))
    ours = add_lora(tiny_model(model_type), config)
    per_expert_weight = sum(4 * p.shape[0] * (p.shape[1] + p.shape[2]) for m, leaf in expert_parameters(ours)
                            for p in [getattr(ours.get_submodule(m), leaf)])
    assert trainable_parameters(ours).trainable == linear_only.trainable + per_expert_weight
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(tiny_model(model_type), tmp_path / "adapter").eval()
    # peft wraps the experts module once per parameter (nested: "experts", "experts.base_layer")
    assert {n.removesuffix(".base_layer") for n in adapted(theirs)} == adapted(ours) | {
        m for m, _ in expert_parameters(ours)}
    torch.testing.assert_close(logits(theirs, tokens), logits(ours, tokens), rtol=1e-5, atol=1e-5)

    base = tiny_model(model_type)
    base.save_pretrained(tmp_path / "base")
    qlora = load_quantized(tmp_path / "base")
    assert {f"{m}.{leaf}" for m, leaf in expert_parameters(base)} <= nf4_weights(qlora).keys()
    reference = with_dequantized_weights(base, qlora)
    add_lora(qlora, config)
    save_adapter(qlora, tmp_path / "qlora_adapter")
    from lorakit.adapter_io import load_adapter

    load_adapter(reference, tmp_path / "qlora_adapter")
    torch.testing.assert_close(logits(qlora, tokens), logits(reference, tokens), rtol=1e-5, atol=1e-5)
    qlora.train()
    loss = qlora(tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss)
    with_grad = {n for n, p in qlora.named_parameters() if p.grad is not None}
    assert all(".lora_" in n for n in with_grad) and any(".parametrizations." in n for n in with_grad)
