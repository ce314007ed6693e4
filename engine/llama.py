"""The Llama family in one file, gpt-fast style: Llama, Mistral, Qwen2 and SmolLM (tied embeddings), Qwen3
(per-head q/k norms), Gemma 2 and 3 (GeGLU, scaled embeddings, norms around attention and MLP, soft-capping,
interleaved sliding-window layers with their own RoPE base), Phi-3/3.5/4 (LongRoPE, partial rotary) and,
with engine.moe's block in place of the MLP, Mixtral, Qwen2-MoE and Qwen3-MoE.

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
from engine.decode_attention import decode_attention
from engine.moe import MoEFeedForward

# config.json model_type values this file implements; anything else falls back to transformers.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "gemma2",
                         "gemma3_text", "phi3")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")
# gelu_pytorch_tanh is Gemma's GeGLU; "gelu" is the exact (erf) form.
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}
GEMMA_TYPES = ("gemma2", "gemma3_text")
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
# One window for every layer when config.json sets one (the others mark sliding layers in layer_types).
WHOLE_MODEL_WINDOW = ("mistral", "mixtral", "phi3", "qwen3_moe")


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
    # Which layers use that window (Gemma 2/3 interleave sliding and global layers); empty = all of them.
    sliding_layers: tuple[bool, ...] = ()
    # Gemma 3: sliding layers rotate with their own base (rope_local_base_freq) and scaling; None = the global ones.
    local_rope_theta: float | None = None
    local_rope_scaling: dict = field(default_factory=dict)
    # Phi-4-mini: RoPE turns only the first partial_rotary_factor of each head; the rest passes through.
    partial_rotary_factor: float = 1.0
    hidden_act: str = "silu"             # the MLP's gate activation (ACTIVATIONS)
    # Qwen3 and Gemma 3: an RMSNorm over each head of q and k, before RoPE.
    qk_norm: bool = False
    # Gemma: norm weights are stored as w - 1 ((1 + w) * x_normed); the loader adds norm_offset to them.
    norm_offset: float = 0.0
    # Gemma: embeddings scaled by sqrt(hidden) (rounded to the compute dtype, as transformers does).
    embed_scale: float | None = None
    # Gemma 2/3: RMSNorms on the attention and MLP outputs too, before each residual add.
    sandwich_norms: bool = False
    attn_scale: float | None = None      # Gemma: query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5
    attn_softcap: float | None = None    # Gemma 2: scores -> cap * tanh(scores / cap) before the mask
    final_softcap: float | None = None   # Gemma 2: the same on the logits
    # Phi-3: q/k/v and gate/up are stored fused (qkv_proj, gate_up_proj) in the checkpoint.
    fused_checkpoint: bool = False
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): engine.moe replaces the MLP of `moe_layers`.
    n_experts: int = 0
    n_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True          # renormalise the chosen experts' weights to sum to 1 (Mixtral always)
    shared_expert_intermediate_size: int = 0   # Qwen2-MoE: an always-on expert behind a sigmoid gate
    moe_layers: tuple[bool, ...] = ()

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_window) and (not self.sliding_layers or self.sliding_layers[layer])

    def is_moe(self, layer: int) -> bool:
        return self.n_experts > 0 and (not self.moe_layers or self.moe_layers[layer])

    @property
    def has_moe(self) -> bool:
        """Whether any layer is a mixture of experts."""
        return any(self.is_moe(i) for i in range(self.n_layers))

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """ModelArgs from a config.json dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        model_type = config.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"the engine does not implement model_type {model_type!r}")
        n_heads = config["num_attention_heads"]
        dim = config["hidden_size"]
        n_layers = config["num_hidden_layers"]
        gemma = model_type in GEMMA_TYPES
        rope_params = config.get("rope_parameters") or config.get("rope_scaling") or {}
        local = {}
        if "full_attention" in rope_params:   # transformers 5 keeps one RoPE entry per layer type (Gemma 3)
            rope_params, local = rope_params["full_attention"], rope_params.get("sliding_attention") or {}
        rope_theta, rope, partial = read_rope(rope_params, config, config.get("rope_theta", 10000.0))
        local_theta, local_rope = None, {}
        if local or config.get("rope_local_base_freq"):
            local_theta, local_rope, _ = read_rope(local, config, config.get("rope_local_base_freq", 10000.0))
        attention_bias = bool(config.get("attention_bias", False))
        window = config.get("sliding_window") or None
        if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not config.get("use_sliding_window"):
            window = None
        return cls(
            model_type=model_type,
            vocab_size=config["vocab_size"],
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or dim // n_heads,
            intermediate_size=config.get("intermediate_size") or 0,
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            rope_theta=rope_theta,
            rope_scaling=rope,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", gemma)),
            qkv_bias=attention_bias or model_type in ("qwen2", "qwen2_moe") or bool(config.get("qkv_bias")),
            o_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            sliding_window=int(window) if window else None,
            sliding_layers=sliding_layers(config, model_type, n_layers) if window else (),
            local_rope_theta=local_theta,
            local_rope_scaling=local_rope,
            partial_rotary_factor=partial,
            hidden_act=str(config.get("hidden_activation") or config.get("hidden_act") or "silu"),
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            norm_offset=1.0 if gemma else 0.0,
            embed_scale=dim ** 0.5 if gemma else None,
            sandwich_norms=gemma,
            attn_scale=config["query_pre_attn_scalar"] ** -0.5 if config.get("query_pre_attn_scalar") else None,
            attn_softcap=config.get("attn_logit_softcapping") or None,
            final_softcap=config.get("final_logit_softcapping") or None,
            fused_checkpoint=model_type == "phi3",
            **moe_args(config, model_type, n_layers),
        )


