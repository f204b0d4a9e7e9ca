"""Cross-entropy over the vocabulary in chunks of tokens: the full logits never exist.

A causal LM's loss is  L = Σ_t [logsumexp(z_t) - z_t[y_t]] / n,  z_t = W h_t (+ b),  over the n
positions whose target is not ignored. For SmolLM2 (vocabulary 49152) and a batch of 8 x 128
tokens, the float32 logits z are 200 MB; autograd keeps them, their log-softmax, and their
gradient alive at once. Here the tokens are processed `chunk_size` at a time and the gradients are
formed right away, with p_t = softmax(z_t):

    dL/dz_t = (p_t - onehot(y_t)) / n      dL/dh_t = (dL/dz_t) W      dL/dW = Σ_t (dL/dz_t)ᵀ h_t

so forward and backward need one (chunk_size, vocab) float32 block at a time and the logits
matrix multiply runs once (no recomputation in backward). Backward only scales the stored
gradients by dL/dloss. Logits are computed in the weight's dtype and upcast to float32, as
transformers' loss does, so the value and gradients equal F.cross_entropy on the full logits
(to rounding: dL/dW is summed in float32 from the float32 dL/dz, in place, where autograd would
first round dL/dz to the weight's dtype; this keeps no (V, d) temporary per chunk).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .attention import segment_attention

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 256  # tokens per block: 256 x 49152 float32 = 48 MiB

# Model types whose logits are exactly lm_head(last hidden state): no soft-capping or scaling.
CHUNKED_LOSS_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3")


def _exp_shifted(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e, s, lse) for a (C, V) float32 block z, overwritten: e = exp(z - max z) in z's storage, its
    row sums s and logsumexp(z) = max z + log s (torch.logsumexp's formula, without its own (C, V)
    temporary and second exp); the softmax is then e / s, in place."""
    top = z.amax(dim=1, keepdim=True)  # (C, 1)
    e = z.sub_(top).exp_()
    sums = e.sum(dim=1)
    return e, sums, top[:, 0] + sums.log()


