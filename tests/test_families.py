"""The engine's model families (Qwen3, Qwen2-MoE, Qwen3-MoE, Mixtral, Gemma 2, Gemma 3, Phi-3) against
transformers: tiny random models built with transformers' own classes, fp32 logits compared on a prompt
longer than the sliding window, with GQA, tied and untied heads, and every expert of the MoE models chosen at
least once; their GPTQ and AWQ copies against the dequantized weights; the experts' CUDA decode path
(stacked experts gathered into slots) run on CPU; and `app.py generate` on one tiny model per family."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.moe import MoEFeedForward
from engine.runtime import Engine, unsupported_reason
from engine.weights import load_transformer
from tests.quant_fixtures import (awq_tensors, gptq_tensors, quantize_weight, read_state_dict, write_quant_config,
                                  write_word_tokenizer)

CPU = [torch.device("cpu")]
SEQ = 24       # longer than every window below, so the sliding-window masks matter
WINDOW = 8
VOCAB = 96
ROOT = Path(__file__).resolve().parent.parent
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def family_config(kind: str):
    import transformers as t

    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
                "short_factor": [1.0 + 0.1 * i for i in range(6)], "long_factor": [1.0 + 0.5 * i for i in range(6)]}
    return {
        "qwen3-gqa-untied": lambda: t.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False),
        # Layer 1 slides (max_window_layers=1), layer 0 attends to everything.
        "qwen3-tied-window": lambda: t.Qwen3Config(**COMMON, tie_word_embeddings=True, use_sliding_window=True,
                                                   sliding_window=WINDOW, max_window_layers=1),
        # A shared expert behind its sigmoid gate, top-k weights not renormalised, layer 1 dense.
        "qwen2_moe-shared": lambda: t.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                                     norm_topk_prob=False, mlp_only_layers=[1]),
        "qwen3_moe-normed": lambda: t.Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=32, norm_topk_prob=True,
                                                     tie_word_embeddings=True),
        "mixtral-window": lambda: t.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                                  sliding_window=WINDOW),
        # Gemma 2: soft-capped attention and logits, sliding and global layers alternating, tied head.
        "gemma2": lambda: t.Gemma2Config(**COMMON, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                         attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
        # Gemma 3: q/k norms, a local RoPE base on the sliding layer and linear scaling on the global one.
        "gemma3-untied": lambda: t.Gemma3TextConfig(
            **COMMON, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16, tie_word_embeddings=False,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}),
        # Phi-3: fused qkv/gate_up in the checkpoint, LongRoPE past 16 tokens, partial rotary, a window.
        "phi3-longrope": lambda: t.Phi3Config(**COMMON, sliding_window=WINDOW, rope_parameters=longrope,
                                              partial_rotary_factor=0.75, original_max_position_embeddings=16),
    }[kind]()


FAMILIES = ["qwen3-gqa-untied", "qwen3-tied-window", "qwen2_moe-shared", "qwen3_moe-normed", "mixtral-window",
            "gemma2", "gemma3-untied", "phi3-longrope"]
MOE = [k for k in FAMILIES if "moe" in k or "mixtral" in k]


def save_family(path: Path, kind: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(family_config(kind)).eval()
    with torch.no_grad():   # Gemma initialises its norms at 0 (= weight 1): make them count
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(path)
    return hf


def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()                                          # [S, V]


def engine_logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.setup_caches(64, torch.float32)
    with torch.no_grad():
        return model(ids[None], torch.arange(len(ids)), kv_len=len(ids))[0]


def prompt(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(seed))


def experts_chosen(model, ids: torch.Tensor) -> list[set[int]]:
    """The experts each MoE layer's router picks over the prompt."""
    chosen, hooks = [], []
    for layer in model.layers:
        moe = layer.feed_forward
        if isinstance(moe, MoEFeedForward):
            picked: set[int] = set()
            chosen.append(picked)
            hooks.append(moe.gate.register_forward_hook(
                lambda m, i, out, picked=picked, k=moe.top_k: picked.update(out.topk(k, -1).indices.flatten().tolist())))
    engine_logits(model, ids)
    for hook in hooks:
        hook.remove()
    return chosen


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_logits_match_transformers(tmp_path, kind):
    hf = save_family(tmp_path, kind)
    ids = prompt()
    ref = hf_logits(hf, ids)
    assert unsupported_reason(hf.config.to_dict()) is None
    model, kinds = load_transformer(tmp_path, CPU, torch.float32)
    assert kinds == {"float32"}
    torch.testing.assert_close(engine_logits(model, ids), ref, atol=1e-4, rtol=1e-4)
    if kind in MOE:
        assert all(picked == set(range(4)) for picked in experts_chosen(model, ids))
    if kind == "phi3-longrope":
        return  # LongRoPE picks its factors by the longest position of each call, so chunks differ by design
    # Chunked prefill (chunks across the window boundary) then token-by-token decode through the cache.
    engine = Engine(model, 64, use_graphs=False, prefill_chunk=7)
    with torch.no_grad():
        torch.testing.assert_close(engine.prefill(ids[:20].tolist()), ref[19], atol=1e-4, rtol=1e-4)
        for pos in range(20, SEQ):
            torch.testing.assert_close(engine.decode(ids[pos], pos), ref[pos], atol=1e-4, rtol=1e-4)


