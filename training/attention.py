"""Exact packed attention for transformers models: `attn_implementation="facets_varlen"`.

TRL's padding-free SFT batches are one row of several samples, with `cu_seq_lens_q` marking where each
starts. This attention runs every sample as its own causal sequence, so no token attends across a sample
boundary, and nothing is spent on the masked blocks: on a GPU through PyTorch's variable-length flash
kernel (`torch.nn.attention.varlen.varlen_attn`), elsewhere (the CPU, fp32) through SDPA per sample.
Padded batches and decoding with a cache take the ordinary SDPA path with a dense mask, so the same
model also serves DPO, ORPO and `generate`. Importing this module registers the name.
"""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

NAME = "facets_varlen"


def sample_bounds(kwargs: dict, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Cumulative sample starts over the flattened batch (int32, first 0, last batch x length)."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is not None:
        return bounds.to(device=device, dtype=torch.int32)
    position_ids = kwargs.get("position_ids")
    if batch == 1 and position_ids is not None:  # packed without the collator's bounds: a sample starts at 0
        starts = (position_ids.reshape(-1) == 0).nonzero().flatten()
        if starts.numel() and starts[0] == 0:
            return torch.cat([starts, torch.tensor([length], device=starts.device)]).to(device, torch.int32)
    return torch.arange(0, (batch + 1) * length, length, device=device, dtype=torch.int32)


@lru_cache(maxsize=1)
def _flash_kernel():
    """PyTorch's varlen flash attention and the keywords this torch version takes, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _use_flash(query: torch.Tensor) -> bool:
    return query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and _flash_kernel() is not None


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    """Under autocast (fp32 master weights) RoPE hands fp32 queries over; the kernel wants the bf16 it would get."""
    if query.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return query.dtype


def _flash(q, k, v, bounds, longest: int, scaling, sliding_window) -> torch.Tensor:
    kernel, accepts = _flash_kernel()
    extra: dict = {"scale": scaling} if "scale" in accepts else {}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in accepts:
            extra["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "window_size" in accepts:
        extra["window_size"] = (sliding_window - 1 if sliding_window else -1, 0)
    else:
        extra["is_causal"] = True
    return kernel(q, k, v, bounds, bounds, longest, longest, **extra)


def _per_sample(q, k, v, bounds, scaling, sliding_window) -> torch.Tensor:
    """The reference path: SDPA over each sample on its own (exact, for the CPU and fp32)."""
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        mask = _causal(end - start, end - start, 0, sliding_window, q.device) if sliding_window else None
        out[start:end] = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scaling,
            enable_gqa=ks.shape[1] != qs.shape[1])[0].transpose(0, 1)
    return out


def _causal(q_len: int, k_len: int, offset: int, sliding_window, device) -> torch.Tensor:
    rows = torch.arange(q_len, device=device)[:, None] + offset
    cols = torch.arange(k_len, device=device)[None, :]
    mask = cols <= rows
    if sliding_window:
        mask &= cols > rows - sliding_window
    return mask


def _dense_mask(padding: torch.Tensor | None, batch: int, q_len: int, k_len: int, sliding_window, device):
    """4-D boolean mask for SDPA: causal (queries are the last q_len keys) and not padding."""
    mask = _causal(q_len, k_len, k_len - q_len, sliding_window, device)[None, None].expand(batch, 1, q_len, k_len)
    if padding is not None:
        mask = mask & padding[:, None, None, -k_len:].to(torch.bool)
    # a query with nothing to attend to (a left-padding slot) would turn NaN and spread through the values
    return mask | ~mask.any(dim=-1, keepdim=True)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             sliding_window=None, **kwargs):
    """transformers' attention signature: query (B, H, L, D), key/value (B, H_kv, S, D) -> ((B, L, H, D), None)."""
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    if attention_mask is not None or q_len != k_len or dropout:
        mask = _dense_mask(attention_mask, batch, q_len, k_len, sliding_window, query.device)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    bounds = sample_bounds(kwargs, batch, q_len, query.device)
    dtype = _compute_dtype(query)
    q, k, v = (t.transpose(1, 2).reshape(batch * q_len, t.shape[1], dim).to(dtype) for t in (query, key, value))
    if _use_flash(q):
        longest = int(kwargs.get("max_length_q") or int(bounds.diff().max()))
        out = _flash(q, k, v, bounds, longest, scaling, sliding_window)
    else:
        out = _per_sample(q, k, v, bounds, scaling, sliding_window)
    return out.reshape(batch, q_len, heads, dim), None


def register() -> str:
    AttentionInterface.register(NAME, varlen_attention_forward)
    # the model passes a 2-D padding mask when there is padding and None otherwise, as for flash attention
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)
    return NAME


register()