class _Logits:
    """z = F.linear(h, W, b).float() for chunks h (C, d) of at most `rows` rows: (C, V) float32.

    On the CPU it is formed as the transposed product W hᵀ (+ b), (V, C), and returned as its
    transpose (a view): MKL forms that product with V = 49,152 and C = 256 1.2-1.3x faster than
    the (C, V) one, and the row reductions and products that follow read either layout. A float32
    weight writes every chunk's product into one (V, rows) block, which spares each chunk a fresh
    48 MiB buffer and its page faults; a 16-bit product is upcast into a new float32 tensor as
    before (the planner counts the two). On other devices, and under autocast (which would not
    cast an out= product), F.linear as before."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
        self.weight, self.bias = weight, bias
        self.transposed = weight.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
        self.block = None
        if self.transposed and weight.dtype == torch.float32:
            self.block = torch.empty(weight.shape[0] * rows, dtype=torch.float32, device=weight.device)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if not self.transposed:
            return F.linear(h, weight, bias).float()
        out = None if self.block is None else self.block[:weight.shape[0] * h.shape[0]].view(-1, h.shape[0])
        zt = torch.mm(weight, h.t(), out=out) if bias is None else torch.addmm(bias[:, None], weight, h.t(), out=out)
        return zt.float().t()  # (C, V)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int, reduction: str, chunk_size: int,
                want_grads: bool):
        n_tokens = hidden.shape[0]
        valid = targets != ignore_index  # (N,)
        count = valid.sum()
        denominator = count.float() if reduction == "mean" else torch.ones((), device=hidden.device)
        need_h, need_w, need_b = ctx.needs_input_grad[:3] if want_grads else (False, False, False)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        logits = _Logits(weight, bias, min(chunk_size, n_tokens))
        for start in range(0, n_tokens, chunk_size):
            h = hidden[start:start + chunk_size]  # (C, d)
            t = targets[start:start + chunk_size]  # (C,)
            keep = valid[start:start + chunk_size]
            safe_t = torch.where(keep, t, 0)[:, None]  # (C, 1) gather index for ignored rows
            z = logits(h)  # (C, V) float32, the only large temporary
            picked = z.gather(1, safe_t)[:, 0]  # z[y]
            e, sums, lse = _exp_shifted(z)
            total += ((lse - picked) * keep).sum()
            if need_h or need_w or need_b:
                dz = e.div_(sums[:, None])  # softmax, in place: (C, V)
                dz.scatter_add_(1, safe_t, torch.full_like(lse, -1.0)[:, None])  # p - onehot(y)
                dz.mul_((keep / denominator)[:, None])  # ignored rows get no gradient
                if need_w:  # summed over the chunks in float32, in place: no (V, d) temporary
                    grad_w.addmm_(dz.t(), h.float())
                if need_b:
                    grad_b += dz.sum(0)
                if need_h:  # in the weight's dtype, as autograd casts dL/dz back through logits.float()
                    grad_h[start:start + chunk_size] = dz.to(weight.dtype) @ weight
                del dz
            del z, e  # free this chunk's logits before the next chunk's exist
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        # The float32 accumulators are scaled in place (used once: the saved-tensor version check
        # refuses a second backward) and cast to the parameters' dtypes.
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(ctx.dtypes[0])
        if grad_b is not None:
            grad_b = grad_b.mul_(grad_loss).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _check_chunked(name: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   chunk_size) -> None:
    """The arguments both chunked functions take: a positive int chunk_size, hidden (N, d), weight (V, d),
    targets (N,); a ValueError naming `name` and the shapes otherwise."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (tokens per block)")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.shape[1:] != hidden.shape[1:]:
        raise ValueError(
            f"{name} needs hidden (N, d), weight (V, d), targets (N,); got hidden "
            f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}"
        )


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                          reduction: str = "mean", chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, weight, bias).float(), targets) without the full logits.

    hidden: (N, d), weight: (V, d), bias: (V,) or None, targets: (N,) int64 (ignore_index skipped).
    reduction: "mean" (over the targets not ignored) or "sum". Differentiable in hidden, weight
    and bias; the gradients are computed during the forward call (see the module docstring).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: chunked_cross_entropy supports 'mean' and 'sum'")
    _check_chunked("chunked_cross_entropy", hidden, weight, targets, chunk_size)
    want_grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _ChunkedCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, reduction, chunk_size,
                                      want_grads)


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, want_grad: bool):
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_grad else None  # d logp_t / d h_t, (N, d)
        logits = _Logits(weight, bias, min(chunk_size, hidden.shape[0]))
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]                  # (C, d)
            t = targets[start:start + chunk_size, None]           # (C, 1)
            z = logits(h)                                         # (C, V) float32, the only large temporary
            picked = z.gather(1, t)[:, 0]                         # z[y]
            e, sums, lse = _exp_shifted(z)
            logps[start:start + chunk_size] = picked - lse
            if want_grad:
                dz = e.div_(sums.neg()[:, None])                  # -softmax, in place: (C, V)
                dz.scatter_add_(1, t, torch.ones_like(lse)[:, None])  # onehot(y) - p
                grad_h[start:start + chunk_size] = dz.to(weight.dtype) @ weight
                del dz
            del z, e
        ctx.save_for_backward(grad_h)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_logps.to(grad_h.dtype)[:, None], None, None, None, None, None


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        bias: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """log softmax(F.linear(hidden, weight, bias).float())[t, targets[t]] of every row t, (N,) float32,
    without the full logits: the per-token log-probabilities a preference loss sums per sequence.

    hidden: (N, d), weight: (V, d), bias: (V,) or None, targets: (N,) int64 (every one scored).
    With ℓ_t = z_t[y_t] - logsumexp(z_t), z_t = W h_t (+ b), p_t = softmax(z_t):

        dℓ_t/dh_t = (onehot(y_t) - p_t) W

    is formed chunk by chunk during the forward call, as chunked_cross_entropy forms its gradients,
    and backward scales row t by dL/dℓ_t: one (chunk_size, V) float32 block exists at a time, never
    the (N, V) logits with their softmax and gradient. Differentiable in hidden. dL/dW needs dL/dℓ
    per token before it can be summed, so when the head itself trains (weight or bias requires
    grad) the log-probabilities come from the full logits through autograd instead.
    """
    _check_chunked("chunked_token_logps", hidden, weight, targets, chunk_size)
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        logits = F.linear(hidden, weight, bias).float()  # (N, V): the trained head's gradient through autograd
        return logits.gather(1, targets[:, None])[:, 0] - logits.logsumexp(1)
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _ChunkedTokenLogps.apply(hidden, weight, bias, targets, chunk_size, want_grad)


