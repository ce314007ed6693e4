"""Whole models in GPTQ/AWQ files: a tiny random Llama matches its dequantized fp32 twin, and the real
default model, quantized, still answers the golden question."""
from __future__ import annotations

import pytest
import torch

from engine.generation import DoneEvent
from loaders.awq_loader import AWQLoader
from loaders.gptq_loader import GPTQLoader
from loaders.quant.build import load_quantized
from core.quant_formats import read_quant_spec
from engine.quant_linear import DequantLinear, Int4Linear
from loaders.quant.loader import QuantOptions
from tests.conftest import make_state
from tests.quant_fixtures import quantize_model_dir, tiny_llama_dir

PROMPT_IDS = torch.tensor([[1, 17, 42, 99, 5, 63, 120, 7]])

FORMATS = {
    "gptq-4bit-128g": dict(method="gptq", bits=4, group_size=128),
    "gptq-4bit-32g-actorder": dict(method="gptq", bits=4, group_size=32, desc_act=True),
    "gptq-8bit--1g-actorder": dict(method="gptq", bits=8, group_size=-1, desc_act=True),
    "gptq-3bit-64g-asym": dict(method="gptq", bits=3, group_size=64, sym=False),
    "gptq-2bit-32g-v2": dict(method="gptq", bits=2, group_size=32, checkpoint_format="gptq_v2"),
    "gptq-4bit-sharded-oddname": dict(method="gptq", bits=4, group_size=64, weight_name="gptq_model-4bit-64g"
                                      ".safetensors", shards=3),
    "gptq-config-json": dict(method="gptq", bits=4, group_size=32, sym=False, config_in="config.json"),
    "awq-32g-quant-config": dict(method="awq", group_size=32, config_in="quant_config.json"),
    "awq-64g-config-json": dict(method="awq", group_size=64, config_in="config.json"),
}


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "src")


def reference_model(source_dir, reference):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.from_pretrained(source_dir)).eval()
    model.load_state_dict(reference)
    return model


@pytest.mark.parametrize("name", list(FORMATS))
def test_tiny_llama_logits_match_its_dequantized_fp32_twin(tmp_path, tiny_source, name):
    packed = quantize_model_dir(tiny_source, tmp_path / name, keep_reference=True, **FORMATS[name])
    spec = read_quant_spec(packed.out_dir)
    model = load_quantized(packed.out_dir, spec, torch.float32)
    swapped = [m for m in model.modules() if isinstance(m, DequantLinear)]
    assert len(swapped) == 2 * 7                       # q, k, v, o, gate, up, down in each of 2 layers
    with torch.no_grad():
        got = model(PROMPT_IDS).logits
        want = reference_model(tiny_source, packed.reference)(PROMPT_IDS).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


def test_int4_kernel_model_stays_close_to_dequantized(tmp_path, tiny_source):
    packed = quantize_model_dir(tiny_source, tmp_path / "q", method="gptq", bits=4, group_size=32, desc_act=True)
    spec = read_quant_spec(packed.out_dir)
    with torch.no_grad():
        exact = load_quantized(packed.out_dir, spec, torch.float32, "dequantize")(PROMPT_IDS).logits
        fast_model = load_quantized(packed.out_dir, spec, torch.float32, "int4")
        fast = fast_model(PROMPT_IDS).logits
    assert len([m for m in fast_model.modules() if isinstance(m, Int4Linear)]) == 2 * 7
    assert not any(isinstance(m, DequantLinear) for m in fast_model.modules())
    assert torch.allclose(fast, exact, atol=0.02 * exact.abs().max().item())


def tensor_bytes(model) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}       # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_loaded_model_holds_no_more_than_its_dequantized_size(tmp_path, tiny_source):
    packed = quantize_model_dir(tiny_source, tmp_path / "q", method="gptq", bits=4, group_size=32, desc_act=True,
                                keep_reference=True)
    spec = read_quant_spec(packed.out_dir)
    fp_size = tensor_bytes(reference_model(tiny_source, packed.reference))
    exact = load_quantized(packed.out_dir, spec, torch.float32, "dequantize")
    fast = load_quantized(packed.out_dir, spec, torch.float32, "int4")
    assert tensor_bytes(exact) <= fp_size
    assert tensor_bytes(fast) < fp_size
    # Nothing of the unpacked checkpoint (q, zeros, g_idx) stays referenced by the layers.
    layer = exact.model.layers[0].self_attn.q_proj
    assert {name for name, _ in layer.named_buffers()} == {"weight"}


def ask_capital_of_france(models_dir, name: str, expected_loader: str) -> str:
    state = make_state(models_dir)
    model = state.load_model(name)
    assert model.loader == expected_loader
    prompt = state.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    params = state.generation_params(temperature=0.0, max_new_tokens=16)
    events = list(state.generate(prompt, params))
    state.unload_model()
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.error is None, done
    return done.text


def test_default_model_as_gptq_8bit_g128_answers_paris(models_dir, default_model_dir):
    name = "SmolLM2-135M-Instruct-GPTQ-8bit-128g"
    quantize_model_dir(default_model_dir, models_dir / name, method="gptq", bits=8, group_size=128, desc_act=True)
    assert "Paris" in ask_capital_of_france(models_dir, name, "gptq")


def test_default_model_as_awq_4bit_g64_answers_paris(models_dir, default_model_dir):
    name = "SmolLM2-135M-Instruct-AWQ"
    quantize_model_dir(default_model_dir, models_dir / name, method="awq", group_size=64, config_in="config.json")
    assert "Paris" in ask_capital_of_france(models_dir, name, "awq")


def test_loader_runtime_names_method_and_kernel(tmp_path, default_model_dir):
    folder = tiny_llama_dir(tmp_path / "src", vocab_size=49152, tokenizer_from=default_model_dir)
    out = quantize_model_dir(folder, tmp_path / "awq", method="awq", group_size=32).out_dir
    model = AWQLoader().load(out, QuantOptions(cpu_kernel="int4"))
    assert model.loader == "awq" and "awq" in model.runtime and "int4" in model.runtime
    assert model.context_length == 256
    assert GPTQLoader().detect(out) is None
