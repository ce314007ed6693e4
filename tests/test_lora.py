"""LoRA adapters: detection, Hearth's engine against transformers + peft (fp32 logits, CPU) on the default model
plain and GPTQ-quantized, weights, several adapters, removal, mismatches, the CLI, saved settings and the API.
The GPU test (an adapter inside the captured decode graph equals eager) skips without CUDA."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engine import lora as engine_lora
from engine.runtime import Engine
from engine.weights import load_transformer
from loaders.lora import list_loras, parse_lora_arg, read_info, read_weights
from tests.conftest import DEFAULT_MODEL, REPO, make_state
from tests.quant_fixtures import quantize_model_dir, tiny_llama_dir

CPU = [torch.device("cpu")]
PROMPT = torch.tensor([1, 504, 3458, 314, 260, 3575, 282, 4649, 47, 2])   # a few real tokens
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def hf_model(model_dir, reference=None):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if reference is not None:   # a quantized folder's dequantized weights: the exact reference for it
        hf.load_state_dict(reference, strict=False)
    return hf


def write_lora(hf, out_dir, seed: int, base: str = DEFAULT_MODEL, **config) -> None:
    """A random PEFT adapter for `hf` (non-zero B, so it changes the output), saved as peft saves one. `hf`
    itself is left unchanged."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    options = dict(r=8, lora_alpha=16, target_modules=ALL_LINEARS, init_lora_weights=False)
    peft = get_peft_model(hf, LoraConfig(**{**options, **config}))
    with torch.no_grad():   # peft's random init is large: scaled down, the logits stay in a useful range
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.mul_(0.3)
    peft.save_pretrained(out_dir)
    peft.unload()
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": base}))


def peft_logits(hf, adapters: list[tuple[str, float]]) -> torch.Tensor:
    """transformers + peft's logits [S, V] with the adapters in these folders at these weights."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    first, *rest = adapters
    peft = PeftModel.from_pretrained(hf, first[0], adapter_name="a0")
    for i, (folder, _) in enumerate(rest, 1):
        peft.load_adapter(folder, adapter_name=f"a{i}")
    peft.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    for module in peft.modules():
        if isinstance(module, LoraLayer):
            for i, (_, weight) in enumerate(adapters):
                module.set_scale(f"a{i}", weight)
    with torch.no_grad():
        logits = peft(PROMPT[None]).logits[0].float()
    peft.unload()   # back to the plain model for the next reference
    return logits


def engine_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT[None], torch.arange(len(PROMPT)), kv_len=len(PROMPT))[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def loras(tmp_path_factory, default_model_dir):
    """models/ with two random adapters for the default model: `lora-a` on every linear, `lora-b` (rslora,
    rank 4) on q/v/down only."""
    models = tmp_path_factory.mktemp("lora-models")
    hf = hf_model(default_model_dir)
    write_lora(hf, models / "lora-a", seed=1)
    write_lora(hf, models / "lora-b", seed=2, r=4, lora_alpha=8, use_rslora=True,
               target_modules=["q_proj", "v_proj", "down_proj"])
    (models / DEFAULT_MODEL).symlink_to(default_model_dir, target_is_directory=True)
    return models


@pytest.fixture(scope="module")
def engine_model(default_model_dir):
    model, _ = load_transformer(default_model_dir, CPU, torch.float32)
    model.setup_caches(64, torch.float32)
    return model


def adapters(models, *pairs):
    return [(read_weights(read_info(models / name)), weight) for name, weight in pairs]


def test_adapter_folders_are_listed_as_loras_with_their_base_not_as_models(loras):
    found = {info.name: info for info in list_loras(loras)}
    assert sorted(found) == ["lora-a", "lora-b"]
    a, b = found["lora-a"], found["lora-b"]
    assert (a.base_model, a.rank, a.alpha, a.use_rslora) == (DEFAULT_MODEL, 8, 16.0, False)
    assert sorted(a.target_modules) == sorted(ALL_LINEARS)
    assert (b.rank, b.use_rslora) == (4, True)
    assert make_state(loras).list_models() == [DEFAULT_MODEL]   # the adapters are not offered as models


def test_engine_with_adapters_equals_transformers_peft(loras, default_model_dir, engine_model):
    hf = hf_model(default_model_dir)
    base = engine_logits(engine_model)
    try:
        engine_lora.apply(engine_model, adapters(loras, ("lora-a", 1.0)))
        one = engine_logits(engine_model)
        ref = peft_logits(hf, [(loras / "lora-a", 1.0)])
        assert rel_err(one, base) > 0.02     # the adapter changes the output clearly...
        torch.testing.assert_close(one, ref, atol=2e-4, rtol=1e-4)   # ...exactly as peft does
        # Two at once, with weights (one rslora), switched in place: the same stacked buffers.
        engine_lora.apply(engine_model, adapters(loras, ("lora-a", 0.5), ("lora-b", 1.5)))
        both = engine_logits(engine_model)
        torch.testing.assert_close(both, peft_logits(hf, [(loras / "lora-a", 0.5), (loras / "lora-b", 1.5)]),
                                   atol=2e-4, rtol=1e-4)
        stacked = engine_model.layers[0].attention.wqkv
        a_buffer = stacked.a.data_ptr()
        engine_lora.reweight(engine_model, adapters(loras, ("lora-a", 1.0), ("lora-b", 0.0)))
        assert stacked.a.data_ptr() == a_buffer   # in place: a captured graph keeps reading it
        torch.testing.assert_close(engine_logits(engine_model), one, atol=2e-4, rtol=1e-4)
        # Weight 0 is exactly the base; so is removing them.
        engine_lora.reweight(engine_model, adapters(loras, ("lora-a", 0.0), ("lora-b", 0.0)))
        assert torch.equal(engine_logits(engine_model), base)
    finally:
        engine_lora.apply(engine_model, [])
    assert not any(isinstance(m, engine_lora.LoraLinear) for m in engine_model.modules())
    assert torch.equal(engine_logits(engine_model), base)


def test_engine_with_adapter_on_gptq_act_order_base_equals_peft_over_dequantized_weights(tmp_path, loras,
                                                                                          default_model_dir):
    # Act-order with one order per input: the orders are folded into the norms and w13's rows, which the
    # adapter's A columns and B rows must follow. Group 96 has no CPU kernel, so the layers run dequantized
    # in fp32 and the comparison can be tight (the adapter sits beside any kernel alike).
    packed = quantize_model_dir(default_model_dir, tmp_path / "gptq", bits=4, group_size=96, desc_act=True,
                                order_by_input=True, keep_reference=True)
    model, kinds = load_transformer(packed.out_dir, CPU, torch.float32)
    assert kinds == {"4-bit dequantized (tinygemm takes groups of 32/64/128/256, K % 16 and N % 8 = 0)"}
    assert model.layers[0].feed_forward.hidden_order is not None
    assert model.layers[0].attention_norm.out_order is not None
    model.setup_caches(64, torch.float32)
    hf = hf_model(default_model_dir, packed.reference)
    base = engine_logits(model)
    engine_lora.apply(model, adapters(loras, ("lora-a", 1.0), ("lora-b", 0.7)))
    got = engine_logits(model)
    assert rel_err(got, base) > 0.02
    ref = peft_logits(hf, [(loras / "lora-a", 1.0), (loras / "lora-b", 0.7)])
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
    engine_lora.apply(model, [])
    assert torch.equal(engine_logits(model), base)
