"""Packed (padding-free) encoding: many texts in one row, attention kept inside each text.

A padded batch of texts with very different lengths spends compute on pad tokens, and the
padding mask pushes SDPA off its fastest (flash) kernel. Packing removes both costs:

1. the batch's token ids are concatenated into ONE row of ``T = sum(lengths)`` tokens;
2. positions restart at 0 for every text (``position_ids``), so rotary embeddings see each
   text exactly as they would alone;
3. attention is variable-length and causal over the boundaries
   ``cu_seqlens = [0, l1, l1 + l2, ..., T]``: a token attends only to earlier tokens of its own
   text (and, for sliding-window layers, only to the last ``sliding_window`` of them).

Everything else in a decoder layer (projections, MLP, norms) acts on each token independently,
so a packed forward gives every text the vector it gets alone, up to float rounding. Pooling
reads the boundaries: the last token of text ``i`` is row ``cu_seqlens[i + 1] - 1``.

The attention is registered with transformers as the implementation ``conretriever_packed``
and switched on only inside :func:`packed_attention`; transformers builds no mask for an
implementation it does not know (the boundaries replace the mask). On CUDA in bf16/fp16 it
runs ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention's varlen kernel, part of
PyTorch >= 2.10); anywhere else a loop of causal SDPA calls, one per text: exact and used by
the CPU tests, not fast. A decoder switched to bidirectional attention (Gemma-3's
``use_bidirectional_attention``: every token sees its whole text, or the window around it) is
packed the same way, with non-causal attention inside each text; it always takes the loop
(the varlen kernel call here is the causal one). Encoders keep padding. Attention dropout is
not applied (the decoders packed here train without it).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

ATTN_NAME = "conretriever_packed"


def packable(config) -> bool:
    """Decoder configs whose attention the packed path computes exactly: causal, no logit
    soft-capping (Gemma-2 caps attention logits, which the varlen kernel does not)."""
    return getattr(config, "attn_logit_softcapping", None) is None


@functools.cache
def _varlen_attn():
    """PyTorch's varlen FlashAttention (>= 2.10), or None; looked up once per process."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_kernel_available(device: torch.device) -> bool:
    """True where the fast path runs: a CUDA device and a PyTorch with ``varlen_attn``."""
    return torch.device(device).type == "cuda" and _varlen_attn() is not None


def pack(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Id lists -> ([1, T] ids, [1, T] positions restarting per text, [n + 1] int32 cumulative
    boundaries, longest length). ``T`` is the total number of real tokens; nothing is padded."""
    lengths = [len(s) for s in seqs]
    if not lengths or min(lengths) < 1:
        raise ValueError("pack() needs at least one text and no empty token lists")
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long).unsqueeze(0)
    positions = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths]).unsqueeze(0)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return ids, positions, cu, max(lengths)


def pool_packed(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mode: str) -> torch.Tensor:
    """[T, dim] packed states + [n + 1] boundaries -> [n, dim] (last, cls or mean pooling)."""
    cu = cu_seqlens.to(device=hidden.device, dtype=torch.long)
    if mode == "last":
        return hidden[cu[1:] - 1]
    if mode == "cls":
        return hidden[cu[:-1]]
    if mode == "mean":
        lengths = cu[1:] - cu[:-1]
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
        sums = torch.zeros(
            len(lengths), hidden.shape[-1], device=hidden.device, dtype=torch.float32
        )
        sums.index_add_(0, segment, hidden.float())
        return (sums / lengths.unsqueeze(1).float()).to(hidden.dtype)
    raise ValueError(f"unknown pooling {mode!r}; use last, mean or cls")


def _band_mask(length: int, window: int, device: torch.device, causal: bool = True) -> torch.Tensor:
    """[L, L] bool: query i sees key j iff j <= i and i - j < window (transformers' sliding
    window: the token itself and the ``window - 1`` before it); not ``causal``: iff
    |i - j| < window (transformers' bidirectional window, Gemma-3's
    ``use_bidirectional_attention``)."""
    i = torch.arange(length, device=device).unsqueeze(1)
    j = torch.arange(length, device=device).unsqueeze(0)
    near = (i - j).abs() < window
    return near & (j <= i) if causal else near


def _packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``query`` [1, Hq, T, D], ``key``/``value``
    [1, Hkv, T, D] (Hq a multiple of Hkv: grouped-query attention) -> ([1, T, Hq, D], None).
    The text boundaries arrive as ``cu_seq_lens_q`` / ``max_length_q`` keyword arguments, passed
    by the model's forward down to every attention layer."""
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None or max_len is None or query.shape[0] != 1:
        raise RuntimeError(
            f"{ATTN_NAME} attention needs one packed row and cu_seq_lens_q/max_length_q; "
            "use Embedder.forward_packed"
        )
    if attention_mask is not None:
        raise RuntimeError(f"{ATTN_NAME} attention got a padding mask; packed rows have none")
    if kwargs.get("softcap") is not None:
        # Gemma-2's logit soft-capping: not what the varlen kernel computes
        raise NotImplementedError(
            f"{ATTN_NAME} attention does not support logit soft-capping; encode with packed=False"
        )
    causal = getattr(module, "is_causal", True)  # False: bidirectional (Gemma-3's option)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    if k.shape[1] != q.shape[1]:  # grouped-query attention: query head h reads kv head h // rep
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    window = sliding_window if sliding_window and sliding_window < max_len else None
    varlen_attn = _varlen_attn()
    fast = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and varlen_attn is not None
    if fast and causal:  # bidirectional layers take the per-text loop below (exact, slower)
        out = varlen_attn(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            cu.to(q.device),
            cu.to(q.device),
            max_len,
            max_len,
            scale=scaling,
            window_size=(window - 1 if window else -1, 0),  # (-1, 0) = causal, unlimited left
        )
    else:
        # Split, not slice: the backward of n slices writes each gradient into its own
        # zero-filled [T, H, D] tensor (n x T memory traffic per layer, ~10% of a CPU training
        # step at 32 texts); a split's backward is one concatenation.
        lengths = (cu[1:] - cu[:-1]).tolist()
        pieces = []
        for qs, ks, vs in zip(*(t.split(lengths) for t in (q, k, v)), strict=True):
            qs, ks, vs = (t.transpose(0, 1) for t in (qs, ks, vs))  # [H, L, D]
            length = qs.shape[1]
            if window and length > window:
                mask = _band_mask(length, window, q.device, causal)
                res = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scaling)
            else:
                res = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scaling)
            pieces.append(res.transpose(0, 1))
        out = torch.cat(pieces)
    return out.unsqueeze(0), None


@contextmanager
def packed_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``model`` (a transformers model; its config is shared by its layers)
    attends with the packed implementation; the previous implementation is restored after."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _packed_attention_forward)  # idempotent
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTN_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