def causal_lm_loss(hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   bias: torch.Tensor | None = None, num_items_in_batch: int | torch.Tensor | None = None,
                   ignore_index: int = IGNORE_INDEX, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """transformers' causal-LM loss from the last hidden states (B, T, d) and labels (B, T):
    position t predicts labels[:, t + 1]; the mean over targets not ignored, or, given
    num_items_in_batch (gradient accumulation), their sum divided by it. The head runs only at the
    positions that have a target (a prompt masked with ignore_index costs no vocabulary projection)."""
    # Shift as transformers does: pad the labels with ignore_index on the right, drop the first.
    targets = F.pad(labels, (0, 1), value=ignore_index)[:, 1:].reshape(-1).to(hidden_states.device)
    keep = targets != ignore_index
    hidden, targets = hidden_states.reshape(-1, hidden_states.shape[-1])[keep], targets[keep]  # (n_supervised, d)
    if num_items_in_batch is None:
        return chunked_cross_entropy(hidden, weight, targets, bias, ignore_index, "mean", chunk_size)
    return chunked_cross_entropy(hidden, weight, targets, bias, ignore_index, "sum", chunk_size) / num_items_in_batch


def supports_chunked_loss(model: nn.Module) -> bool:
    """True when `model`'s logits are exactly its plain linear output head applied to its backbone's
    last hidden state, so that the loss may skip the logits (SummedLoss, model_loss)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (getattr(config, "model_type", None) in CHUNKED_LOSS_MODEL_TYPES and type(head) is nn.Linear
            and hasattr(model, "base_model") and model.base_model is not model)


def head_input(model: nn.Module, **inputs) -> tuple[torch.Tensor, nn.Linear]:
    """(the last hidden state (B, T, d), the output head): what the chunked loss reads instead of the
    logits, for a model that supports_chunked_loss. inputs: input_ids, attention_mask, ..."""
    return model.base_model(**inputs).last_hidden_state, model.get_output_embeddings()


class SummedLoss(nn.Module):
    """The training loss: the model under training, returning the sum of next-token cross-entropies
    over the supervised tokens of a batch,

        L_sum = Σ_{b, t : y[b, t+1] != ignore}  -log softmax(z[b, t])[y[b, t+1]]

    (position t predicts token t + 1). A sum, not a mean, so that the loop can divide by the
    supervised tokens of the whole global batch (all micro-batches, all ranks): every token weighs
    the same however the batch is split. An nn.Module so that DDP and FSDP wrap it and every
    computation happens in forward.

    Where the logits are exactly head(last hidden state) (supports_chunked_loss), the head runs
    only at the positions that have a target, in chunks (chunked_cross_entropy): prompt positions
    cost no vocabulary projection and full float32 logits never exist. Otherwise the model's
    logits are used.
    """

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.chunked = supports_chunked_loss(model)

    def forward(self, input_ids, attention_mask, labels, position_ids=None) -> torch.Tensor:
        """position_ids (B, T), for packed rows (data.pack, data.padding_free): positions restart at 0
        with each example; the model then attends only within each example (transformers derives the
        block-diagonal causal mask from the restarts when it gets no attention_mask and no cache;
        attention.segment_attention computes it example by example), so the padding at the end of a
        row, which restarts them too, is a block of its own."""
        targets = labels[:, 1:]                                    # (B, T-1): position t predicts token t + 1
        # no KV cache: a training forward builds one for nothing (and torch.compile recompiles for it)
        inputs = {"input_ids": input_ids, "use_cache": False}
        inputs.update({"attention_mask": attention_mask} if position_ids is None else {"position_ids": position_ids})
        with contextlib.nullcontext() if position_ids is None else segment_attention(self.model):
            if not self.chunked:
                logits = self.model(**inputs).logits
                return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
            hidden, head = head_input(self.model, **inputs)
        keep = targets != IGNORE_INDEX
        return chunked_cross_entropy(hidden[:, :-1][keep], head.weight, targets[keep], head.bias,
                                     reduction="sum", chunk_size=self.chunk_size)  # (n_supervised, d) rows only


def supervised_tokens(batch: dict) -> int:
    """The tokens SummedLoss sums over: labels after the first position that are not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def model_loss(model: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE, **batch) -> torch.Tensor:
    """`model(**batch).loss` (batch holds input_ids, labels, optionally attention_mask, ...), in
    transformers' convention: the mean over the targets, or their sum / num_items_in_batch.

    The same loss as SummedLoss (computed from head_input in chunks where the model allows it,
    else by the model itself), laid out as transformers lays it out: every position goes through
    causal_lm_loss (the last one with an ignored target), as hf_trainer.ChunkedLoss computes it.
    SummedLoss keeps only the rows with a target; the two agree to rounding, not bit for bit
    (the chunks group the rows differently), and the planner's activation formula models this one.
    """
    if "labels" not in batch:
        raise ValueError(f"model_loss needs labels in the batch; got keys {sorted(batch)}")
    if not supports_chunked_loss(model):
        return model(**batch).loss
    labels = batch.pop("labels")
    num_items = batch.pop("num_items_in_batch", None)
    hidden, head = head_input(model, **batch)  # (B, T, d): the backbone, without the head
    return causal_lm_loss(hidden, head.weight, labels, head.bias, num_items, chunk_size=chunk_size)
