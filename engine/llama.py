"""The Llama family in one file: Llama, Mistral, Qwen2 and SmolLM (tied embeddings), gpt-fast style.

Architecture differences are named flags on `ModelArgs`, read once from config.json. The model owns a
static KV cache, so a forward call takes the absolute positions of its tokens (`input_pos`) and how much of
the cache attention should read (`kv_len`): the exact length on CPU, a fixed bucket under a CUDA graph.
Every linear layer is an `nn.Module` with `forward(x)`, so quantized layers (engine.quant_linear) swap in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine import fused_ops

# config.json model_type values this file implements; anything else falls back to transformers.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass
class ModelArgs:
    model_type: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096                      # hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32                 # < n_heads: grouped-query attention (GQA)
    head_dim: int = 128
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    # RoPE scaling, HF semantics: {"rope_type": linear|dynamic|llama3, "factor": ..., ...} or {} for none.
    rope_scaling: dict = field(default_factory=dict)
    # Llama 3.2 / SmolLM / small Qwen2: lm_head reuses the embedding matrix.
    tie_word_embeddings: bool = False
    # Qwen2 puts biases on q/k/v (not o); Llama's `attention_bias` puts them on q/k/v/o.
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Mistral v0.1 (and Qwen2 with use_sliding_window): a token attends to the last `sliding_window` only.
    sliding_window: int | None = None

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """ModelArgs from a config.json dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        model_type = config.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"the engine does not implement model_type {model_type!r}")
        n_heads = config["num_attention_heads"]
        dim = config["hidden_size"]
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))  # "type": transformers < 4.45
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"the engine does not implement RoPE type {rope_type!r}")
        rope = {} if rope_type == "default" else {**rope, "rope_type": rope_type}
        attention_bias = bool(config.get("attention_bias", False))
        window = None
        if model_type == "mistral" or (model_type == "qwen2" and config.get("use_sliding_window")):
            window = config.get("sliding_window")
        return cls(
            model_type=model_type,
            vocab_size=config["vocab_size"],
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or dim // n_heads,
            intermediate_size=config["intermediate_size"],
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            rope_theta=rope_theta,
            rope_scaling=rope,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            sliding_window=int(window) if window else None,
        )


class KVCache(nn.Module):
    """Keys and values for every position up to max_seq_len: [B, H_kv, T, D], written in place."""

    def __init__(self, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        shape = (1, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        # input_pos: [S]; k, v: [1, H_kv, S, D]. index_copy_ keeps the write graph-capturable.
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]


class RMSNorm(nn.Module):
    """out_order: when set, the output's last dim comes in that order (the next matmul's act-order input
    order, engine.weights.fold_input_orders)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("out_order", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # transformers' order of operations; F.rms_norm is slower on CPU
            y = self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        else:
            # bf16/fp16: one fused kernel (fp32 statistics inside). GPU decode is launch-bound, and the
            # eager form (cast, square, mean, rsqrt, scale, cast, weight) costs 7 launches a norm.
            y = F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return y if self.out_order is None else y.index_select(-1, self.out_order)


class Rotary(nn.Module):
    """RoPE cos/sin for given positions, with HF's default / linear / dynamic-NTK / llama3 frequencies."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        d = args.head_dim
        self.register_buffer("base_inv_freq", self.inv_freq(args.rope_theta), persistent=False)
        self.dynamic = args.rope_scaling.get("rope_type") == "dynamic"
        self.exponent = d / (d - 2)

    def inv_freq(self, base: float) -> torch.Tensor:
        a, d = self.args, self.args.head_dim
        inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))   # [D/2]
        s = a.rope_scaling
        if s.get("rope_type") == "linear":
            inv = inv / s["factor"]
        elif s.get("rope_type") == "llama3":
            factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
            old_len = s["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
            # Between the two wavelengths, blend the scaled and unscaled frequencies linearly.
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
            inv = torch.where(medium, smoothed, scaled)
        return inv

    def forward(self, input_pos: torch.Tensor, dtype: torch.dtype):
        # input_pos: [S] -> cos, sin: [S, D], built from positions each call (cheap, and graph-safe).
        inv = self.base_inv_freq
        if self.dynamic:
            # Dynamic NTK: past the trained length L, raise the base as HF does for the longest position
            # seen so far, (factor * len / L - (factor - 1)) ** (d / (d - 2)). Tensor ops keep it in-graph.
            a = self.args
            factor, trained = a.rope_scaling["factor"], a.max_position_embeddings
            seq_len = torch.clamp(input_pos.max() + 1, min=trained).float()
            base = a.rope_theta * (factor * seq_len / trained - (factor - 1)) ** self.exponent
            d = a.head_dim
            inv = 1.0 / (base ** (torch.arange(0, d, 2, device=input_pos.device).float() / d))
        freqs = input_pos.float()[:, None] * inv[None, :]                  # [S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                               # [S, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, S, H, D], cos/sin: [S, 1, D]; HF's rotate-half layout (not interleaved pairs).
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        q_size, kv_size = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        # q, k and v read the same input: one fused matmul reads x once and launches once.
        self.wqkv = nn.Linear(args.dim, q_size + 2 * kv_size, bias=args.qkv_bias)
        self.wo = nn.Linear(q_size, args.dim, bias=args.o_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos, kv_len: int):
        # x: [B, S, dim]; mask: [S, kv_len] bool (True = may attend)
        B, S, _ = x.shape
        H, H_kv = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x).view(B, S, H + 2 * H_kv, self.head_dim)            # [B, S, H + 2 H_kv, D]
        cache = self.kv_cache
        if fused_ops.usable(qkv) and self.head_dim & (self.head_dim - 1) == 0:
            # One kernel: RoPE on q and k, k and v into the cache (Triton wants a power-of-two head size).
            q = fused_ops.rotary_into_cache(qkv, cos, sin, input_pos, cache.k, cache.v, H, H_kv).transpose(1, 2)
            k, v = cache.k[:, :, :kv_len], cache.v[:, :, :kv_len]
        else:
            # Rotate q and k together: one set of kernels instead of two (decode is launch-bound on GPU).
            qk = apply_rotary(qkv[:, :, : H + H_kv], cos, sin)
            q = qk[:, :, :H].transpose(1, 2)                                  # [B, H, S, D]
            k = qk[:, :, H:].transpose(1, 2)                                  # [B, H_kv, S, D]
            v = qkv[:, :, H + H_kv:].transpose(1, 2)
            k, v = cache.update(input_pos, k, v, kv_len)                     # [B, H_kv, kv_len, D]
        gqa = self.n_kv_heads != self.n_heads   # each kv head serves n_heads / n_kv_heads query heads
        if gqa and x.is_cuda:
            # CUDA keeps the repeated cache: whether SDPA's masked CUDA kernels take grouped heads without
            # falling back to a slower path is not measured yet (no GPU when this changed).
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            gqa = False
        # CPU: grouped heads read in place, without two copies of the cache a layer (~10% of a step).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)   # [B, H, S, D]
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.hidden = args.intermediate_size
        # gate and up read the same input: fused like wqkv.
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w13(x)
        if fused_ops.usable(gate_up):
            return self.w2(fused_ops.silu_mul(gate_up))                       # SwiGLU, one kernel
        gate, up = gate_up.split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up)                                     # SwiGLU


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, delta, cos, sin, mask, input_pos, kv_len: int):
        """This layer's input is x + delta (delta: the previous layer's MLP output, or None): each residual
        add is done together with the norm that follows it. Returns (h, mlp_out); h + mlp_out is the output."""
        x, normed = add_norm(x, delta, self.attention_norm)
        h, normed = add_norm(x, self.attention(normed, cos, sin, mask, input_pos, kv_len), self.ffn_norm)
        return h, self.feed_forward(normed)


def add_norm(x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, norm(h)) with h = x + delta (x itself when delta is None): on CUDA one kernel for both."""
    if delta is None:
        return x, norm(x)
    if fused_ops.usable(x):
        return fused_ops.add_rms_norm(x, delta, norm.weight, norm.eps, norm.out_order)
    h = x + delta
    return h, norm(h)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rotary = Rotary(args)
        self.max_seq_len = 0

    def setup_caches(self, max_seq_len: int, dtype: torch.dtype) -> None:
        """Allocate each layer's KV cache on the device that layer's weights live on."""
        self.max_seq_len = max_seq_len
        for layer in self.layers:
            device = layer.attention_norm.weight.device
            layer.attention.kv_cache = KVCache(max_seq_len, self.args.n_kv_heads, self.args.head_dim, dtype,
                                               device)

    def mask(self, input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        # [S, kv_len]: causal over absolute positions; also blinds cache slots beyond the current
        # position, so stale entries from an earlier generation are never read.
        slots = torch.arange(kv_len, device=input_pos.device)
        mask = slots[None, :] <= input_pos[:, None]
        if self.args.sliding_window:
            mask &= slots[None, :] > input_pos[:, None] - self.args.sliding_window
        return mask

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int,
                last_only: bool = False) -> torch.Tensor:
        """tokens: [B, S] ids at positions input_pos [S]; attends over cache slots [0, kv_len).
        Returns logits [B, S, V] in fp32 ([B, 1, V] with last_only: prefill needs no more)."""
        x = self.tok_embeddings(tokens)                                       # [B, S, dim]
        cos, sin = (t[:, None] for t in self.rotary(input_pos, x.dtype))     # [S, 1, D], broadcast over heads
        mask = self.mask(input_pos, kv_len)
        if fused_ops.usable(x):
            # SDPA turns a bool mask into an additive one in every call (kernels in every layer): once here.
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        delta = None  # the last layer's MLP output, added to x together with the next norm
        for layer in self.layers:
            device = layer.attention_norm.weight.device
            if x.device != device:  # layers split across GPUs: hand the activations on
                x, cos, sin, mask, input_pos = (t.to(device) for t in (x, cos, sin, mask, input_pos))
                delta = None if delta is None else delta.to(device)
            x, delta = layer(x, delta, cos, sin, mask, input_pos, kv_len)
        if last_only:
            x, delta = x[:, -1:], delta[:, -1:]
        device = self.norm.weight.device
        _, x = add_norm(x.to(device), delta.to(device), self.norm)
        return self.output(x).float()
