"""Math shared by the families: norms, activations, rotary embeddings, attention over a KV cache.

Each operation is one function call so that a fused Triton kernel can later replace its body
(same signature, same result) without touching the family files. Every function follows the
dtype rules of the transformers implementation it mirrors, so that bfloat16 results agree too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import kernels
from kernels.kv_quant import cache_prefix, quantize_kv
from zeroinf.models.base import Context, LayerKV, QuantWeight
from zeroinf.models.config import ModelConfig, Rope


def linear(
    x: torch.Tensor, w: torch.Tensor | QuantWeight, b: torch.Tensor | None = None
) -> torch.Tensor:
    if isinstance(w, QuantWeight):  # never materialises the float weight on a GPU
        fn = kernels.qmatmul if x.is_cuda and kernels.HAS_TRITON_GPU else kernels.qmatmul_ref
        return fn(x.contiguous(), w.qweight, w.scales, w.zeros, b)
    return F.linear(x, w, b)


def linear_act(
    x: torch.Tensor, w: torch.Tensor | QuantWeight, b: torch.Tensor | None, act: str
) -> torch.Tensor:
    """activation(linear(x, w, b), act). A float ReLU layer with a bias on a GPU runs it as
    cuBLASLt's bias + ReLU epilogue (torch._addmm_activation): the same bytes as the two
    calls (tools/bench_prefill_elementwise.py checks it), one pass over the output fewer
    (OPT-30B's prefill: ~0.08 s of ~5 s). x [..., K], w [N, K], b [N] -> [..., N]."""
    if act == "relu" and b is not None and x.is_cuda and isinstance(w, torch.Tensor):
        y = torch._addmm_activation(b, x.reshape(-1, x.shape[-1]), w.t())
        return y.view(*x.shape[:-1], w.shape[0])
    return activation(linear(x, w, b), act)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalise in float32, cast back, then scale (the order matters in bf16);
    kernels.rms_norm_ref is this math, and the fused kernel's reference."""
    return kernels.rms_norm_ref(x, w, eps)[0]


def layer_norm(
    x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float
) -> torch.Tensor:
    return kernels.layer_norm_ref(x, w, b, eps)[0]


def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """act is a normalised name (config.ACTIVATIONS, the same set as kernels.act.ACTS)."""
    return kernels.activation_ref(x, act)


def gated_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    act: str,
    b_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """down(act(gate(x)) * up(x)): the Llama MLP and each Mixtral expert."""
    return linear(
        activation(linear(x, w_gate, b_gate), act) * linear(x, w_up, b_up), w_down, b_down
    )


# ---------------------------------------------------------------------------------------------
# Rotary embeddings


def inv_freq(rope: Rope, max_positions: int, positions: torch.Tensor) -> torch.Tensor:
    """[dim/2] float32 inverse frequencies, as transformers' ROPE_INIT_FUNCTIONS compute them."""
    dim, dev = rope.dim, positions.device
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=dev).float() / dim  # [dim/2]
    if rope.type == "dynamic":
        # NTK-aware base that grows with the longest position of this step (transformers keeps
        # the same value statefully while generating; as tokens only append, both agree).
        seq = torch.clamp((positions.max() + 1).float(), min=float(max_positions))
        scale = (rope.factor * seq / max_positions - (rope.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / ((rope.theta * scale) ** exponent)
    freq = 1.0 / (rope.theta**exponent)
    if rope.type == "linear":
        return freq / rope.factor
    if rope.type == "llama3":
        old = rope.original_max_positions
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > low_wavelen, freq / rope.factor, freq)
        smooth = (old / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if rope.type == "yarn":
        return _yarn_inv_freq(rope, dim, dev)
    return freq


def _yarn_inv_freq(rope: Rope, dim: int, dev: torch.device) -> torch.Tensor:
    def correction_dim(rotations: float) -> float:
        ratio = rope.original_max_positions / (rotations * 2 * math.pi)
        return dim * math.log(ratio) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp.to(dev)  # [dim/2]: 1 keeps the original frequency
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, device=dev).float() / dim)
    return (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolation) + (
        1.0 / pos_freqs
    ) * extrapolation


