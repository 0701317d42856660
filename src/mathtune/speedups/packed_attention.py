"""Attention for padding-free batches, one example at a time.

A padding-free batch is one row holding several examples end to end, their position ids starting
again at 0 for each. transformers' SDPA path gives such a row one block-diagonal mask and computes
attention over the whole row: for four examples of 220 tokens, eight times the products that
matter (four times for the blocks between examples, twice for the masked upper triangles), as the
explicit mask keeps SDPA's causal kernel from skipping any of them. Here each example's stretch goes
to SDPA alone with is_causal=True. The flash-attention varlen kernels do this on GPUs; this is the
same for any device. Anything that is not a packed training row (generation, cached decoding,
ordinary padded batches) takes transformers' SDPA function unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "mathtune_packed_sdpa"
FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # those the CPU flash-attention kernel takes


_last_row: list = [None, None, None]  # position_ids, length, starts: every layer asks about the same row


def example_starts(position_ids: torch.Tensor | None, length: int) -> list[int] | None:
    """Where each example of a packed row starts, or None when the row is not several examples counted from 0."""
    if position_ids is None or _last_row[0] is not position_ids or _last_row[1] != length:
        _last_row[:] = [position_ids, length, _find_starts(position_ids, length)]
    return _last_row[2]


def _find_starts(position_ids: torch.Tensor | None, length: int) -> list[int] | None:
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape != (1, length):
        return None
    positions = position_ids[0]
    starts = torch.nonzero(positions == 0).flatten()
    if len(starts) < 2 or starts[0] != 0:
        return None
    example_index = torch.cumsum(positions == 0, dim=0) - 1
    expected = torch.arange(length, device=positions.device) - starts[example_index]
    return starts.tolist() if torch.equal(expected, positions) else None


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          sliding_window=None, **kwargs):
    """transformers' attention-function signature; query/key/value are [batch, heads, length, head_dim]."""
    length = query.shape[2]
    starts = example_starts(kwargs.get("position_ids"), length) if key.shape[2] == length else None
    ends = starts[1:] + [length] if starts is not None else None
    needs_mask = sliding_window is not None and starts is not None and any(
        end - start > sliding_window for start, end in zip(starts, ends))
    if starts is None or (needs_mask and attention_mask is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    # CPU flash attention reads key/value heads shared by groups of query heads as they are; on CUDA
    # only some kernels do (not memory-efficient attention), so there they are repeated, as transformers does
    shared_heads = query.device.type == "cpu" and key.shape[1] != query.shape[1]
    if not shared_heads:
        groups = getattr(module, "num_key_value_groups", 1)
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    sizes = [end - start for start, end in zip(starts, ends)]
    if query.device.type == "cpu" and query.dtype in FLASH_DTYPES and not needs_mask and not dropout:
        return ExampleFlashAttention.apply(query, key, value, sizes, scaling), None
    # split, not slices: its backward writes the pieces' gradients into one tensor, where each slice's
    # backward would zero a whole-row tensor of its own
    pieces = zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2), starts, ends)
    outputs = []
    for query_piece, key_piece, value_piece, start, end in pieces:
        # An example longer than the sliding window keeps its slice of the model's own mask.
        within_window = sliding_window is None or end - start <= sliding_window
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            query_piece, key_piece, value_piece,
            attn_mask=None if within_window else attention_mask[:, :, start:end, start:end],
            dropout_p=dropout, scale=scaling, is_causal=within_window,
            enable_gqa=shared_heads,
        ))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


