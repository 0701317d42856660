"""Cross-entropy through the LM head on the loss-bearing positions only, without full logits.

Gemma's 262,144-word vocabulary makes the LM head the largest single cost of a training step: its
matrix product (262,144 x 640 weights) costs more than the 18 transformer layers of Gemma 3 270M
together (100 million weights), and the float32 logits of a 4 x 256 batch (1,024 x 262,144 values)
take about 1 GB. Three things here cut that cost without changing the loss:

- only positions whose next token carries loss (the solution, not the question or padding) go
  through the head; the others' logits are never used;
- the vocabulary goes through in slices of a few thousand words, with the softmax normaliser kept
  as a running maximum and sum (the online softmax of flash attention), so no more than a
  [positions, slice] tile of logits exists at a time and it stays in the CPU's cache;
- the gradient with respect to the hidden states, softmax(logits) @ weight - weight[target], is
  summed slice by slice in the same pass (rescaled whenever the running maximum moves), so the
  backward pass neither keeps nor recomputes logits: two matrix products per position in all.

TRL's own fused head (trl.kernels.chunked_logprob) scores every position on devices without
Triton, recomputes the logits in the backward pass, and computes entropy with extra passes over the
vocabulary. The function below returns what we use: each position's loss and whether its target is
the arg-max (token accuracy). bench/profile_step.py times both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mathtune.speedups.compact_weights import compact_rounded_rows, compact_rows, hand_back_file_pages

VOCAB_SLICE = 1024  # words per slice: a [1024, 1024] float32 tile is 4 MiB and stays in cache (vs 4,096: RESULTS.md)
TOKEN_CHUNK = 1024  # positions per pass over the vocabulary
LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")  # config names


class LinearCrossEntropy(torch.autograd.Function):
    """Per-position cross-entropy of softmax(hidden @ weight.T) against targets, and top-1 hits.

    The gradient for `hidden` is computed in forward, for each position's own loss, and scaled in
    backward by the incoming per-position gradient. `weight` is frozen (LoRA does not train the head);
    it is the head's weight or its compact copy (mathtune.speedups.compact_weights), read a slice of rows at a time.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, vocab_slice):
        if ctx.needs_input_grad[1]:
            raise ValueError("LinearCrossEntropy keeps the LM head frozen; its weight must not require grad")
        wants_grad = ctx.needs_input_grad[0]
        losses, hits, grads = [], [], []
        for start in range(0, hidden.shape[0], TOKEN_CHUNK):
            loss, hit, grad = _chunk(hidden[start : start + TOKEN_CHUNK], weight, targets[start : start + TOKEN_CHUNK],
                                     softcap, vocab_slice, wants_grad)
            losses.append(loss)
            hits.append(hit)
            grads.append(grad)
        ctx.save_for_backward(torch.cat(grads) if wants_grad else None)
        hits = torch.cat(hits)
        ctx.mark_non_differentiable(hits)
        return torch.cat(losses), hits

    @staticmethod
    def backward(ctx, grad_losses, _grad_hits):
        (grad_hidden,) = ctx.saved_tensors
        if grad_losses is None or grad_hidden is None:
            return None, None, None, None, None
        return grad_hidden * grad_losses.unsqueeze(1).to(grad_hidden.dtype), None, None, None, None


