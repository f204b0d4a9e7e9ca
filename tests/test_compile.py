"""torch.compile of a LoRA model: one graph, no break, and eager's loss and gradients with dropout on
(the compiled draw is dropout.sample's, from the same generator: see dropout.py's docstring)."""

import copy
import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no pool of compile workers left behind

import pytest
import torch
from conftest import tiny_llama

from lorakit import LoraConfig, add_lora
from lorakit.dropout import sample
from lorakit.layer import LoraLinear

P = 0.3


def one_layer_lora(fused: bool):
    """tiny_llama cut to one decoder layer, r=4 all-linear adapters with dropout P and B != 0."""
    model = tiny_llama(hidden=16)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=P, targets="all-linear", init="random"))
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.fused = fused
    return model.train()


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def loss_and_grads(model, forward, ids, seed: int = 5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = forward(model, ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_compiled_draw_is_the_eager_draw_as_a_mask():
    n = 1000
    torch.manual_seed(3)
    positions = sample(n, P, torch.device("cpu"))
    torch.manual_seed(3)
    draws = torch.zeros((), dtype=torch.int64)
    kept = torch.ops.lorakit.dropout_mask(n, P, torch.device("cpu"), draws)
    assert kept.dtype == torch.bool and kept.shape == (n,) and int(draws) == 1
    assert torch.equal(torch.nonzero(~kept).flatten(), positions)
    assert 200 < positions.numel() < 400  # ~P·n dropped: the draw is not empty


@pytest.mark.parametrize("fused", [True, False])
def test_compiled_step_has_no_graph_break_and_equals_eager(fused, tokens, fresh_dynamo):
    model = one_layer_lora(fused)
    explained = torch._dynamo.explain(loss_of)(model, tokens)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()

    compiled_model = copy.deepcopy(model)
    loss_e, grads_e = loss_and_grads(model, loss_of, tokens)
    loss_c, grads_c = loss_and_grads(compiled_model, torch.compile(loss_of), tokens)
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=1e-5)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) == 14  # A and B of 7 adapted linears
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=0, atol=1e-5, msg=name)
    # the equality above says the compiled model dropped what eager dropped: another draw (or none)
    # gives another loss
    _, grads_other_draw = loss_and_grads(model, loss_of, tokens, seed=6)
    assert any((grads_other_draw[n] - grads_e[n]).abs().max() > 1e-3 for n in grads_e)
