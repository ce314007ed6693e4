"""bench/engine.py --gpu's model-family rows: today's families at their real shapes, 4-bit, built on the GPU.

Each model goes through the loader's own build (engine.weights.build_transformer: fused q/k/v and gate/up,
Gemma's norms, Phi-3's fused checkpoint names, MoE experts stacked for the captured decode step) from a
checkpoint source that draws random 4-bit levels on the GPU by tensor name instead of reading a file: a
Mixtral-8x7B file is ~24 GB, too slow to write and read back on the lent machine. Routers stay dense, as the
quantizers leave them.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from core.quant_weight import QuantWeight
from engine.runtime import Engine, EngineModel
from engine.weights import build_transformer

# config.json fields of each family's published model (the parts the engine reads).
QWEN3_8B = dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                hidden_act="silu")
GEMMA3_12B = dict(model_type="gemma3_text", vocab_size=262208, hidden_size=3840, intermediate_size=15360,
                  num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                  max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                  sliding_window=1024, sliding_window_pattern=6, query_pre_attn_scalar=256,
                  hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
PHI4 = dict(model_type="phi3", vocab_size=100352, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
            num_attention_heads=40, num_key_value_heads=10, max_position_embeddings=16384, rms_norm_eps=1e-5,
            rope_theta=250000.0, tie_word_embeddings=False, hidden_act="silu")
MIXTRAL_8X7B = dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0, num_local_experts=8,
                    num_experts_per_tok=2, tie_word_embeddings=False, hidden_act="silu")
QWEN3_30B_A3B = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                     moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                     head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                     decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, tie_word_embeddings=False, hidden_act="silu")

# name -> (config, quantization): "gptq" = symmetric (zero 8), act-order off; "awq" = a random zero per group.
FAMILIES = {"qwen3_8b_awq_4bit_g128": (QWEN3_8B, "awq"), "gemma3_12b_gptq_4bit_g128": (GEMMA3_12B, "gptq"),
            "phi4_gptq_4bit_g128": (PHI4, "gptq"), "mixtral_8x7b_gptq_4bit_g128": (MIXTRAL_8X7B, "gptq"),
            "qwen3_30b_a3b_gptq_4bit_g128": (QWEN3_30B_A3B, "gptq")}
GROUP = 128
SCALE = 0.003   # keeps s * (q - z) about as wide as the Llama rows' random weights (activations in range)


def linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear of one layer, by the HF name after `model.layers.N.`."""
    d = cfg["hidden_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    f = cfg["intermediate_size"]
    shapes = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
              "self_attn.o_proj": (d, q), "self_attn.qkv_proj": (q + 2 * kv, d),
              "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f), "mlp.gate_up_proj": (2 * f, d)}
    if cfg["model_type"] == "mixtral":
        e = cfg["num_local_experts"]
        shapes["block_sparse_moe.gate"] = (e, d)
        shapes.update({f"block_sparse_moe.experts.{i}.{w}": (f, d) if w != "w2" else (d, f)
                       for i in range(e) for w in ("w1", "w2", "w3")})
    elif "num_experts" in cfg:
        e, m = cfg["num_experts"], cfg["moe_intermediate_size"]
        shapes["mlp.gate"] = (e, d)
        shapes.update({f"mlp.experts.{i}.{w}_proj": (m, d) if w != "down" else (d, m)
                       for i in range(e) for w in ("gate", "up", "down")})
    return shapes


class RandomCheckpoint:
    """engine.weights.TensorSource over random tensors made on the GPU when the build asks for them: 4-bit
    QuantWeights for the linears (the form a GPTQ/AWQ read gives the build), dense bf16 routers, embedding
    and head, norm weights of 1 (0 where the family stores w - 1). Counts the bytes a 4-bit file would hold."""

    LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")

    def __init__(self, cfg: dict, method: str):
        self.cfg, self.method = cfg, method
        self.shapes = linear_shapes(cfg)
        self.file_bytes = 0
        self.gemma = cfg["model_type"].startswith("gemma")

    def __contains__(self, name: str) -> bool:
        if name.endswith(".bias"):
            return False
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            return True
        if name == "lm_head.weight":
            return not self.cfg.get("tie_word_embeddings")
        match = self.LAYER.match(name)
        return bool(match) and (match.group(2) in self.shapes or match.group(2).endswith("norm"))

    def get(self, name: str, device="cpu") -> torch.Tensor | QuantWeight:
        dev = torch.device(device)
        d = self.cfg["hidden_size"]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            self.file_bytes += self.cfg["vocab_size"] * d * 2
            return torch.randn(self.cfg["vocab_size"], d, device=dev, dtype=torch.bfloat16) * 0.02
        part = self.LAYER.match(name).group(2) if name != "model.norm.weight" else "norm"
        if part.endswith("norm"):
            width = self.cfg.get("head_dim", d) if part.endswith(("q_norm", "k_norm")) else d
            self.file_bytes += width * 2
            return torch.full((width,), 0.0 if self.gemma else 1.0, device=dev, dtype=torch.bfloat16)
        n, k = self.shapes[part]
        if part.endswith("gate") and not part.endswith("_gate"):   # a MoE router: dense in every release
            self.file_bytes += n * k * 2
            return torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        groups = k // GROUP
        self.file_bytes += k * n // 2 + groups * n * (2 + 0.5) + 4 * k   # levels, fp16 scales, zeros, g_idx
        zeros = (torch.randint(4, 12, (groups, n), dtype=torch.uint8, device=dev) if self.method == "awq"
                 else torch.full((groups, n), 8, dtype=torch.uint8, device=dev))
        return QuantWeight(q=torch.randint(0, 16, (k, n), dtype=torch.uint8, device=dev),
                           scales=(torch.rand(groups, n, device=dev) * SCALE + SCALE / 2).half(),
                           g_idx=torch.arange(k, device=dev) // GROUP, bits=4, group_size=GROUP, zeros=zeros)


def build_family(cfg: dict, method: str, tokenizer, context: int = 4096) -> tuple[EngineModel, int]:
    """The family model on the GPU through the loader's build, as an EngineModel, and its 4-bit file bytes."""
    source = RandomCheckpoint(cfg, method)
    model, kinds = build_transformer(cfg, source, None, [torch.device("cuda")], torch.bfloat16)
    engine = Engine(model, context, use_graphs=True)
    runtime = f"hearth engine (cuda, {', '.join(sorted(kinds))}, CUDA graph)"
    return EngineModel(Path("random-on-gpu"), engine, tokenizer, [], context, "bench", runtime), int(source.file_bytes)


def dense_target(row: dict, llama_tok_s: float, llama_weights_gib: float) -> float:
    """Issue 18's bar for a dense family: 0.9 x Llama-2-7B 4-bit tok/s x (its weight bytes / this model's)."""
    return round(0.9 * llama_tok_s * llama_weights_gib / row["weights_gib"], 1)


def family_rows(results: dict, section, tokenizer, built_on_gpu) -> None:
    """Add one row per family to `results` via bench/engine.py's section() and built_on_gpu(), and each dense
    row's bar from the same run's Llama-2-7B GPTQ 4-bit g128 row."""
    llama = results.get("hearth_7b_gptq_4bit_g128") or {}
    for name, (cfg, method) in FAMILIES.items():
        def one(cfg=cfg, method=method) -> dict:
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            model, packed = build_family(cfg, method, tokenizer)
            row = built_on_gpu(model, packed, t)
            moe = "num_local_experts" in cfg or "num_experts" in cfg
            if not moe and "decode_tok_s" in llama and "weights_gib" in llama:
                row["target_tok_s"] = dense_target(row, llama["decode_tok_s"], llama["weights_gib"])
            return row
        section(results, f"hearth_{name}", one)
