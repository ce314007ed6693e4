"""Hearth's engine against transformers (fp32 logits), its quantized paths against their dequantized
reference, and the real default model's greedy answer. GPU tests skip without CUDA."""
from __future__ import annotations

import pytest
import torch

from engine.llama import ModelArgs
from engine.model import Prompt
from engine.quant_linear import DequantLinear, Int4Linear, QuantWeight, RescoredHead, exact_int4, make_quant_linear
from engine.runtime import Engine
from engine.weights import load_transformer
from tests.quant_fixtures import quantize_model_dir

CPU = [torch.device("cpu")]
SEQ = 24
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_config(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    return {
        "llama-gqa-tied-llama3": lambda: LlamaConfig(**common, tie_word_embeddings=True, rope_parameters=llama3),
        "llama-bias-linear": lambda: LlamaConfig(**common, attention_bias=True, mlp_bias=True,
                                                 rope_parameters={"rope_type": "linear", "rope_theta": 500.0,
                                                                  "factor": 2.0}),
        # max_position_embeddings below SEQ, so dynamic NTK actually rescales.
        "llama-dynamic": lambda: LlamaConfig(**{**common, "max_position_embeddings": 16},
                                             rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                              "factor": 2.0}),
        # A window shorter than SEQ, so the sliding-window mask matters.
        "mistral-gqa-window": lambda: MistralConfig(**common, sliding_window=8),
        "qwen2-gqa-tied": lambda: Qwen2Config(**common, tie_word_embeddings=True),
    }[kind]()


def save_tiny(tmp_path, kind: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config(kind)).eval()
    hf.save_pretrained(tmp_path)
    return hf


def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()                                          # [S, V]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("kind", ["llama-gqa-tied-llama3", "llama-bias-linear", "llama-dynamic",
                                  "mistral-gqa-window", "qwen2-gqa-tied"])
def test_logits_match_transformers(tmp_path, kind):
    hf = save_tiny(tmp_path, kind)
    ids = torch.randint(0, 96, (SEQ,))
    ref = hf_logits(hf, ids)
    model, kinds = load_transformer(tmp_path, CPU, torch.float32)
    assert kinds == {"float32"}
    model.setup_caches(64, torch.float32)
    with torch.no_grad():
        full = model(ids[None], torch.arange(SEQ), kv_len=SEQ)[0]
    torch.testing.assert_close(full, ref, atol=1e-4, rtol=1e-4)
    if kind == "llama-dynamic":
        return  # dynamic NTK depends on the longest position seen, so token-by-token differs by design
    # Chunked prefill then token-by-token decode through the static cache give the same logits.
    engine = Engine(model, 64, use_graphs=False, prefill_chunk=7)
    with torch.no_grad():
        torch.testing.assert_close(engine.prefill(ids[:20].tolist()), ref[19], atol=1e-4, rtol=1e-4)
        for pos in range(20, SEQ):
            torch.testing.assert_close(engine.decode(ids[pos], pos), ref[pos], atol=1e-4, rtol=1e-4)