def read_rope(params: dict, config: dict, default_theta: float) -> tuple[float, dict, float]:
    """(theta, scaling in HF's form or {} for none, partial rotary factor) from one RoPE entry of config.json."""
    rope = dict(params)
    theta = float(rope.pop("rope_theta", default_theta))
    partial = float(rope.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))  # "type": transformers < 4.45
    if rope_type == "su":   # Phi-3's first name for LongRoPE
        rope_type = "longrope"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"the engine does not implement RoPE type {rope_type!r}")
    if rope_type == "longrope":
        # Phi-3 keeps the pretrained length beside the scaling entry (transformers 4.x) or inside it (5.x).
        rope.setdefault("original_max_position_embeddings",
                        config.get("original_max_position_embeddings") or config.get("max_position_embeddings"))
    return theta, ({} if rope_type == "default" else {**rope, "rope_type": rope_type}), partial


def sliding_layers(config: dict, model_type: str, n_layers: int) -> tuple[bool, ...]:
    """Which layers use the sliding window: layer_types when config.json lists them, else each family's rule
    (transformers' defaults); () = every layer."""
    if model_type in WHOLE_MODEL_WINDOW:
        return ()
    types = config.get("layer_types")
    if types:
        return tuple(t == "sliding_attention" for t in types)
    if model_type == "gemma2":
        return tuple((i + 1) % 2 == 1 for i in range(n_layers))
    if model_type == "gemma3_text":
        pattern = config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6
        return tuple((i + 1) % pattern != 0 for i in range(n_layers))
    return tuple(i >= config.get("max_window_layers", 28) for i in range(n_layers))   # Qwen2/Qwen3