def rotary(ctx: Context, cfg: ModelConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [B, S, rope.dim] in `dtype`, computed once per step and kept in ctx.memo."""
    key = ("rotary", dtype)
    if key not in ctx.memo:
        assert cfg.rope is not None
        freq = inv_freq(cfg.rope, cfg.max_positions, ctx.positions)  # [dim/2] float32
        angles = ctx.positions[..., None].float() * freq  # [B, S, dim/2]
        emb = torch.cat((angles, angles), dim=-1)  # [B, S, dim]
        scale = cfg.rope.attention_factor
        ctx.memo[key] = ((emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype))
    return ctx.memo[key]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D]; rotates the first cos.shape[-1] channels (all of them unless partial)."""
    rot = cos.shape[-1]
    xr, xp = (x, None) if rot == x.shape[-1] else (x[..., :rot], x[..., rot:])
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, S, rot]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
    out = xr * cos + torch.cat((-x2, x1), dim=-1) * sin
    return out if xp is None else torch.cat((out, xp), dim=-1)


# ---------------------------------------------------------------------------------------------
# Attention


def window_mask(ctx: Context, window: int | None) -> torch.Tensor:
    """ctx.mask, narrowed to the last `window` cache positions of each query (Mistral)."""
    if window is None:
        return ctx.mask
    key = ("window_mask", window)
    if key not in ctx.memo:
        S, T = ctx.mask.shape[-2:]
        dev = ctx.mask.device
        q_idx = torch.arange(ctx.start, ctx.start + S, device=dev)[:, None]  # [S, 1]
        k_idx = torch.arange(T, device=dev)[None, :]  # [1, T]
        # transformers' sliding_window_overlay: kv_idx > q_idx - window, on cache indices.
        ctx.memo[key] = ctx.mask & (k_idx > q_idx - window)
    return ctx.memo[key]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: LayerKV,
    ctx: Context,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Write this step's k, v into the cache and attend over kv[:, :, :start + S] (the whole
    cache, masked, in the whole-cache form: Context.write_index). A host cache (LayerKV.host,
    the "cpu" KV tier) attends on the CPU: models/host_attention.py.

    q [B, H, S, D]; k, v [B, Hkv, S, D] -> [B, S, H * D].
    """
    B, H, S, D = q.shape
    # A prefill over an int8 cache attends over its own keys as computed, not over their int8
    # round trip (transformers' QuantizedCache does the same), and over earlier ones from the
    # cache. The rule depends only on S, so a prompt gets the same keys whether it is prefilled
    # alone or beside other rows' decode (continuous refill).
    fresh_keys = kv.quantized and ctx.write_index is None and S > 1
    if kv.host:
        from zeroinf.models.host_attention import attend_host

        return attend_host(q, k, v, kv, ctx.start, window_mask(ctx, window), scale, fresh_keys)
    write_kv(kv, k, v, ctx.start, ctx.write_index)
    if S == 1 and ctx.write_index is not None and q.is_cuda and kernels.HAS_TRITON_GPU:
        # GQA without expanding kv heads, an int8 cache read inside the kernel
        key_mask = window_mask(ctx, window)[:, 0, 0]  # [B, T_max]
        T = kv.k.shape[2]
        o = kernels.decode_attention(q, kv.k, kv.v, T, key_mask=key_mask, scale=scale,
                                     k_scale=kv.k_scale, v_scale=kv.v_scale)  # fmt: skip
        return o.view(B, 1, H * D)  # o [B, H, 1, D] contiguous
    end = None if ctx.write_index is not None else ctx.start + S
    keys, values = step_keys(kv, end, q.dtype, (k, v) if fresh_keys else None)  # [B, Hkv, T, D]
    o = sdpa(q, keys, values, window_mask(ctx, window), scale)  # [B, H, S, D]
    return o.transpose(1, 2).reshape(B, S, H * D)


def sdpa(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [B, H, S, D] over keys, values [B, Hkv, T, D] with mask [B, 1, S, T] -> [B, H, S, D]."""
    B, H, S, D = q.shape
    n_rep = H // keys.shape[1]
    if n_rep > 1:
        # GQA: expand kv heads. SDPA's enable_gqa would avoid the copy but sends a masked call
        # to the slow math backend on CUDA (transformers makes the same choice).
        T = keys.shape[2]
        keys = keys[:, :, None].expand(B, -1, n_rep, T, D).reshape(B, H, T, D)
        values = values[:, :, None].expand(B, -1, n_rep, T, D).reshape(B, H, T, D)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def kv_pairs(
    kv: LayerKV, k: torch.Tensor, v: torch.Tensor
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """(cache tensor, what goes into it) for k, v [B, Hkv, S, D]: (kv.k, k), (kv.v, v), or for
    an int8 cache the quantized values and their scales [B, Hkv, S] beside kv.k_scale,
    kv.v_scale (kernels.kv_quant, on k's device)."""
    if not kv.quantized:
        return ((kv.k, k), (kv.v, v))
    assert kv.k_scale is not None and kv.v_scale is not None
    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    return ((kv.k, kq), (kv.k_scale, ks), (kv.v, vq), (kv.v_scale, vs))


def write_kv(
    kv: LayerKV, k: torch.Tensor, v: torch.Tensor, start: int, index: torch.Tensor | None = None
) -> None:
    """k, v [B, Hkv, S, D] into the cache at indices start .. start+S-1, or at `index` [S]
    (the whole-cache form, Context.write_index); int8 caches quantize them first."""
    for cache, x in kv_pairs(kv, k, v):  # cache [B, Hkv, T_max, ...], x [B, Hkv, S, ...]
        x = x.to(cache.dtype)
        if index is None:
            copy_wide(cache[:, :, start : start + x.shape[2]], x)
        else:
            cache.index_copy_(2, index, x)


def copy_wide(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src) for tensors of one dtype and shape, moved as 8-byte words where both
    allow it (last dim contiguous, its bytes and every other stride a multiple of 8 bytes,
    8-byte aligned): a transposed source (the projection's keys [B, S, H, D] viewed as
    [B, H, S, D]) otherwise copies 2 bytes at a time, ~25% slower on the H100
    (tools/bench_prefill_elementwise.py). The same bytes either way; returns dst."""
    if _wide_copy_ok(dst, src):
        dst.view(torch.int64).copy_(src.view(torch.int64))
    else:
        dst.copy_(src)
    return dst


def _wide_copy_ok(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether copy_wide may move dst's and src's bytes as int64 words: Tensor.view(int64)'s
    rules (which read the offset within the storage) and the words' alignment in memory."""
    size = dst.element_size()
    return (
        dst.dtype == src.dtype and dst.shape == src.shape and dst.dim() > 0 and size < 8
        and all(t.stride(-1) == 1 and t.data_ptr() % 8 == 0 for t in (dst, src))
        and all(t.storage_offset() * size % 8 == 0 for t in (dst, src))
        and all(s * size % 8 == 0 for t in (dst, src) for s in t.stride()[:-1])
        and dst.shape[-1] * size % 8 == 0
    )  # fmt: skip


def read_kv(kv: LayerKV, end: int | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of cache indices 0 .. end-1 (all of them when end is None) in `dtype`:
    each [B, Hkv, T, D]."""
    return cache_prefix(kv.k, kv.v, end, kv.k_scale, kv.v_scale, dtype)


def step_keys(
    kv: LayerKV, end: int | None, dtype: torch.dtype,
    fresh: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Keys and values a step attends over, each [B, Hkv, T, D] in `dtype`: cache indices
    0 .. end-1 (the whole cache when end is None); with `fresh` (this step's own k, v
    [B, Hkv, S, D]), the last S of them as computed rather than read back from the cache."""
    if fresh is None:
        return read_kv(kv, end, dtype)
    assert end is not None
    keys, values = fresh[0].to(dtype), fresh[1].to(dtype)
    S = keys.shape[2]
    if end > S:
        old_k, old_v = read_kv(kv, end - S, dtype)
        keys, values = torch.cat((old_k, keys), 2), torch.cat((old_v, values), 2)
    return keys, values


def precompute(ctx: Context, cfg: ModelConfig, dtype: torch.dtype) -> None:
    """Fill ctx.memo with every per-step value a layer computes on first use (rotary cos/sin,
    a window mask). Replayed CUDA graphs must find them already made, outside the graphs."""
    if cfg.rope is not None:
        rotary(ctx, cfg, dtype)
    if cfg.sliding_window is not None:
        window_mask(ctx, cfg.sliding_window)