class ExampleFlashAttention(torch.autograd.Function):
    """Causal attention within each example of a packed row, by the CPU flash-attention kernel SDPA uses.

    Autograd around SDPA keeps each example's output for the kernel's backward, and the output
    projection keeps the [length, heads * head_dim] copy it reads (concatenated and transposed):
    the same values twice, 4 KiB per token and layer for Gemma 3 270M. Here the examples' outputs
    are written into one [batch, length, heads, head_dim] tensor, which is both what the model reads
    and what backward keeps, so they are kept once; the kernel calls are SDPA's own.

    In 16-bit dtypes each example goes to the kernel padded with zeros to a multiple of LENGTH_STEP
    tokens. The kernel's 16-bit path builds matrix-product kernels for each sequence length it meets
    and keeps them for the life of the process (torch 2.13; its float32 path keeps none), so memory
    grows with each new length, and a fine-tuning run meets hundreds of lengths. Under a causal mask
    no real position attends to the padding after it, and the padding's output (discarded) gets no
    gradient, so the real positions' outputs and gradients are those of the example alone.

    Backward is the kernel's own only for examples longer than DENSE_BACKWARD_MAX tokens. Shorter
    ones (every GSM8K example) go through `dense_backward`: the same gradients from five matrix
    products over the example's whole [length, length] score matrix, recomputed from the
    forward's log-sum-exp. On CPUs the kernel's 16-bit backward works in small blocks and took
    about nine times its forward (bench/RESULTS.md); at these lengths the score matrix is small.
    """

    @staticmethod
    def forward(ctx, query, key, value, sizes, scale):
        batch, heads, length, head_dim = query.shape
        output = query.new_empty(batch, length, heads, head_dim)
        pieces = zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2), output.split(sizes, 1))
        logsumexps = []
        for query_piece, key_piece, value_piece, output_piece in pieces:
            attended, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                *_padded(query_piece, key_piece, value_piece), 0.0, True, scale=scale)
            output_piece.copy_(attended[:, :, : query_piece.shape[2]].transpose(1, 2))
            logsumexps.append(logsumexp)
        ctx.save_for_backward(query, key, value, output, *logsumexps)
        ctx.sizes, ctx.scale = sizes, scale
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, *logsumexps = ctx.saved_tensors
        grads = [torch.empty_like(tensor) for tensor in (query, key, value)]
        sizes = ctx.sizes
        pieces = zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2), output.split(sizes, 1),
                     grad_output.split(sizes, 1), logsumexps, *(grad.split(sizes, 2) for grad in grads))
        for query_piece, key_piece, value_piece, output_piece, grad_piece, logsumexp, *grad_pieces in pieces:
            size = query_piece.shape[2]
            padded = _padded(grad_piece.transpose(1, 2), query_piece, key_piece, value_piece, output_piece.transpose(1, 2))
            if size <= DENSE_BACKWARD_MAX:
                piece_grads = dense_backward(*padded, logsumexp, ctx.scale)
            else:
                piece_grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    *padded, logsumexp, 0.0, True, scale=ctx.scale)
            for grad_piece_out, piece_grad in zip(grad_pieces, piece_grads):
                grad_piece_out.copy_(piece_grad[:, :, :size])
        return *grads, None, None


LENGTH_STEP = 64  # tokens: the lengths an example is padded to for the CPU flash-attention kernel
DENSE_BACKWARD_MAX = 1024  # tokens: longer examples' backward is the kernel's (dense_backward's scores grow as length^2)


def dense_backward(grad_output, query, key, value, output, logsumexp, scale):
    """Causal attention's gradients (query's, key's, value's) for one example, from its forward's results.

    query, output and grad_output [1, heads, n, d]; key and value [1, kv_heads, n, d] (each key/value
    head shared by a group of query heads); logsumexp [1, heads, n], the forward's, in float32 or
    wider: the arguments of the CPU flash-attention kernel's backward, in its order. The textbook
    backward of softmax attention (FlashAttention's, without its tiling): P = exp(scale * Q K^T -
    logsumexp) on and below the diagonal, dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)),
    dQ = scale * dS K, dK = scale * dS^T Q. A group's query heads are stacked into one product with
    their shared key. The products read and write the inputs' dtype; for 16-bit inputs the softmax's
    arithmetic (scores, probabilities, their gradient) is float32. The upper triangle is zeroed after
    exp rather than set to -inf before it: exp of -inf takes a slow path on CPUs.
    """
    heads, n, head_dim = query.shape[1:]
    group = heads // key.shape[1]
    above = torch.ones(n, n, dtype=torch.bool, device=query.device).triu_(1)
    exact = torch.promote_types(query.dtype, torch.float32)
    grads = [torch.empty_like(tensor) for tensor in (query, key, value)]
    for kv_head in range(key.shape[1]):
        rows = slice(kv_head * group, (kv_head + 1) * group)
        q, g, o = (tensor[0, rows].reshape(group * n, head_dim) for tensor in (query, grad_output, output))
        k, v = key[0, kv_head], value[0, kv_head]
        probs = (q @ k.t()).to(exact).mul_(scale).sub_(logsumexp[0, rows].reshape(-1, 1)).exp_()
        probs.view(group, n, n).masked_fill_(above, 0.0)
        grads[2][0, kv_head] = probs.to(query.dtype).t() @ g
        row_dot = (g.to(exact) * o.to(exact)).sum(dim=-1, keepdim=True)
        grad_scores = probs.mul_((g @ v.t()).to(exact).sub_(row_dot)).mul_(scale).to(query.dtype)
        grads[0][0, rows] = (grad_scores @ k).view(group, n, head_dim)
        grads[1][0, kv_head] = grad_scores.t() @ q
    return grads


def _padded(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """16-bit [batch, heads, length, head_dim] tensors with zeros after them, to a multiple of LENGTH_STEP tokens."""
    missing = -tensors[0].shape[2] % LENGTH_STEP if tensors[0].dtype in (torch.bfloat16, torch.float16) else 0
    return [torch.nn.functional.pad(tensor, (0, 0, 0, missing)) if missing else tensor for tensor in tensors]


def use_packed_attention(model) -> int:
    """Switch a model from SDPA to per-example SDPA (masks are built as for SDPA); returns 1."""
    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return 1