def moe_args(config: dict, model_type: str, n_layers: int) -> dict:
    """The mixture-of-experts fields of ModelArgs ({} for dense families)."""
    if model_type not in MOE_TYPES:
        return {}
    if model_type == "mixtral":
        return dict(n_experts=config["num_local_experts"], n_experts_per_tok=config["num_experts_per_tok"],
                    moe_intermediate_size=config["intermediate_size"], norm_topk_prob=True)
    # Qwen-MoE: layers in mlp_only_layers, and all but every decoder_sparse_step-th, keep a dense MLP.
    step, dense = config.get("decoder_sparse_step", 1) or 1, set(config.get("mlp_only_layers") or ())
    return dict(n_experts=config.get("num_experts") or config["num_local_experts"],
                n_experts_per_tok=config["num_experts_per_tok"],
                moe_intermediate_size=config["moe_intermediate_size"],
                norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=config.get("shared_expert_intermediate_size") or 0,
                moe_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(n_layers)))


class KVCache(nn.Module):
    """Keys and values for every position up to max_seq_len: [slots, H_kv, T, D], written in place. Each
    generation decoding at once (engine.batch) owns one row; `k` and `v` are the row a call with one row of
    positions reads and writes (row 0 unless `use_row` picked another), and a call with B rows of positions
    uses rows `row` .. row + B - 1 (`rows`)."""

    def __init__(self, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None, slots: int = 1):
        super().__init__()
        shape = (slots, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_all", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_all", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.use_row(0)

    def use_row(self, row: int) -> None:
        """Make `row` the one that calls with positions [S] use, and the first that calls with positions
        [B, S] use (captured graphs keep the rows they saw)."""
        self.row = row
        self.k, self.v = self.k_all[row:row + 1], self.v_all[row:row + 1]

    def rows(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the `count` rows a call with positions [count, S] uses."""
        return self.k_all[self.row:self.row + count], self.v_all[self.row:self.row + count]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        # input_pos: [S] (k, v: [1, H_kv, S, D]) or [B, S], each row's own positions, into B rows from
        # `use_row`'s (k, v: [B, H_kv, S, D]). index_copy_ and scatter_ keep the write graph-capturable.
        if input_pos.dim() == 1:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
            return self.k[:, :, :kv_len], self.v[:, :, :kv_len]
        k_rows, v_rows = self.rows(input_pos.shape[0])
        index = input_pos[:, None, :, None].expand(k.shape)
        k_rows.scatter_(2, index, k)
        v_rows.scatter_(2, index, v)
        return k_rows[:, :, :kv_len], v_rows[:, :, :kv_len]


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
    """RoPE cos/sin for given positions, with HF's default / linear / dynamic-NTK / llama3 / LongRoPE
    frequencies. theta, scaling: the base and scaling of this set of layers (default: the model's global ones;
    Gemma 3's sliding layers have their own)."""

    def __init__(self, args: ModelArgs, theta: float | None = None, scaling: dict | None = None):
        super().__init__()
        self.args = args
        self.theta = args.rope_theta if theta is None else theta
        self.scaling = args.rope_scaling if scaling is None else scaling
        # Partial rotary (Phi-4-mini): frequencies for the first `dim` features of a head only.
        self.dim = int(args.head_dim * args.partial_rotary_factor)
        self.register_buffer("base_inv_freq", self.inv_freq(self.theta), persistent=False)
        self.dynamic = self.scaling.get("rope_type") == "dynamic"
        self.longrope = self.scaling.get("rope_type") == "longrope"
        self.exponent = self.dim / (self.dim - 2)
        self.attention_factor = 1.0
        if self.longrope:
            # LongRoPE divides each frequency by a per-dimension factor: the short set up to the pretrained
            # length, the long set beyond it (chosen per call by the longest position, as transformers does),
            # and scales cos/sin by sqrt(1 + ln(factor) / ln(pretrained length)).
            s = self.scaling
            self.original = s["original_max_position_embeddings"]
            self.register_buffer("long_inv_freq", self.base_inv_freq / torch.tensor(s["long_factor"]),
                                 persistent=False)
            self.base_inv_freq = self.base_inv_freq / torch.tensor(s["short_factor"])
            factor = s.get("factor") or args.max_position_embeddings / self.original
            self.attention_factor = s.get("attention_factor") or (
                1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(self.original)))
        self.table: torch.Tensor | None = None   # [positions, 2 (cos, sin), dim], build_table's

    def build_table(self, length: int, dtype: torch.dtype) -> None:
        """On CUDA, precompute cos and sin for positions 0..length-1 (by forward itself, so each row is
        bit-equal to what forward computes for that position): a step then gathers its rows in one kernel
        instead of computing them in about eight, each ~2 us of a decode step. Dynamic NTK and LongRoPE keep
        computing: their frequencies depend on the longest position."""
        device = self.base_inv_freq.device
        self.table = None
        if device.type == "cuda" and not (self.dynamic or self.longrope):
            cos, sin = self(torch.arange(length, device=device), dtype)
            self.table = torch.stack((cos, sin), dim=1)

    def inv_freq(self, base: float) -> torch.Tensor:
        d = self.dim
        inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))   # [D/2]
        s = self.scaling
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
        # input_pos: [S] -> cos, sin: [S, D], built from positions each call (cheap, and graph-safe); [B, S]
        # (a row of positions per generation, engine.batch) -> [B, S, D], each row scaled by its own length.
        table = self.table
        if table is not None and table.dtype == dtype and table.device == input_pos.device:
            rows = table.index_select(0, input_pos.reshape(-1)).view(*input_pos.shape, 2, table.shape[-1])
            return rows[..., 0, :], rows[..., 1, :]   # views: rows of cos and sin interleaved
        inv = self.base_inv_freq
        if self.dynamic:
            # Dynamic NTK: past the trained length L, raise the base as HF does for the longest position
            # seen so far, (factor * len / L - (factor - 1)) ** (d / (d - 2)). Tensor ops keep it in-graph.
            a = self.args
            factor, trained = self.scaling["factor"], a.max_position_embeddings
            seq_len = torch.clamp(input_pos.amax(-1, keepdim=True) + 1, min=trained).float()   # [1] or [B, 1]
            base = self.theta * (factor * seq_len / trained - (factor - 1)) ** self.exponent
            d = self.dim
            inv = 1.0 / (base[..., None] ** (torch.arange(0, d, 2, device=input_pos.device).float() / d))
        elif self.longrope:
            longer = input_pos.amax(-1, keepdim=True)[..., None] + 1 > self.original
            inv = torch.where(longer, self.long_inv_freq, inv)
        freqs = input_pos.float()[..., None] * inv                            # [S, D/2] or [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                               # [S, D]
        if self.attention_factor != 1.0:
            return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, S, H, D], cos/sin: [S, 1, R]; HF's rotate-half layout (not interleaved pairs) on the first R
    # features (R < D: partial rotary, the rest pass through).
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def flash_decoding(x: torch.Tensor) -> bool:
    """Whether attention over activations x [B, S, dim] runs engine.decode_attention (CUDA decode: one new
    position a row, outside torch.compile), which reads each row's position and no mask."""
    return x.shape[1] == 1 and x.is_cuda and not torch.compiler.is_compiling()