def test_family_flags_read_from_config():
    from engine.llama import ModelArgs

    gemma3 = ModelArgs.from_config(family_config("gemma3-untied").to_dict())
    assert gemma3.sliding_layers == (True, False) and gemma3.local_rope_theta == 10000.0
    assert gemma3.rope_theta == 1e6 and gemma3.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert gemma3.qk_norm and gemma3.sandwich_norms and gemma3.norm_offset == 1.0 and gemma3.attn_scale == 0.25
    # transformers 4.x wrote Gemma 3's local base and pattern as plain keys.
    old = ModelArgs.from_config({**COMMON, "model_type": "gemma3_text", "num_hidden_layers": 6, "head_dim": 16,
                                 "sliding_window": 8, "sliding_window_pattern": 3, "rope_theta": 1e6,
                                 "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert old.sliding_layers == (True, True, False, True, True, False) and old.local_rope_theta == 1e4
    phi = ModelArgs.from_config({**COMMON, "model_type": "phi3", "rope_scaling": {
        "type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}, "original_max_position_embeddings": 16})
    assert phi.rope_scaling["rope_type"] == "longrope" and phi.rope_scaling["original_max_position_embeddings"] == 16
    moe = ModelArgs.from_config(family_config("qwen2_moe-shared").to_dict())
    assert [moe.is_moe(i) for i in range(2)] == [True, False] and not moe.norm_topk_prob
    assert "vision" in unsupported_reason({"model_type": "gemma3", "text_config": {}})
    assert "activation" in unsupported_reason({**family_config("qwen3-gqa-untied").to_dict(), "hidden_act": "relu2"})


def test_stacked_experts_decode_like_the_expert_loop(tmp_path):
    """The CUDA decode path of MoE layers (experts stacked, the chosen ones gathered into slots by the
    router's ids, no host sync) computes what the per-expert loop computes, here run on CPU."""
    save_family(tmp_path, "qwen2_moe-shared")
    ids = prompt()
    model, _ = load_transformer(tmp_path, CPU, torch.float32)
    ref = engine_logits(model, ids)
    moe = model.layers[0].feed_forward
    moe.stack_experts()
    assert len(moe.experts) == 0 and len(moe.slots) == 2 and moe.stacked[0].shape[0] == 4
    got = engine_logits(model, ids)   # prompt: each expert copied into slot 0 in turn
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    engine = Engine(model, 64, use_graphs=False, prefill_chunk=64)
    with torch.no_grad():
        engine.prefill(ids[:12].tolist())
        for pos in range(12, SEQ):   # one row at a time: the slot path
            torch.testing.assert_close(engine.decode(ids[pos], pos), ref[pos], atol=1e-5, rtol=1e-5)


def is_router(name: str) -> bool:
    # Routers stay in float in real MoE checkpoints (AutoAWQ's modules_to_not_convert, GPTQModel's defaults).
    return name.endswith((".mlp.gate.weight", ".block_sparse_moe.gate.weight", "shared_expert_gate.weight"))


def quantize_family(src: Path, out: Path, method: str, desc_act: bool = False) -> dict[str, torch.Tensor]:
    """A GPTQ (4-bit, group 32, sym) or AWQ (GEMM, group 32) copy of the fp folder `src` in `out`, through the
    test packers of tests.quant_fixtures; returns every tensor as it dequantizes (fp32, HF names)."""
    import shutil

    out.mkdir(parents=True)
    for name in ("config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    tensors, reference = {}, {}
    for name, w in read_state_dict(src).items():
        if name.endswith(".weight") and w.dim() == 2 and ".layers." in name and not is_router(name):
            prefix = name.removesuffix(".weight")
            if method == "gptq":
                qt = quantize_weight(w, 4, 32, sym=True, desc_act=desc_act, order_by_input=True)
                tensors.update(gptq_tensors(prefix, qt, 4, "gptq"))
            else:
                qt = quantize_weight(w, 4, 32, sym=False, desc_act=False)
                tensors.update(awq_tensors(prefix, qt))
            reference[name] = qt.dequantized
        else:
            tensors[name] = w.half()
            reference[name] = tensors[name].float()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    write_quant_config(out, method, 4, 32, desc_act, True, "gptq", "config.json")
    return reference


@pytest.mark.parametrize("kind,method", [("mixtral-window", "gptq"), ("qwen2_moe-shared", "awq"),
                                         ("qwen3_moe-normed", "gptq-actorder"), ("gemma2", "awq"),
                                         ("gemma3-untied", "gptq"), ("phi3-longrope", "gptq-actorder"),
                                         ("qwen3-gqa-untied", "awq")])
def test_quantized_family_matches_its_dequantized_reference(tmp_path, kind, method):
    hf = save_family(tmp_path / "fp", kind)
    reference = quantize_family(tmp_path / "fp", tmp_path / "q", method.removesuffix("-actorder"),
                                desc_act=method.endswith("actorder"))
    hf.load_state_dict(reference, strict=False)
    ids = prompt()
    ref = hf_logits(hf, ids)
    model, kinds = load_transformer(tmp_path / "q", CPU, torch.float32)
    assert "4-bit tinygemm" in kinds
    if kind in MOE:   # the experts are quantized layers too
        moe = next(layer.feed_forward for layer in model.layers if isinstance(layer.feed_forward, MoEFeedForward))
        assert moe.experts[0].w2.kernel == "tinygemm"
    got = engine_logits(model, ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel   # tinygemm takes bf16 activations


def test_quantized_experts_stack_for_the_decode_step(tmp_path):
    """Quantized experts (tinygemm on CPU: packed int4 buffers) stack and gather like dense ones."""
    save_family(tmp_path / "fp", "mixtral-window")
    quantize_family(tmp_path / "fp", tmp_path / "q", "gptq")
    model, _ = load_transformer(tmp_path / "q", CPU, torch.float32)
    ids = prompt()
    ref = engine_logits(model, ids)
    for layer in model.layers:
        layer.feed_forward.stack_experts()
    engine = Engine(model, 64, use_graphs=False, prefill_chunk=64)
    with torch.no_grad():
        torch.testing.assert_close(engine.prefill(ids[:12].tolist()), ref[11], atol=1e-4, rtol=1e-4)
        for pos in range(12, SEQ):
            torch.testing.assert_close(engine.decode(ids[pos], pos), ref[pos], atol=1e-4, rtol=1e-4)


GENERATE_FAMILIES = ["qwen3-tied-window", "qwen3_moe-normed", "mixtral-window", "gemma2", "gemma3-untied",
                     "phi3-longrope", "qwen2_moe-shared"]


@pytest.mark.parametrize("kind", GENERATE_FAMILIES)
def test_app_generate_runs_the_family_on_the_engine(tmp_path, kind):
    """`app.py generate` on a tiny model of the family: the runtime line on stderr names Hearth's engine on CPU
    and the greedy text equals transformers' greedy text."""
    models = tmp_path / "models"
    hf = save_family(models / kind, kind)
    write_word_tokenizer(models / kind, VOCAB)
    words = "w5 w17 w42 w9 w63 w30 w77 w12"
    ids = torch.tensor([int(w[1:]) for w in words.split()])
    with torch.no_grad():
        out = hf.generate(ids[None], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = " ".join(f"w{i}" if i >= 3 else ["<unk>", "<s>", "</s>"][i] for i in out[0, len(ids):].tolist())
    # CPU even on a GPU machine: the reference is transformers' fp32 greedy text.
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "generate", "--models-dir", str(models),
                             "--model", kind, "--prompt", words, "--max-new-tokens", "12", "--temperature", "0"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert "hearth engine (cpu" in result.stderr, result.stderr
    assert result.stdout.strip() == want, (result.stdout, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 8e-2)])
@pytest.mark.parametrize("kind", [k for k in FAMILIES if k != "phi3-longrope"])
def test_cuda_graph_decode_of_each_family_matches_the_cpu_engine(tmp_path, kind, dtype, tol):
    """On CUDA each family loads on the engine (MoE experts stacked into slots) and its chunked prefill and
    graph-captured decode steps give the CPU fp32 engine's logits (bf16 within its rounding)."""
    hf = save_family(tmp_path, kind)
    ids = prompt()
    ref = hf_logits(hf, ids)
    model, _ = load_transformer(tmp_path, [torch.device("cuda")], dtype)
    engine = Engine(model, 64, use_graphs=True, prefill_chunk=7)
    assert engine.use_graphs
    with torch.no_grad():
        got = engine.prefill(ids[:20].cuda().tolist()).float().cpu()
        torch.testing.assert_close(got, ref[19], atol=tol, rtol=tol)
        for pos in range(20, SEQ):
            step = engine.decode(ids[pos].cuda(), pos).float().cpu()
            torch.testing.assert_close(step, ref[pos], atol=tol, rtol=tol)
    assert engine.graphs, "decode ran without a captured graph"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("zeros", [False, True])
def test_expert_matmul_reads_each_chosen_expert_in_place(zeros):
    """int4_mma.expert_matmul: slot j's output is its input row through expert ids[j] of the stacked experts
    (ids repeat; one input row for every slot or one each), against fp64."""
    import dataclasses

    from engine import int4_mma
    from engine.quant_linear import QuantWeight

    torch.manual_seed(0)
    E, K, N, gs = 5, 256, 96, 64
    g_idx = torch.arange(K, device="cuda") // gs
    packed, dense = [], []
    for _ in range(E):
        q = torch.randint(0, 16, (K, N), dtype=torch.uint8, device="cuda")
        s = (torch.rand(K // gs, N, device="cuda") * 0.01 + 0.005).half()
        z = (torch.randint(0, 16, (K // gs, N), dtype=torch.uint8, device="cuda") if zeros
             else torch.full((K // gs, N), 8, dtype=torch.uint8, device="cuda"))
        packed.append(int4_mma.pack(q, s, z if zeros else None, gs))
        dense.append(QuantWeight(q, s, g_idx, 4, gs, zeros=z).dequantize(torch.float64))
    first = packed[0]
    stacked = dataclasses.replace(
        first, words=torch.stack([p.words for p in packed]),
        store=dataclasses.replace(first.store, scales=torch.stack([p.store.scales for p in packed])),
        zero_bias=None)
    assert first.zmode == (int4_mma.ZEROS if zeros else int4_mma.UNIFORM)   # zeros: in the scales' records
    ids = torch.tensor([3, 0, 3, 4], device="cuda")   # int64, as topk gives them
    config = int4_mma.config_for(len(ids) * N)
    for rows in (1, len(ids)):
        x = (torch.randn(rows, K, device="cuda") * 0.5).bfloat16()
        got = int4_mma.expert_matmul(x, stacked, ids, config).double()
        want = torch.stack([x[j if rows > 1 else 0].double() @ dense[e].t() for j, e in enumerate(ids.tolist())])
        torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantized_experts_are_read_in_place_by_the_captured_decode_step(tmp_path):
    """On CUDA, 4-bit experts run through int4_mma.expert_matmul (the router's ids index the stacked experts,
    nothing copied into slots; one slot kept, for prompts) inside the graph-captured decode step, and give the
    dequantized reference's logits within bf16 rounding."""
    hf = save_family(tmp_path / "fp", "mixtral-window")
    reference = quantize_family(tmp_path / "fp", tmp_path / "q", "gptq")
    hf.load_state_dict(reference, strict=False)
    ids = prompt()
    ref = hf_logits(hf, ids)
    model, _ = load_transformer(tmp_path / "q", [torch.device("cuda")], torch.bfloat16)
    moes = [layer.feed_forward for layer in model.layers if isinstance(layer.feed_forward, MoEFeedForward)]
    assert moes and all(moe.in_place is not None and len(moe.slots) == 1 for moe in moes)
    engine = Engine(model, 64, use_graphs=True, prefill_chunk=7)
    with torch.no_grad():
        got = engine.prefill(ids[:20].cuda().tolist()).float().cpu()
        torch.testing.assert_close(got, ref[19], atol=8e-2, rtol=8e-2)
        steps = torch.stack([engine.decode(ids[pos].cuda(), pos).float().cpu() for pos in range(20, SEQ)])
    assert engine.graphs, "decode ran without a captured graph"
    torch.testing.assert_close(steps, ref[20:], atol=8e-2, rtol=8e-2)
    rel = ((steps - ref[20:]).norm() / ref[20:].norm()).item()
    assert rel < 3e-2, rel
