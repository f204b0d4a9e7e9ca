"""The training loss: chunked cross-entropy equals F.cross_entropy on the full logits; SummedLoss
(the loop's loss) and model_loss (transformers' convention) equal the models' own losses."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama
from test_inject import randomize_adapters
from test_training_loop import tiny_run

from lorakit import LoraConfig, add_lora
from lorakit.data import collate
from lorakit.loss import (SummedLoss, causal_lm_loss, chunked_cross_entropy, model_loss, supervised_tokens,
                          supports_chunked_loss)


# ---- chunked cross-entropy -----------------------------------------------------------------------

@pytest.mark.parametrize("fn", ["cross_entropy", "token_logps"])
def test_one_logits_block_alive_at_a_time(fn):
    """The chunked functions hold one (C, V) float32 block at a time (the allocator's peak during the
    call, above its start: the (N, d) input gradient, one block, the chunk's (C, d) product; a
    block kept past its chunk made it two)."""
    from torch.profiler import ProfilerActivity, profile

    from lorakit.loss import chunked_token_logps
    from lorakit.monitor import profiled_peak

    n, d, v, c = 96, 8, 4000, 32
    hidden = torch.randn(n, d, requires_grad=True)
    weight, targets = torch.randn(v, d), torch.randint(0, v, (n,))
    call = chunked_cross_entropy if fn == "cross_entropy" else chunked_token_logps
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call(hidden, weight, targets, chunk_size=c)
    block = c * v * 4
    assert block < profiled_peak(prof) < block + n * d * 4 + 2 * c * d * 4 + 4096


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_cross_entropy_equals_full_logits(dtype, reduction):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g).to(dtype).requires_grad_(True)
    weight = torch.randn(50, 16, generator=g).to(dtype).requires_grad_(True)
    bias = torch.randn(50, generator=g).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[[3, 10, 36]] = -100
    results = []
    for chunked in (True, False):
        for t in (hidden, weight, bias):
            t.grad = None
        if chunked:  # 37 tokens in chunks of 8: the last chunk is partial
            loss = chunked_cross_entropy(hidden, weight, targets, bias, reduction=reduction, chunk_size=8)
        else:
            loss = F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction=reduction)
        (3 * loss).backward()  # a non-unit dL/dloss reaches the stored gradients
        results.append((loss.detach(), hidden.grad, weight.grad, bias.grad))
    for chunked_t, full_t in zip(*results):
        assert chunked_t.dtype == full_t.dtype
        # bfloat16: chunks round their partial sums of dL/dW separately; ~2 ulp of the largest entry
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=1e-2 * full_t.abs().max())
        torch.testing.assert_close(chunked_t, full_t, **tol)


def test_chunked_cross_entropy_under_autocast_takes_autocast_logits():
    """Under CPU autocast (bfloat16) the logits are autocast's bfloat16 product upcast, as
    transformers' loss computes them under autocast: equal to F.cross_entropy there (1e-6), and
    apart from the float32 loss (the test would not see the autocast branch otherwise)."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 32, generator=g, requires_grad=True)
    weight = torch.randn(300, 32, generator=g)
    targets = torch.randint(0, 300, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = chunked_cross_entropy(hidden, weight, targets, chunk_size=16)
        full = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    (chunked_grad,) = torch.autograd.grad(chunked, hidden)
    (full_grad,) = torch.autograd.grad(full, hidden)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked_grad, full_grad, rtol=1e-5, atol=1e-6)
    assert abs(chunked.item() - F.cross_entropy(F.linear(hidden, weight), targets).item()) > 1e-3


def test_chunked_cross_entropy_hand_computed():
    """Two tokens, logits [0, 0] and [log 3, 0]: losses log 2 and log(4/3) for targets 0, 0."""
    hidden = torch.tensor([[0.0], [1.0]])
    weight = torch.tensor([[torch.log(torch.tensor(3.0))], [0.0]])
    loss = chunked_cross_entropy(hidden, weight, torch.tensor([0, 0]), chunk_size=1)
    assert loss.item() == pytest.approx((torch.log(torch.tensor(2.0)) + torch.log(torch.tensor(4 / 3))).item() / 2)


def test_chunked_cross_entropy_rejects_bad_arguments():
    h, w, t = torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction='none'"):
        chunked_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(ValueError, match="chunk_size=0"):
        chunked_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match=r"hidden \(4, 3\), weight \(5, 4\)"):
        chunked_cross_entropy(h, torch.zeros(5, 4), t)


@pytest.mark.parametrize("make", [lambda: tiny_llama(), lambda: tiny_llama(tie=True), tiny_gpt2],
                         ids=["llama", "llama-tied", "gpt2"])