def softcapped_attention(q, k, v, mask: torch.Tensor, scale: float, cap: float) -> torch.Tensor:
    """Attention with Gemma 2's score soft-capping (cap * tanh(scores / cap), before the mask), which SDPA
    has no hook for. q: [B, H, S, D]; k, v: [B, H_kv, T, D]; mask: [S, T] bool or additive."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.tanh((q @ k.transpose(-1, -2)) * scale / cap) * cap               # [B, H, S, T]
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, window: int | None = None):
        """window: this layer's sliding window (None: it attends to the whole cache)."""
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        q_size, kv_size = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        # q, k and v read the same input: one fused matmul reads x once and launches once.
        self.wqkv = nn.Linear(args.dim, q_size + 2 * kv_size, bias=args.qkv_bias)
        self.wo = nn.Linear(q_size, args.dim, bias=args.o_bias)
        self.kv_cache: KVCache | None = None
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.scale, self.softcap = args.attn_scale, args.attn_softcap
        self.window = window
        # Act-order: the order wo reads its input in (x[..., output_order]), and where each head-ordered value
        # goes in it (the decode kernel writes there directly). None: head order.
        self.register_buffer("output_order", None, persistent=False)
        self.register_buffer("output_places", None, persistent=False)

    def order_output(self, order: torch.Tensor | None) -> None:
        """Make attention's output come in `order` (wo's act-order input order; None: head order)."""
        self.output_order = order
        self.output_places = None if order is None else torch.argsort(order).to(torch.int32)

    def forward(self, x, cos, sin, mask, input_pos, kv_len: int):
        # x: [B, S, dim]; mask: [S, kv_len] bool (True = may attend)
        B, S, _ = x.shape
        H, H_kv = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x).view(B, S, H + 2 * H_kv, self.head_dim)            # [B, S, H + 2 H_kv, D]
        cache = self.kv_cache
        whole_heads = cos.shape[-1] == self.head_dim   # the fused kernel rotates whole heads only
        norms = self.q_norm is not None and self.q_norm.out_order is None and self.k_norm.out_order is None
        qk_norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if norms else None
        if fused_ops.usable(qkv) and self.head_dim & (self.head_dim - 1) == 0 and whole_heads and \
                (self.q_norm is None or norms):
            # One kernel: q/k norms (Qwen3 / Gemma 3), RoPE on q and k, k and v into the cache (Triton wants a
            # power-of-two head size). Positions [B, S]: a row each, into B cache rows (KVCache.rows).
            k_rows, v_rows = (cache.k, cache.v) if input_pos.dim() == 1 else cache.rows(B)
            q = fused_ops.rotary_into_cache(qkv, cos, sin, input_pos, k_rows, v_rows, H, H_kv,
                                            qk_norm).transpose(1, 2)
            k, v = k_rows[:, :, :kv_len], v_rows[:, :, :kv_len]
        else:
            if self.q_norm is not None:   # Qwen3 / Gemma 3: each head of q and k normalised before RoPE
                qkv = torch.cat((self.q_norm(qkv[:, :, :H]), self.k_norm(qkv[:, :, H:H + H_kv]),
                                 qkv[:, :, H + H_kv:]), dim=2)
            # Rotate q and k together: one set of kernels instead of two (decode is launch-bound on GPU).
            qk = apply_rotary(qkv[:, :, : H + H_kv], cos, sin)
            q = qk[:, :, :H].transpose(1, 2)                                  # [B, H, S, D]
            k = qk[:, :, H:].transpose(1, 2)                                  # [B, H_kv, S, D]
            v = qkv[:, :, H + H_kv:].transpose(1, 2)
            k, v = cache.update(input_pos, k, v, kv_len)                     # [B, H_kv, kv_len, D]
        if flash_decoding(x):
            # CUDA decode: grouped kv heads read in place and the cache split across programs (flash-decoding);
            # only keys 0..pos are read, so the mask is not needed. Prefill and CPU keep SDPA below.
            positions = input_pos.reshape(-1).expand(B)           # [B]: [1] shared, or [B, 1] a row each
            y = decode_attention(q[:, :, 0], k, v, positions, self.scale or self.head_dim ** -0.5, self.softcap,
                                 self.window, places=self.output_places)                 # [B, H, D]
            return self.wo(y.reshape(B, 1, -1))
        gqa = self.n_kv_heads != self.n_heads   # each kv head serves n_heads / n_kv_heads query heads
        if gqa and x.is_cuda:
            # CUDA keeps the repeated cache: whether SDPA's masked CUDA kernels take grouped heads without
            # falling back to a slower path is not measured yet (no GPU when this changed).
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            gqa = False
        if self.softcap is not None:
            y = softcapped_attention(q, k, v, mask, self.scale or self.head_dim ** -0.5, self.softcap)
        else:
            # CPU: grouped heads read in place, without two copies of the cache a layer (~10% of a step).
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa,
                                               scale=self.scale)                    # [B, H, S, D]
        y = y.transpose(1, 2).reshape(B, S, -1)
        return self.wo(y if self.output_order is None else y.index_select(-1, self.output_order))