def test_model_args_read_rope_scaling_both_ways():
    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "intermediate_size": 128}
    old = ModelArgs.from_config({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}})
    new = ModelArgs.from_config({**base, "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5,
                                                             "factor": 4.0}})
    assert old == new and old.rope_theta == 5e5 and old.rope_scaling == {"factor": 4.0, "rope_type": "linear"}
    with pytest.raises(ValueError):
        ModelArgs.from_config({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def random_quant(K: int, N: int, group_size: int, act_order: bool, bits: int = 4) -> QuantWeight:
    G = K // group_size
    g_idx = torch.arange(K) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(K)]
    return QuantWeight(q=torch.randint(0, 2**bits, (K, N), dtype=torch.uint8), scales=torch.rand(G, N) * 0.02,
                       g_idx=g_idx, bits=bits, group_size=group_size,
                       zeros=torch.randint(0, 2**bits, (G, N), dtype=torch.uint8))


@pytest.mark.parametrize("group_size,act_order", [(32, False), (128, False), (32, True)])
def test_int4_cpu_matches_dequantized(group_size, act_order):
    qw = random_quant(256, 64, group_size, act_order)
    layer = Int4Linear(qw, None, torch.device("cpu"))
    x = torch.randn(3, 256)
    ref = x @ qw.dequantize().t()
    # bf16 activations and scales inside the kernel: bf16-level agreement.
    assert rel_err(layer(x), ref) < 1e-2
    assert (layer.perm is not None) == act_order


def test_dequant_linear_any_bits():
    qw = random_quant(96, 32, 32, act_order=True, bits=3)
    layer = DequantLinear(qw, torch.ones(32), torch.device("cpu"), torch.float32)
    x = torch.randn(2, 96)
    torch.testing.assert_close(layer(x), x @ qw.dequantize().t() + 1)


def test_exact_int4_recognises_a_4bit_grid_losslessly():
    q = torch.randint(0, 16, (8, 64)).float()
    # As a GGUF Q4_1 block decodes: fp16 scale and minimum, value = scale * q + minimum in fp32.
    scale, low = (torch.rand(8, 2, 1) * 0.1).half().float(), torch.randn(8, 2, 1).half().float()
    q[:, 0], q[:, 1] = 0, 15                                      # every group spans its full range
    q[:, 32], q[:, 33] = 0, 15
    w = (q.reshape(8, 2, 32) * scale + low).reshape(8, 64)
    qw = exact_int4(w)
    assert qw is not None and torch.equal(qw.dequantize(), w)
    assert exact_int4(torch.randn(8, 64)) is None


@pytest.mark.parametrize("width,kind", [(64, "int8"), (24, "bf16")])   # the int8 kernel takes widths % 16 only
def test_rescored_head_keeps_the_fp32_top_logits(width, kind):
    weight, x = torch.randn(4000, width), torch.randn(1, 3, width)
    ref = x @ weight.t()
    head = RescoredHead(weight, k=16)
    assert head.kind == kind
    out = head(x)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    top = ref.topk(4, dim=-1).indices  # well inside the k=16 recomputed, whatever bf16 did to the order
    torch.testing.assert_close(out.gather(-1, top), ref.gather(-1, top))
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("method,bits,group_size,desc_act,order_by_input", [
    ("gptq", 4, 32, True, False),   # each matrix its own order: q/k/v and gate/up stay separate layers
    ("gptq", 4, 32, True, True),    # GPTQ's own: one order per input, folded into the norms and into w13
    ("gptq", 3, 32, False, False), ("gptq", 8, -1, False, False), ("awq", 4, 32, False, False)])
def test_quantized_checkpoint_matches_its_dequantized_reference(tmp_path, method, bits, group_size, desc_act,
                                                                order_by_input):
    from transformers import AutoModelForCausalLM

    from engine.weights import SideBySide

    save_tiny(tmp_path / "fp", "llama-gqa-tied-llama3")
    packed = quantize_model_dir(tmp_path / "fp", tmp_path / "q", method=method, bits=bits, group_size=group_size,
                                desc_act=desc_act, keep_reference=True, order_by_input=order_by_input)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "fp").eval()
    hf.load_state_dict({k: v for k, v in packed.reference.items()}, strict=False)
    ids = torch.randint(0, 96, (SEQ,))
    ref = hf_logits(hf, ids)
    model, kinds = load_transformer(tmp_path / "q", CPU, torch.float32)
    # 8-bit with one group stays packed on torch's int8 kernel; 3-bit has no CPU kernel and says so.
    assert kinds == {{4: "4-bit tinygemm", 8: "8-bit int8 weight-only",
                      3: "3-bit dequantized (no CPU kernel for 3-bit weights)"}[bits]}
    layer = model.layers[0]
    folded = desc_act and order_by_input
    assert (layer.attention_norm.out_order is not None) == folded and (layer.ffn_norm.out_order is not None) == folded
    assert isinstance(layer.feed_forward.w13, SideBySide) == (desc_act and not order_by_input)
    if folded:  # w2's order is in w13's rows now, and attention writes its output in wo's order
        assert layer.feed_forward.w2.perm is None and layer.attention.wo.perm is None
        assert layer.attention.output_order is not None and torch.equal(
            layer.attention.output_order[layer.attention.output_places.long()],
            torch.arange(layer.attention.output_order.numel()))
    model.setup_caches(64, torch.float32)
    with torch.no_grad():
        out = model(ids[None], torch.arange(SEQ), kv_len=SEQ)[0]
    assert rel_err(out, ref) < (1e-5 if bits == 3 else 2e-2)   # the packed kernels take bf16 activations


