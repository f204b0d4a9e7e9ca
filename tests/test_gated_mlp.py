"""gated_mlp: the MLP down(act(gate(x)) ⊙ up(x)) keeping gate(x) and up(x) for backward.

Bit-identical loss and gradients with and without it (LoRA with dropout, DoRA, a trained base,
GELU-tanh, a frozen down_proj, an in-place SiLU it steps aside for); one act and one act backward
per layer in backward; exactly two (N, I) tensors fewer alive after forward per layer (the
allocator's count); which of transformers' MLPs it recognises; where it steps aside (no gradient,
other saved-tensor hooks: activation checkpointing); add_lora switching it on and merge_and_unload
off.
"""

import copy
import gc
import io

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from lorakit import LoraConfig, add_lora, gated_mlp
from lorakit import lean as lean_modules
from lorakit.inject import merge_and_unload
from lorakit.monitor import allocator_totals

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lean_forwards(model) -> int:
    return sum(gated_mlp.is_lean(m) for m in model.modules())


def loss_and_grads(model, tokens, seed=1):
    torch.manual_seed(seed)  # the same dropout sample in both
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def plain_and_lean(model):
    """(model without the lean MLP, a copy with it)."""
    lean_modules.restore(model)
    lean = copy.deepcopy(model)
    assert gated_mlp.keep_less(lean) == 2  # tiny_llama has two layers
    return model, lean


@pytest.mark.parametrize("setup", ["lora dropout", "dora", "trained base", "gelu", "frozen down_proj",
                                   "in-place silu"])
def test_loss_and_gradients_are_bit_identical(setup):
    from transformers.activations import ACT2FN

    model = tiny_llama().train()
    if setup == "lora dropout":
        add_lora(model, LoraConfig(r=4, alpha=8, targets=ALL, dropout=0.1, init="random"))
    elif setup == "dora":
        add_lora(model, LoraConfig(r=4, alpha=8, targets=ALL, dora=True, init="random"))
    elif setup == "gelu":  # not SiLU: act's backward through autograd, on a recomputed act
        for layer in model.model.layers:
            layer.mlp.act_fn = ACT2FN["gelu_pytorch_tanh"]
        add_lora(model, LoraConfig(r=4, alpha=8, targets=ALL, init="random"))
    elif setup == "frozen down_proj":  # down's backward never asks for the product: act computed in its own
        add_lora(model, LoraConfig(r=4, alpha=8, targets=ALL[:-1], init="random"))
    elif setup == "in-place silu":  # it would overwrite the gate(x) kept for backward: the lean forward steps aside
        for layer in model.model.layers:
            layer.mlp.act_fn = nn.SiLU(inplace=True)
        add_lora(model, LoraConfig(r=4, alpha=8, targets=ALL, init="random"))
    plain, lean = plain_and_lean(model)
    tokens = torch.randint(3, 96, (2, 16))
    loss, grads = loss_and_grads(plain, tokens)
    lean_loss, lean_grads = loss_and_grads(lean, tokens)
    assert lean_loss.equal(loss)
    assert grads.keys() == lean_grads.keys() and len(grads) > 0
    assert all(lean_grads[n].equal(g) for n, g in grads.items())
    assert any("mlp" in n for n in grads)


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_backward_computes_act_once_per_layer(act):
    """down's backward recomputes act(gate) ⊙ up and hands act(gate) (with act's graph) to the product's
    backward: one act per layer in backward (was two) and one act backward; SiLU's reads gate only."""
    from torch.profiler import ProfilerActivity, profile
    from transformers.activations import ACT2FN

    model = tiny_llama().train()
    for layer in model.model.layers:
        layer.mlp.act_fn = ACT2FN[act]
    add_lora(model, LoraConfig(r=4, alpha=8, targets=ALL, init="random"))
    tokens = torch.randint(3, 96, (2, 16))
    loss = model(tokens, labels=tokens).loss
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    calls = {e.key: e.count for e in prof.key_averages()}
    op = "aten::silu" if act == "silu" else "aten::gelu"
    assert calls[op] == 2 and calls[op + "_backward"] == 2  # two layers


