"""Cross-entropy through the LM head on the loss-bearing positions only, in token chunks.

Gemma's 262,144-word vocabulary makes the LM head the largest single cost of a training step: its
matrix product costs more than the 18 transformer layers of Gemma 3 270M together, and the float32
logits of a 4 x 256 batch take about 1 GB. Three things here cut that cost without changing the loss:

- only positions whose next token carries loss (the solution, not the question or padding) go
  through the head; the others' logits are never used;
- positions go through in chunks, so at most [chunk, vocab] logits exist at a time;
- the gradient with respect to the hidden states is computed in the forward pass, chunk by chunk,
  while the chunk's logits are at hand (as Liger's fused linear cross-entropy does), so the backward
  pass neither keeps nor recomputes logits: two matrix products per position in all.

TRL's own fused head (trl.kernels.chunked_logprob) does the first only on Triton devices, recomputes
the logits in the backward pass, and computes entropy and top-1 flags with extra passes over the
vocabulary; on a CPU that costs more than the matrix products themselves. The function below
returns what we use: each position's loss and whether its target is the arg-max (token accuracy).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# Positions per chunk: a [262144, 128] float32 logits tile is 128 MiB.
CHUNK_TOKENS = 128


class LinearCrossEntropy(torch.autograd.Function):
    """Per-position cross-entropy of softmax(hidden @ weight.T) against targets, and top-1 hits.

    The gradient for `hidden` is computed in forward, for each position's own loss, and scaled in
    backward by the incoming per-position gradient. `weight` is frozen (LoRA does not train the head).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_tokens):
        if ctx.needs_input_grad[1]:
            raise ValueError("LinearCrossEntropy keeps the LM head frozen; its weight must not require grad")
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        hits = torch.empty(n, dtype=torch.bool, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, n, chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, n))
            target = targets[rows]
            columns = torch.arange(len(target), device=target.device)
            # Logits as [vocab, chunk]: weight @ hidden.T runs faster than hidden @ weight.T on CPUs
            # (bench/profile_step.py), and the reductions below run across the vocabulary either way.
            logits = (weight @ hidden[rows].t()).float()
            if softcap:
                logits = torch.tanh(logits / softcap)
                squash_slope = 1 - logits * logits  # d tanh(x) / dx, for the gradient below
                logits = logits * softcap
            target_logit = logits[target, columns]
            # max returns the first maximum, so a tie with an earlier word is not a hit
            top, top_word = logits.max(dim=0)
            probs = logits.sub_(top).exp_()  # unnormalised, in place of the logits
            total = probs.sum(dim=0)
            losses[rows] = top + total.log() - target_logit
            hits[rows] = top_word == target
            if grad_hidden is None:
                continue
            grad_logits = probs.mul_(total.reciprocal())  # d loss / d logits = softmax - one-hot
            grad_logits[target, columns] -= 1
            if softcap:
                grad_logits.mul_(squash_slope)
            grad_hidden[rows] = grad_logits.t().to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        ctx.mark_non_differentiable(hits)
        return losses, hits

    @staticmethod
    def backward(ctx, grad_losses, _grad_hits):
        (grad_hidden,) = ctx.saved_tensors
        if grad_losses is None or grad_hidden is None:
            return None, None, None, None, None
        return grad_hidden * grad_losses.unsqueeze(1).to(grad_hidden.dtype), None, None, None, None


@dataclass
class HeadOutput:
    """Per-position results, aligned with labels[:, 1:]; zero (False) where the label is -100."""

    losses: torch.Tensor  # [batch, length - 1] float32
    hits: torch.Tensor  # [batch, length - 1] bool
    mask: torch.Tensor  # [batch, length - 1] bool: the positions that carry loss


def loss_positions_head(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module,
                        softcap: float | None = None, chunk_tokens: int = CHUNK_TOKENS) -> HeadOutput:
    """The LM head and cross-entropy for the positions whose next-token label is not -100."""
    hidden, labels = hidden[:, :-1], labels[:, 1:]
    mask = labels != -100
    losses, hits = LinearCrossEntropy.apply(hidden[mask], lm_head.weight, labels[mask], softcap, chunk_tokens)
    # masked_scatter keeps the graph connected even when no position carries loss
    return HeadOutput(
        losses=losses.new_zeros(mask.shape).masked_scatter(mask, losses),
        hits=hits.new_zeros(mask.shape).masked_scatter(mask, hits),
        mask=mask,
    )


def supports_loss_head(model) -> bool:
    """Whether the output layer is a plain, frozen, bias-free linear map, so the fast head computes what it does."""
    head = model.get_output_embeddings()
    return (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            and getattr(model.config.get_text_config(), "logit_scale", None) in (None, 1))


def install_loss_head(model) -> None:
    """Give a causal LM a `loss_head=True` forward mode that returns a HeadOutput instead of logits.

    The mode goes through the model's own forward call (so DDP, PEFT and Accelerate wrappers see an
    ordinary forward), runs the decoder, and applies loss_positions_head; any other call is the
    original forward, so generation is unchanged.
    """
    original_forward = model.forward
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)

    @functools.wraps(original_forward)
    def forward(*args, loss_head=False, labels=None, **kwargs):
        if not loss_head:
            return original_forward(*args, **({"labels": labels} if labels is not None else {}), **kwargs)
        kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        hidden = model.get_decoder()(*args, **kwargs).last_hidden_state
        return loss_positions_head(hidden, labels, model.get_output_embeddings(), softcap)

    model.forward = forward