def _squash(logits: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gemma 2's final logit soft-capping, cap * tanh(x / cap), and its slope; the identity without a cap."""
    if not softcap:
        return logits, None
    squashed = torch.tanh(logits / softcap)
    return squashed * softcap, 1 - squashed * squashed


def _chunk(hidden, weight, targets, softcap, vocab_slice, wants_grad):
    """Losses, hits and d(loss)/d(hidden) for up to TOKEN_CHUNK positions, in one pass over the vocabulary."""
    n, device = hidden.shape[0], hidden.device
    exact = torch.promote_types(hidden.dtype, torch.float32)  # the softmax in float32 at least
    running_max = torch.full((n,), float("-inf"), dtype=exact, device=device)
    total = torch.zeros(n, dtype=exact, device=device)  # sum of exp(logit - running_max)
    hit_test = _HitTest(targets, vocab_slice, exact)
    weighted = torch.zeros(n, hidden.shape[1], dtype=exact, device=device) if wants_grad else None
    for start in range(0, weight.shape[0], vocab_slice):
        words = weight[start : start + vocab_slice]
        logits, slope = _squash((hidden @ words.t()).to(exact), softcap)
        slice_max = logits.amax(dim=1)
        hit_test.read(logits, slice_max)
        new_max = torch.maximum(running_max, slice_max)
        rescale = torch.exp(running_max - new_max)
        probs = logits.sub_(new_max.unsqueeze(1)).exp_()  # unnormalised, in place of the logits
        total = total * rescale + probs.sum(dim=1)
        if wants_grad:
            if slope is not None:
                probs.mul_(slope)
            weighted.mul_(rescale.unsqueeze(1))
            if words.dtype == exact:
                weighted.addmm_(probs, words)
            else:  # 16-bit weights: the product in their dtype (bf16 units; a float32 copy of each slice costs more)
                weighted.add_(probs.to(words.dtype) @ words)
        running_max = new_max
    target_words = weight[targets]
    # in float32: a 16-bit product rounds each of the hidden size's terms before the sum
    target_logit, target_slope = _squash((hidden.to(exact) * target_words.to(exact)).sum(dim=1), softcap)
    losses = running_max + total.log() - target_logit
    hits = hit_test.hits(running_max)
    if not wants_grad:
        return losses, hits, None
    target_term = target_words if target_slope is None else target_words * target_slope.unsqueeze(1)
    grad = weighted / total.unsqueeze(1) - target_term
    return losses, hits, grad.to(hidden.dtype)


class _HitTest:
    """Whether each position's target is the first arg-max of its logits, read slice by slice.

    The target is the first arg-max exactly when its logit equals the maximum and every earlier
    word's logit is below it. Each slice gives its maximum (amax: much faster on a CPU than max
    with indices, which every slice would need) and, for the few positions whose target lies in
    it, the target's logit and the maximum of the words before it there; whole slices before a
    target are covered by a running maximum over the slices' maxima at the end.
    """

    def __init__(self, targets, vocab_slice, dtype):
        self.targets, self.vocab_slice = targets, vocab_slice
        self.target_slice = targets // vocab_slice
        self.target_logit = torch.full(targets.shape, float("nan"), dtype=dtype, device=targets.device)
        self.in_slice_max = torch.full(targets.shape, float("-inf"), dtype=dtype, device=targets.device)
        self.slice_maxima = []
        # positions sorted by target word, so that each slice's positions are one stretch of the order
        self.order = torch.argsort(targets)
        self.bounds = torch.searchsorted(self.target_slice[self.order], torch.arange(
            int(self.target_slice.max()) + 2 if len(targets) else 1, device=targets.device)).tolist()
        self.columns = torch.arange(vocab_slice, device=targets.device)

    def read(self, logits, slice_max):
        k = len(self.slice_maxima)
        self.slice_maxima.append(slice_max)
        if k + 1 >= len(self.bounds) or self.bounds[k] == self.bounds[k + 1]:
            return
        rows = self.order[self.bounds[k] : self.bounds[k + 1]]
        own = logits[rows]
        columns = (self.targets[rows] - k * self.vocab_slice).unsqueeze(1)
        self.target_logit[rows] = own.gather(1, columns).squeeze(1)
        before = self.columns[: own.shape[1]] < columns
        self.in_slice_max[rows] = own.masked_fill(~before, float("-inf")).amax(dim=1)

    def hits(self, maximum):
        if not self.slice_maxima:
            return torch.zeros_like(self.targets, dtype=torch.bool)
        running = torch.stack(self.slice_maxima).cummax(dim=0).values  # [slices, positions]
        whole_slices = running.gather(0, (self.target_slice - 1).clamp(min=0).unsqueeze(0)).squeeze(0)
        earlier = torch.where(self.target_slice > 0, torch.maximum(whole_slices, self.in_slice_max), self.in_slice_max)
        return (self.target_logit == maximum) & (earlier < maximum)


@dataclass
class HeadOutput:
    """Per-position results, aligned with labels[:, 1:]; zero (False) where the label is -100."""

    losses: torch.Tensor  # [batch, length - 1] float32
    hits: torch.Tensor  # [batch, length - 1] bool
    mask: torch.Tensor  # [batch, length - 1] bool: the positions that carry loss


def loss_positions_head(hidden: torch.Tensor, labels: torch.Tensor, weight, softcap: float | None = None,
                        vocab_slice: int = VOCAB_SLICE) -> HeadOutput:
    """The LM head (its weight, or a compact copy) and cross-entropy for the positions whose next-token
    label is not -100."""
    hidden, labels = hidden[:, :-1], labels[:, 1:]
    mask = labels != -100
    losses, hits = LinearCrossEntropy.apply(hidden[mask], weight, labels[mask], softcap, vocab_slice)
    # masked_scatter keeps the graph connected even when no position carries loss
    return HeadOutput(
        losses=losses.new_zeros(mask.shape).masked_scatter(mask, losses),
        hits=hits.new_zeros(mask.shape).masked_scatter(mask, hits),
        mask=mask,
    )


def supports_loss_head(model) -> bool:
    """Whether the output layer is a plain, frozen, bias-free linear map, so the fast head computes what it does."""
    head, text_config = model.get_output_embeddings(), model.config.get_text_config()
    # Models that scale their logits (Granite, Falcon-H1, ...) are left to their own forward.
    scales = [getattr(text_config, name, None) for name in LOGIT_SCALES]
    return (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            and all(scale in (None, 1) for scale in scales))


def trl_head_is_compact(device: torch.device) -> bool:
    """Whether TRL's fused head scores only loss-bearing positions here: it does where Triton runs
    (CUDA, XPU; as trl.kernels.chunked_logprob decides), and scores every position elsewhere."""
    from transformers.utils import is_triton_available

    return device.type in ("cuda", "xpu") and is_triton_available()


def wants_loss_head(model) -> bool:
    """Whether the loss head computes what the model's own would (supports_loss_head) and TRL's fused head
    would not already score only the loss-bearing positions here (trl_head_is_compact, faster where it runs)."""
    return supports_loss_head(model) and not trl_head_is_compact(model.device)


def head_weight(model, original: torch.Tensor | None = None):
    """The LM head's weight as the loss head reads it: the same values in fewer bytes where that saves
    memory (a float32 head's own int8 blocks, or for a 16-bit head rounded from float32 values,
    `original`, those of the float32 values), else the weight itself."""
    weight = model.get_output_embeddings().weight
    return compact_rows(weight) or compact_rounded_rows(weight, original) or weight


def compact_lookup(model, weight):
    """The input embedding's lookup read from the head's compact rows `weight`, where the model ties the
    embedding to the head and the lookup gives the embedding module's own output; else None.

    The embedding module reads its weight's rows from the memory-mapped checkpoint, and every read
    maps in the file's pages around the row as well: step after step, most of the tied head's pages
    became resident again although the loss head never reads them. Read from the compact rows, the
    same values come from memory that is resident anyway. Known embeddings only: a plain
    nn.Embedding, or one that scales its output by `embed_scale` (Gemma's); the result is checked
    against the module's own on rows spread over the vocabulary.
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if (isinstance(weight, torch.Tensor) or not isinstance(embedding, torch.nn.Embedding) or head is None
            or embedding.weight is not head.weight or embedding.max_norm is not None):
        return None
    scale = getattr(embedding, "embed_scale", None)
    if type(embedding) is not torch.nn.Embedding and not isinstance(scale, torch.Tensor):
        return None

    def lookup(input_ids: torch.Tensor) -> torch.Tensor:
        rows = weight[input_ids.reshape(-1)].view(*input_ids.shape, -1)
        return rows if scale is None else rows * scale.to(embedding.weight.dtype)

    probe = torch.linspace(0, embedding.num_embeddings - 1, 64).long().view(2, 32)
    with torch.no_grad():
        same = torch.equal(lookup(probe), embedding(probe))
    hand_back_file_pages(embedding.weight)  # the pages the probe read (the kernel may map megabytes around each row)
    return lookup if same else None


def install_loss_head(model, original: torch.Tensor | None = None) -> int:
    """Give a causal LM a `loss_head=True` forward mode that returns a HeadOutput instead of logits.

    The mode goes through the model's own forward call (so DDP, PEFT and Accelerate wrappers see an
    ordinary forward), runs the decoder, and applies loss_positions_head, with the head's weight in a
    compact exact form where that saves memory (mathtune.speedups.compact_weights), and the tied input
    embedding's lookup read from it too (compact_lookup); any other call is the original forward, so
    generation is unchanged.
    """
    original_forward = model.forward
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    weight = head_weight(model, original)
    lookup = compact_lookup(model, weight)
    embedding = model.get_input_embeddings()

    @functools.wraps(original_forward)
    def forward(*args, loss_head=False, labels=None, **kwargs):
        if not loss_head:
            return original_forward(*args, **({"labels": labels} if labels is not None else {}), **kwargs)
        kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        # not where hooks watch the embedding's output (PEFT's for gradient checkpointing: its input must require grad)
        if (lookup is not None and kwargs.get("input_ids") is not None and kwargs.get("inputs_embeds") is None
                and not embedding._forward_hooks and not embedding._forward_pre_hooks):
            kwargs["inputs_embeds"] = lookup(kwargs.pop("input_ids"))
        hidden = model.get_decoder()(*args, **kwargs).last_hidden_state
        return loss_positions_head(hidden, labels, weight, softcap)

    model.forward = forward
    return 1