def test_default_model_greedy_golden_on_the_engine(default_model_dir):
    from engine.generation import collect
    from engine.sampling import GenerationParams
    from loaders.transformers_loader import TransformersLoader, TransformersOptions

    model = TransformersLoader().load(default_model_dir, TransformersOptions(device="cpu"))
    assert model.runtime.startswith("hearth engine (cpu")
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                              add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt = Prompt(text="", ids=list(ids["input_ids"]))
    text, done, _ = collect(model.generate(prompt, GenerationParams(max_new_tokens=24, temperature=0)))
    assert "Paris" in text and done.reason == "eos"


@needs_cuda
@pytest.mark.parametrize("group_size,act_order", [(128, False), (32, True), (64, True)])
# 1 and 5 rows: the tensor-core kernel on the packed weights; 300: dequantize + cuBLAS
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_int4_cuda_matches_dequantized(group_size, act_order, rows):
    qw = random_quant(1024, 528, group_size, act_order)
    layer = make_quant_linear(qw, None, torch.device("cuda"), torch.bfloat16)
    assert isinstance(layer, Int4Linear) and (layer.perm is not None) == act_order
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ qw.dequantize(torch.float64).cuda().t()
    assert rel_err(layer(x), ref) < 5e-3


def test_int4_mma_takes_groups_it_can_find_by_a_shift():
    from engine import int4_mma

    assert int4_mma.fits(4096, 4096, 32) and int4_mma.fits(4096, 4096, 128)
    assert int4_mma.fits(11008, 4096, 11008)          # one group for all inputs (GPTQ group_size -1)
    assert not int4_mma.fits(1152, 64, 192)           # a group size that is neither
    assert not int4_mma.fits(1024, 64, 48)            # groups that split a 16-input mma step's chunk unevenly


@needs_cuda
@pytest.mark.parametrize("act_order", [False, True])
def test_int4_cuda_one_group_for_all_inputs(act_order):
    qw = random_quant(1088, 64, 1088, act_order)      # K = 17 chunks: not a power of two
    layer = make_quant_linear(qw, None, torch.device("cuda"), torch.bfloat16)
    assert isinstance(layer, Int4Linear)
    for rows in (1, 300):
        x = torch.randn(rows, 1088, device="cuda", dtype=torch.bfloat16)
        assert rel_err(layer(x), x.double() @ qw.dequantize(torch.float64).cuda().t()) < 5e-3


@needs_cuda
def test_int4_cuda_falls_back_to_dequantized_for_shapes_the_kernel_does_not_take():
    for qw in (random_quant(1024, 520, 128, False),            # N not whole 16-row tiles
               random_quant(96, 64, 32, False),                # K not whole 64-input chunks
               random_quant(192, 64, 32, False, bits=3)):       # 3-bit K not whole 128-input chunks
        assert isinstance(make_quant_linear(qw, None, torch.device("cuda"), torch.bfloat16), DequantLinear)