def test_model_loss_equals_the_models_loss_full_finetuning(make, tokens):
    """Every parameter trains (the head too, tied or not): value and all gradients agree."""
    model = make()
    assert supports_chunked_loss(model)
    labels = tokens.clone()
    labels[0, :3] = -100  # a masked prompt
    results = []
    for chunked in (True, False):
        model.zero_grad(set_to_none=True)
        loss = model_loss(model, chunk_size=7, input_ids=tokens, labels=labels) if chunked else \
            model(input_ids=tokens, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_c, grads_c), (loss_f, grads_f) = results
    torch.testing.assert_close(loss_c, loss_f, rtol=1e-6, atol=1e-6)
    assert grads_c.keys() == grads_f.keys()
    for name in grads_f:
        torch.testing.assert_close(grads_c[name], grads_f[name], rtol=1e-5, atol=1e-6, msg=name)


def test_model_loss_with_lora_and_gradient_accumulation(tokens):
    model = tiny_llama(tie=True)
    add_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model)
    mask = torch.ones_like(tokens)
    mask[1, -2:] = 0
    batch = dict(input_ids=tokens, attention_mask=mask, labels=tokens, num_items_in_batch=torch.tensor(40))
    chunked = model_loss(model, chunk_size=5, **batch)
    full = model(**batch).loss
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    hidden = model.model(input_ids=tokens).last_hidden_state
    direct = causal_lm_loss(hidden, model.lm_head.weight, tokens)
    torch.testing.assert_close(direct, model(tokens, labels=tokens).loss, rtol=1e-6, atol=1e-6)


def test_causal_lm_loss_projects_only_the_supervised_positions():
    """A prompt masked with -100 costs no vocabulary projection: the head's products (logits and the
    input gradient, formed in forward) count 2 * 2 * n * d * V FLOPs for the n positions with a
    target, not for all B * T; loss and gradient equal F.cross_entropy on the full logits."""
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(0)
    b, t, d, v = 3, 10, 8, 50
    hidden = torch.randn(b, t, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :6] = -100  # prompts
    labels[2, :] = -100   # a row with nothing to learn
    n = int((labels[:, 1:] != -100).sum())  # position t predicts label t + 1
    assert n == 8
    with FlopCounterMode(display=False) as counter:
        loss = causal_lm_loss(hidden, weight, labels, chunk_size=3)
    assert counter.get_total_flops() == 2 * 2 * n * d * v
    loss.backward()
    reference = hidden.detach().clone().requires_grad_(True)
    want = F.cross_entropy((reference[:, :-1] @ weight.T).flatten(0, 1), labels[:, 1:].flatten())
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, reference.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(hidden.grad[:, :5], torch.zeros(b, 5, d))  # no target: no gradient


def test_model_loss_falls_back_for_heads_it_cannot_skip(tokens):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, targets=["lm_head"]))  # the head is a LoraLinear now
    assert not supports_chunked_loss(model)
    torch.testing.assert_close(model_loss(model, input_ids=tokens, labels=tokens),
                               model(input_ids=tokens, labels=tokens).loss)


# ---- SummedLoss: the training loss --------------------------------------------------------------

def test_no_loss_on_prompt_tokens():
    config, prepared = tiny_run()
    model = prepared.model
    batch = collate(prepared.train.examples[:4], 0)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits.detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=-100)
    loss.backward()
    prompt_len = len("<abcd>=")
    # positions 0..prompt_len-2 predict prompt tokens 1..prompt_len-1: no gradient reaches them
    assert logits.grad[:, : prompt_len - 1].abs().sum() == 0
    assert logits.grad[:, prompt_len - 1].abs().sum() > 0  # the first completion token is learned
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).loss, loss)


def test_summed_loss_head_only_at_targets_equals_full_logits():
    config, prepared = tiny_run()
    model = prepared.model
    batch = collate(prepared.train.examples[:6], 0)
    fast = SummedLoss(model)
    assert fast.chunked
    loss = fast(**batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                            ignore_index=-100, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["lm_head"]], ids=["chunked", "logits"])
def test_summed_loss_over_its_tokens_is_model_loss(tokens, targets):
    """One loss in two conventions: SummedLoss / supervised tokens = model_loss (the mean), and
    model_loss with num_items_in_batch = the sum over that count, on both of their paths."""
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, alpha=8, targets=targets))
    randomize_adapters(model)
    labels = tokens.clone()
    labels[:, :4] = -100  # a masked prompt
    batch = dict(input_ids=tokens, attention_mask=torch.ones_like(tokens), labels=labels)
    summed = SummedLoss(model)
    assert summed.chunked == (targets != ["lm_head"])
    n = supervised_tokens(batch)
    assert n == 2 * (10 - 4)  # labels after the first position that are not ignored
    with torch.no_grad():
        total = summed(**batch)
        torch.testing.assert_close(total / n, model_loss(model, **batch), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(total / 7, model_loss(model, **batch, num_items_in_batch=torch.tensor(7)),
                                   rtol=1e-6, atol=1e-6)