def live_bytes_after(fn) -> int:
    """Bytes the CPU allocator holds after fn() above what it held before (profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kept = fn()
    del kept
    events = allocator_totals(prof)
    return events[-1][2] - events[0][1]


def test_two_intermediate_tensors_fewer_per_layer():
    model = add_lora(tiny_llama(hidden=64).train(), LoraConfig(r=4, alpha=8, targets=ALL, init="random"))
    plain, lean = plain_and_lean(model)
    tokens = torch.randint(3, 96, (2, 16))
    kept = {name: live_bytes_after(lambda m=m: m(tokens).logits) for name, m in (("plain", plain), ("lean", lean))}
    n, inter, layers = 2 * 16, 2 * 64, 2
    assert kept["plain"] - kept["lean"] == 2 * n * inter * 4 * layers  # act(gate) and the product, float32


def test_recognises_transformers_gated_mlps_only():
    from transformers import GemmaConfig, GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config
    from transformers.models.gemma.modeling_gemma import GemmaMLP
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.mistral.modeling_mistral import MistralMLP
    from transformers.models.phi3.modeling_phi3 import Phi3MLP
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    small = dict(hidden_size=16, intermediate_size=32, hidden_act="silu", num_attention_heads=2, num_key_value_heads=2)
    assert gated_mlp.is_gated_mlp(LlamaMLP(LlamaConfig(**small)))
    assert gated_mlp.is_gated_mlp(MistralMLP(MistralConfig(**small)))
    assert gated_mlp.is_gated_mlp(Qwen2MLP(Qwen2Config(**small)))
    assert gated_mlp.is_gated_mlp(GemmaMLP(GemmaConfig(**small)))
    assert not gated_mlp.is_gated_mlp(Phi3MLP(Phi3Config(**small)))  # one fused gate_up_proj
    assert not gated_mlp.is_gated_mlp(GPT2MLP(64, GPT2Config(n_embd=16)))  # not gated

    class Scaled(LlamaMLP):  # the same attributes, another computation
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * 2

    assert not gated_mlp.is_gated_mlp(Scaled(LlamaConfig(**small)))

    hooked = nn.Sequential(LlamaMLP(LlamaConfig(**small)), LlamaMLP(LlamaConfig(**small)))
    hooked[0].forward = lambda x: x  # e.g. accelerate's device hook: not replaced
    assert gated_mlp.keep_less(hooked) == 1 and not gated_mlp.is_lean(hooked[0]) and gated_mlp.is_lean(hooked[1])
    assert gated_mlp.keep_less(hooked) == 1  # again: the same


def test_steps_aside_without_gradient_and_under_checkpointing():
    model = add_lora(tiny_llama().train(), LoraConfig(r=4, alpha=8, targets=ALL, init="random"))
    assert lean_forwards(model) == 2
    tokens = torch.randint(3, 96, (2, 16))
    packed = []

    def count(t):
        packed.append(t)
        return t

    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 16, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        mlp(x)  # inside another hook: the class's forward, every tensor through that hook
    assert sum(t.shape == (2, 16, 64) for t in packed) == 4  # gate, act(gate), up, the product
    with torch.no_grad():
        assert mlp(x).equal(type(mlp).plain_forward(mlp, x))
    frozen = x.detach()  # gradients on, but gate(x) and up(x) need none here (no adapter on the MLP)
    bare = add_lora(tiny_llama().train(), LoraConfig(r=4, targets=["q_proj"])).model.layers[0].mlp
    assert gated_mlp.is_lean(bare) and not bare(frozen).requires_grad
    assert bare(frozen).equal(type(bare).plain_forward(bare, frozen))

    plain, lean = plain_and_lean(model)
    for m in (plain, lean):
        m.activation_checkpointing_enable({"use_reentrant": False})
    loss, grads = loss_and_grads(plain, tokens)
    lean_loss, lean_grads = loss_and_grads(lean, tokens)
    assert lean_loss.equal(loss) and all(lean_grads[n].equal(g) for n, g in grads.items())


def test_add_lora_switches_it_on_and_merge_and_unload_off():
    model = tiny_llama()
    assert lean_forwards(model) == 0
    add_lora(model, LoraConfig(r=4, targets=["q_proj"]))
    add_lora(model, LoraConfig(r=4, targets=["q_proj"]), name="second")
    assert lean_forwards(model) == 2
    lean_class = type(model.model.layers[0].mlp)
    assert lean_class is type(model.model.layers[1].mlp)  # one class, one forward: compiled once
    assert lean_class.__name__ == "LlamaMLP" and isinstance(model.model.layers[0].mlp, lean_class.plain_class)
    for copied in (copy.deepcopy(model), torch.load(io.BytesIO(pickled(model)), weights_only=False)):
        assert lean_forwards(copied) == 2 and type(copied.model.layers[0].mlp) is lean_class
    merge_and_unload(model)
    assert lean_forwards(model) == 0
    assert all(isinstance(m, nn.Module) and "forward" not in m.__dict__ for m in model.modules())


def test_the_planner_knows_which_models_keep_less():
    from transformers import GPT2Config, LlamaConfig, Phi3Config

    from lorakit.planner import arch_from_config, plan

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    assert arch_from_config(LlamaConfig(**small).to_dict()).lean_mlp
    assert not arch_from_config(Phi3Config(**small).to_dict()).lean_mlp
    assert not arch_from_config(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128).to_dict()).lean_mlp
    assert plan("llama-3.1-8b", recommend=False).arch.lean_mlp
    assert not plan("mixtral-8x7b", recommend=False).arch.lean_mlp
    # per token and layer, bf16: LoRA keeps 2*2*I of the MLP, full fine-tuning 3*2*I + down's input 2*I
    i, t = 14336, 2048
    lora, full = (plan("llama-3.1-8b", method=m, recommend=False) for m in ("lora", "full"))
    mlp_difference = (full.activations_without_checkpointing - lora.activations_without_checkpointing) // 32
    assert mlp_difference >= t * 2 * 2 * i


def pickled(model) -> bytes:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


def test_backward_under_a_global_module_hook():
    """FlopCounterMode's module tracker hooks every module call; backward's recomputation of act
    must not call act's hooks (one on its leaf made autograd.grad inside backward fail)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = add_lora(tiny_llama().train(), LoraConfig(r=4, alpha=8, targets=ALL, init="random"))
    plain, lean = plain_and_lean(model)
    tokens = torch.randint(3, 96, (2, 16))
    with FlopCounterMode(display=False):  # both under it: it changes which kernels run (7e-8 here)
        loss, grads = loss_and_grads(plain, tokens)
    with FlopCounterMode(display=False) as counter:
        lean_loss, lean_grads = loss_and_grads(lean, tokens)
    assert lean_loss.equal(loss) and all(lean_grads[n].equal(g) for n, g in grads.items())
    assert counter.get_total_flops() > 0