def test_int4_pack_puts_each_groups_scales_and_zero_biases_in_one_record():
    # The kernel reads a group's two fp16 scales (rows r, r + 8) and two bf16 biases -(128 + z) in one load.
    from engine import int4_mma

    K, N, gs = 256, 48, 64
    qw = random_quant(K, N, gs, act_order=False)
    qw.scales = qw.scales.half().float()   # fp16 scales, as GPTQ and AWQ store them (fp32 ones: FLOAT, zeros apart)
    packed = int4_mma.pack(qw.q, qw.scales, qw.zeros, gs)
    rec = packed.store.scales                                                           # [N/16, G, 8, 4]
    assert packed.form == int4_mma.HALF_BIASED and rec.dtype == torch.int16 and rec.shape == (N // 16, K // gs, 8, 4)
    untile = lambda a: a.float().permute(1, 0, 3, 2).reshape(K // gs, N)                 # [N/16, G, 8, 2] -> [G, N]
    assert torch.equal(untile(rec[..., :2].contiguous().view(torch.float16)), qw.scales.half().float())
    assert torch.equal(untile(rec[..., 2:].contiguous().view(torch.bfloat16)), -(128 + qw.zeros.float()))


@needs_cuda
@pytest.mark.parametrize("uniform_zero", [True, False])   # symmetric GPTQ (one z) / per-group zeros (AWQ-like)
@pytest.mark.parametrize("warps,unroll,min_blocks", [(8, 1, 0), (8, 1, 6), (16, 1, 0), (16, 2, 0), (24, 1, 2),
                                                      (32, 1, 0)])
@pytest.mark.parametrize("gs", [32, 128])   # groups inside a chunk (cursors) / spanning chunks
def test_int4_mma_matches_reference_for_every_launch_shape(uniform_zero, warps, unroll, min_blocks, gs):
    from engine import int4_mma

    K, N = 2048, 1008
    qw = random_quant(K, N, gs, act_order=True)
    qw.scales = qw.scales.half().float()   # fp16 scales, as GPTQ and AWQ store them (fp32 ones: FLOAT, zeros apart)
    if uniform_zero:
        qw.zeros.fill_(8)
    qw, order = qw.sorted_by_group()
    packed = int4_mma.pack(qw.q.cuda(), qw.scales.cuda(), qw.zeros.cuda(), gs)
    # per-group zeros with fp16 scales: one record a group and row pair, scales then zero biases
    assert packed.zmode == (int4_mma.UNIFORM if uniform_zero else int4_mma.ZEROS)
    assert packed.form == (int4_mma.HALF if uniform_zero else int4_mma.HALF_BIASED) and packed.zero_bias is None
    w = qw.dequantize(torch.float64).cuda()                                               # [N, K], sorted K
    torch.testing.assert_close(int4_mma.dequantize(packed).double(), w, rtol=1e-2, atol=1e-6)
    order = order.cuda()
    for rows in (1, 3, 8):
        x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
        ref = x[:, order].double() @ w.t()
        config = int4_mma.MmaConfig(warps, unroll, min_blocks)
        for y in (int4_mma.matmul(x[:, order].contiguous(), packed, config),
                  int4_mma.matmul(x, packed, config, order.to(torch.int32))):
            assert y.shape == (rows, N) and torch.isfinite(y).all()
            assert rel_err(y, ref) < 5e-3


@needs_cuda
@pytest.mark.parametrize("kind", ["llama-gqa-tied-llama3", "mistral-gqa-window"])
def test_cuda_bf16_engine_matches_cpu_fp32(tmp_path, kind):
    # The CUDA path's fused kernels (RoPE + KV-cache write, SwiGLU, additive mask) against the CPU ops.
    save_tiny(tmp_path, kind)
    ids = torch.randint(0, 96, (SEQ,))
    runs = []
    for device, dtype in ((torch.device("cpu"), torch.float32), (torch.device("cuda"), torch.bfloat16)):
        model, _ = load_transformer(tmp_path, [device], dtype)
        engine = Engine(model, 64, use_graphs=device.type == "cuda", prefill_chunk=7)
        with torch.no_grad():
            steps = [engine.prefill(ids[:20].tolist()).float().cpu()]
            steps += [engine.decode(ids[pos].to(device), pos).float().cpu() for pos in range(20, SEQ)]
        runs.append(steps)
    for got, ref in zip(runs[1], runs[0]):
        assert rel_err(got, ref) < 3e-2


def cuda_tiny_gptq(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # Dimensions the tensor-core kernel takes (N in 16-row tiles, K in 64-input chunks).
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
                     ).save_pretrained(tmp_path / "fp")
    quantize_model_dir(tmp_path / "fp", tmp_path / "q", method="gptq", bits=4, group_size=32, desc_act=True,
                       order_by_input=True)
    return tmp_path / "q"


@needs_cuda
def test_cuda_graph_decode_equals_eager(tmp_path):
    model_dir = cuda_tiny_gptq(tmp_path)
    ids = torch.randint(0, 256, (40,)).tolist()
    outs = []
    for graphs in (False, True):
        model, kinds = load_transformer(model_dir, [torch.device("cuda")], torch.bfloat16)
        assert kinds == {"4-bit hearth tensor-core"}
        assert model.layers[0].attention_norm.out_order is not None  # act-order folded into the norms
        engine = Engine(model, 1024, use_graphs=graphs, prefill_chunk=128)
        with torch.no_grad():
            steps = [engine.prefill(ids[:30]).clone()]
            steps.append(engine.prefill(ids * 5).clone())  # 200 rows: the dequantize + cuBLAS path
            # Crosses the first bucket edge (256) so two graphs are captured and replayed.
            for pos in list(range(30, 40)) + list(range(250, 262)):
                steps.append(engine.decode(torch.tensor(ids[pos % 40], device="cuda"), pos).clone())
        outs.append(torch.stack(steps))
    assert len(engine.graphs) == 2
    torch.testing.assert_close(outs[1], outs[0], atol=1e-3, rtol=1e-3)
    # The CUDA path (fused norm writing act-order's order, kernel gathers) against the CPU one (plain ops).
    cpu_model, _ = load_transformer(model_dir, CPU, torch.float32)
    cpu_engine = Engine(cpu_model, 1024, use_graphs=False, prefill_chunk=128)
    with torch.no_grad():
        ref = cpu_engine.prefill(ids[:30])
        assert rel_err(outs[0][0].cpu(), ref) < 3e-2
        for pos in range(30, 40):
            ref = cpu_engine.decode(torch.tensor(ids[pos]), pos)
        assert rel_err(outs[1][11].cpu(), ref) < 3e-2


@needs_cuda
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quant_loaders_run_cuda_models_on_the_engine(tmp_path, method):
    # The hand-off a user gets: the gptq/awq loader on a CUDA machine picks Hearth's engine by itself, and its
    # logits agree with the exact dequantized transformers path (the loader with runtime=transformers, on CPU).
    from engine.generation import collect
    from engine.sampling import GenerationParams
    from loaders.awq_loader import AWQLoader
    from loaders.gptq_loader import GPTQLoader
    from loaders.quant.loader import QuantOptions
    from tests.quant_fixtures import tiny_llama_dir, write_word_tokenizer

    src = write_word_tokenizer(tiny_llama_dir(tmp_path / "src", hidden=128, intermediate=256, vocab_size=256), 256)
    out = quantize_model_dir(src, tmp_path / method, method=method, group_size=32, desc_act=method == "gptq",
                             order_by_input=True).out_dir
    loader = GPTQLoader() if method == "gptq" else AWQLoader()
    on_gpu = loader.load(out, QuantOptions())
    assert on_gpu.runtime.startswith("hearth engine (cuda") and "tensor-core" in on_gpu.runtime, on_gpu.runtime
    exact = loader.load(out, QuantOptions(runtime="transformers"))
    assert "on transformers (cpu" in exact.runtime, exact.runtime
    ids = torch.randint(3, 256, (24,)).tolist()
    with torch.no_grad():
        ref = exact.hf_model(torch.tensor([ids])).logits[0, -1].double()
        got = on_gpu.engine.prefill(ids).reshape(-1).double().cpu()
    assert rel_err(got, ref) < 3e-2
    text, done, _ = collect(on_gpu.generate(Prompt(text="", ids=ids), GenerationParams(max_new_tokens=12,
                                                                                    temperature=0)))
    assert done.error is None and text.strip()
    on_gpu.unload()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_split_spreads_layers_and_matches_one_gpu(tmp_path):
    model_dir = cuda_tiny_gptq(tmp_path)
    ids = torch.randint(0, 256, (20,))
    one, _ = load_transformer(model_dir, [torch.device("cuda", 0)], torch.bfloat16)
    two, _ = load_transformer(model_dir, [torch.device("cuda", 0), torch.device("cuda", 1)], torch.bfloat16,
                              gpu_split=[1, 1])
    assert two.layers[1].attention_norm.weight.device == torch.device("cuda", 1)
    outs = []
    for model in (one, two):
        model.setup_caches(64, torch.bfloat16)
        with torch.no_grad():
            outs.append(model(ids[None].cuda(), torch.arange(20, device="cuda"), kv_len=20)[0].cpu())
    torch.testing.assert_close(outs[1], outs[0], atol=1e-3, rtol=1e-3)


def test_irregular_act_order_groups_fall_back_to_the_dequantized_layer():
    qw = random_quant(256, 64, 32, act_order=True)
    qw.g_idx[:40] = 0            # group 0 holds 40+ rows, another fewer: no sort makes them contiguous
    assert not qw.regular_groups()
    layer = make_quant_linear(qw, None, torch.device("cpu"), torch.float32)
    assert isinstance(layer, DequantLinear)
    x = torch.randn(2, 256)
    torch.testing.assert_close(layer(x), x @ qw.dequantize().t())