class FeedForward(nn.Module):
    """The gated MLP: w2(act(gate) * up), SwiGLU (silu) or Gemma's GeGLU. hidden: its width (default the
    config's intermediate_size; MoE experts and Qwen2-MoE's shared expert have their own)."""

    def __init__(self, args: ModelArgs, hidden: int | None = None):
        super().__init__()
        self.hidden = hidden or args.intermediate_size
        self.act = args.hidden_act
        # gate and up read the same input: fused like wqkv.
        self.w13 = nn.Linear(args.dim, 2 * self.hidden, bias=args.mlp_bias)
        self.w2 = nn.Linear(self.hidden, args.dim, bias=args.mlp_bias)
        # Act-order checkpoints: the order w2 reads its input in, which w13's rows are stored in (set by
        # engine.weights.fold_input_orders; engine.lora maps adapters through it). None: natural order.
        self.hidden_order: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.activate(self.w13(x)))

    def activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """act(gate) * up from w13's output [..., 2 * hidden]."""
        if self.act in fused_ops.FUSED_ACTIVATIONS and fused_ops.usable(gate_up):
            return fused_ops.act_mul(gate_up, self.act)                       # SwiGLU / GeGLU, one kernel
        gate, up = gate_up.split(self.hidden, dim=-1)
        return ACTIVATIONS[self.act](gate) * up


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.sliding = args.is_sliding(layer)   # attends through the sliding window (and its own RoPE base)
        self.attention = Attention(args, args.sliding_window if self.sliding else None)
        self.feed_forward = MoEFeedForward(args, FeedForward) if args.is_moe(layer) else FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        # Gemma 2/3 also normalise what attention and the MLP return, before it joins the residual.
        self.post_attention_norm = RMSNorm(args.dim, args.norm_eps) if args.sandwich_norms else None
        self.post_ffn_norm = RMSNorm(args.dim, args.norm_eps) if args.sandwich_norms else None

    def forward(self, x, delta, delta_norm, cos, sin, mask, input_pos, kv_len: int):
        """This layer's input is x + delta_norm(delta) (delta: the previous layer's MLP output, or None;
        delta_norm: that layer's post_ffn_norm, or None): each residual add is done together with the norms
        around it. Returns (h, mlp_out); h + post_ffn_norm(mlp_out) is the output."""
        x, normed = add_norm(x, delta, self.attention_norm, delta_norm)
        attended = self.attention(normed, cos, sin, mask, input_pos, kv_len)
        h, normed = add_norm(x, attended, self.ffn_norm, self.post_attention_norm)
        return h, self.feed_forward(normed)


def add_norm(x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm,
             pre: RMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, norm(h)) with h = x + delta (x itself when delta is None), delta first normalised by `pre` when
    given (Gemma's norm on attention's output): on CUDA one kernel for all."""
    if delta is None:
        return x, norm(x)
    if fused_ops.usable(x) and (pre is None or pre.out_order is None):
        return fused_ops.add_rms_norm(x, delta, norm.weight, norm.eps, norm.out_order,
                                      None if pre is None else (pre.weight, pre.eps))
    h = x + (delta if pre is None else pre(delta))
    return h, norm(h)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rotary = Rotary(args)
        # Gemma 3's sliding layers rotate with their own base; None: they share `rotary`.
        self.local_rotary = Rotary(args, args.local_rope_theta, args.local_rope_scaling) \
            if args.local_rope_theta is not None else None
        self.max_seq_len = 0

    def setup_caches(self, max_seq_len: int, dtype: torch.dtype, slots: int = 1) -> None:
        """Allocate each layer's KV cache on the device that layer's weights live on, with `slots` rows (one
        per generation decoding at once)."""
        self.max_seq_len = max_seq_len
        for layer in self.layers:
            device = layer.attention_norm.weight.device
            layer.attention.kv_cache = KVCache(max_seq_len, self.args.n_kv_heads, self.args.head_dim, dtype,
                                               device, slots)
        for rotary in (self.rotary, self.local_rotary):
            if rotary is not None:
                rotary.build_table(max_seq_len, dtype)

    def mask(self, input_pos: torch.Tensor, kv_len: int, window: int | None = None) -> torch.Tensor:
        # [S, kv_len]: causal over absolute positions; also blinds cache slots beyond the current
        # position, so stale entries from an earlier generation are never read. Positions [B, S]: [B, 1, S,
        # kv_len], each row its own (broadcast over heads).
        slots = torch.arange(kv_len, device=input_pos.device)
        mask = slots <= input_pos[..., None]
        if window:
            mask &= slots > input_pos[..., None] - window
        return mask if input_pos.dim() == 1 else mask[:, None]

    def tables(self, input_pos: torch.Tensor, kv_len: int, x: torch.Tensor) -> dict:
        """{sliding: (cos, sin, mask)} for the kinds of layer this model has (sliding-window or not), for
        activations like x."""
        out = {}
        for sliding in sorted({layer.sliding for layer in self.layers}):
            rotary = self.local_rotary if sliding and self.local_rotary is not None else self.rotary
            cos, sin = (t.unsqueeze(-2) for t in rotary(input_pos, x.dtype))   # [(B,) S, 1, D]: over heads
            if flash_decoding(x):   # no mask read: none built (five or so kernels of every decode step)
                out[sliding] = (cos, sin, None)
                continue
            mask = self.mask(input_pos, kv_len, self.args.sliding_window if sliding else None)
            # SDPA turns a bool mask into an additive one in every call (ops in every layer): once here.
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            out[sliding] = (cos, sin, mask)
        return out

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int,
                last_only: bool = False, last: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: [B, S] ids at positions input_pos [S] (or [B, S]: each row its own positions and its own
        row of the KV cache, engine.batch); attends over cache slots [0, kv_len).
        Returns logits [B, S, V] in fp32 ([B, 1, V] with last_only: prefill needs no more; with last, [B]
        indices, row b's at position last[b]: rows of prompts padded to one length)."""
        x = self.tok_embeddings(tokens)                                       # [B, S, dim]
        if self.args.embed_scale is not None:
            # Gemma: the scale rounded to the compute dtype first, as transformers multiplies by it
            x = x * float(torch.tensor(self.args.embed_scale, dtype=x.dtype))
        tables = self.tables(input_pos, kv_len, x)
        delta = None  # the last layer's MLP output, added to x together with the next norm
        pending = None  # that layer's norm on its MLP output (Gemma), applied in the same kernel as the add
        for layer in self.layers:
            device = layer.attention_norm.weight.device
            if x.device != device:  # layers split across GPUs: hand the activations on
                x, input_pos = x.to(device), input_pos.to(device)
                tables = {k: tuple(t if t is None else t.to(device) for t in v) for k, v in tables.items()}
                if delta is not None:
                    delta, pending = (delta if pending is None else pending(delta)).to(device), None
            x, delta = layer(x, delta, pending, *tables[layer.sliding], input_pos, kv_len)
            pending = layer.post_ffn_norm
        if last is not None:
            index = last.to(x.device).view(-1, 1, 1).expand(-1, 1, x.shape[-1])
            x, delta = x.gather(1, index), delta.gather(1, index)
        elif last_only:
            x, delta = x[:, -1:], delta[:, -1:]
        device = self.norm.weight.device
        if pending is not None and delta.device != device:
            delta, pending = pending(delta), None
        _, x = add_norm(x.to(device), delta.to(device), self.norm, pending)
        logits = self.output(x).float()
        if self.args.final_softcap:   # Gemma 2: logits squashed into (-cap, cap)
            cap = self.args.final_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits
