"""GPTQ/AWQ unpacking and dequantization against checkpoints packed by tests/quant_fixtures.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loaders.base import LoadError
from engine.quant_linear import DequantLinear, Int4Linear, make_quant_linear
from core.quant_formats import QuantSpec, read_quant_spec, read_quant_weight, unpack_gptq
from tests.quant_fixtures import (awq_gemv_tensors, awq_tensors, gptq_tensors, pack_bit_stream,
                                  quantize_weight)


def source_weight(out_features: int = 64, in_features: int = 256, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(out_features, in_features) * 0.05


def layer(tensors: dict, prefix: str = "p") -> dict:
    return {k.removeprefix(prefix + "."): v for k, v in tensors.items()}


def assert_within_quantization_error(w: torch.Tensor, source: torch.Tensor, qt, sym: bool) -> None:
    """Round-to-nearest error is at most half a step (sym); asym's rounded zero point adds up to half more.
    Scales are stored in fp16 (relative rounding up to 2**-11), which moves each value by up to |w| * 2**-11."""
    step = qt.scales.float()[torch.from_numpy(qt.g_idx.astype(np.int64))].t()      # [out, in]
    bound = step * (0.5 if sym else 1.0) + w.abs() * 2.0 ** -10 + 1e-6
    excess = float(((w - source).abs() - bound).max())
    assert excess <= 0, f"error exceeds the quantization bound by {excess}"


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("desc_act", [False, True], ids=["no-act-order", "act-order"])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_dequantizes_to_the_source_within_quantization_error(bits, group_size, desc_act, sym,
                                                                  checkpoint_format):
    source = source_weight()
    qt = quantize_weight(source, bits, group_size, sym, desc_act)
    spec = QuantSpec("gptq", bits, group_size, desc_act=desc_act, sym=sym, checkpoint_format=checkpoint_format)
    weight, bias = read_quant_weight(layer(gptq_tensors("p", qt, bits, checkpoint_format)), spec)
    assert bias is None   # AutoGPTQ's all-zero bias is dropped
    # one group: the order cannot show
    assert (weight.sorted_by_group()[1] is not None) == (desc_act and group_size != -1)
    w = weight.dequantize()
    assert torch.equal(w, qt.dequantized)
    assert_within_quantization_error(w, source, qt, sym)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_gptq_partial_last_group_like_576_inputs_with_group_128(bits):
    source = source_weight(out_features=96, in_features=576)
    qt = quantize_weight(source, bits, 128, sym=True, desc_act=True)
    assert qt.scales.shape == (5, 96)     # 4 full groups and one of 64
    weight, _ = read_quant_weight(layer(gptq_tensors("p", qt, bits, "gptq")),
                                  QuantSpec("gptq", bits, 128, desc_act=True))
    assert torch.equal(weight.dequantize(), qt.dequantized)
    assert_within_quantization_error(weight.dequantize(), source, qt, sym=True)


def test_three_bit_values_straddle_words_as_one_96_bit_stream():
    values = np.zeros((32, 1), dtype=np.uint32)
    values[10] = 0b111                      # stream bits 30..32: bits 30, 31 of word 0 and bit 0 of word 1
    values[21] = 0b101                      # stream bits 63..65: bit 31 of word 1 and bit 1 of word 2
    words = pack_bit_stream(values, 3).view(np.uint32)[:, 0]
    assert [int(w) for w in words] == [0xC0000000, 0x80000001, 0x00000002]
    q, _ = unpack_gptq(torch.from_numpy(words.view(np.int32)).reshape(3, 1),
                       torch.zeros(1, 3, dtype=torch.int32), bits=3, v1=False)
    assert q[:, 0].tolist() == values[:, 0].tolist()


def test_symmetric_four_bit_v1_zero_words_read_0x77777777_and_decode_to_8():
    qt = quantize_weight(source_weight(), 4, 32, sym=True, desc_act=False)
    qzeros = gptq_tensors("p", qt, 4, "gptq")["p.qzeros"]
    assert torch.all(qzeros == 0x77777777)
    _, zeros = unpack_gptq(torch.zeros(32, 8, dtype=torch.int32), qzeros, 4, v1=True)
    assert torch.all(zeros == 8)


def test_v1_packer_bug_words_decode_as_stored():
    """AutoGPTQ v1 wrote 0xffffffff where z == 0; reading it as stored (+1, masked) gives zero 0."""
    qzeros = torch.tensor([[-1]], dtype=torch.int32)               # 0xffffffff
    _, zeros = unpack_gptq(torch.zeros(4, 8, dtype=torch.int32), qzeros, 4, v1=True)
    assert zeros.tolist() == [[0] * 8]


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_awq_gemm_dequantizes_to_the_source(group_size):
    source = source_weight(out_features=64, in_features=384)
    qt = quantize_weight(source, 4, group_size, sym=False, desc_act=False)
    weight, _ = read_quant_weight(layer(awq_tensors("p", qt)), QuantSpec("awq", 4, group_size, sym=False))
    assert torch.equal(weight.dequantize(), qt.dequantized)
    assert_within_quantization_error(weight.dequantize(), source, qt, sym=False)


def test_awq_gemm_interleaves_columns_in_each_word():
    """Nibble i of a word holds column [0,2,4,6,1,3,5,7][i]: column 1 sits in nibble 4."""
    q = np.zeros((1, 8), dtype=np.uint32)
    q[0, 1] = 0xA
    from tests.quant_fixtures import pack_awq_columns

    assert int(pack_awq_columns(q).view(np.uint32)[0, 0]) == 0xA << 16


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_awq_gemv_dequantizes_to_the_source(group_size):
    source = source_weight(out_features=64, in_features=256)
    qt = quantize_weight(source, 4, group_size, sym=False, desc_act=False)
    spec = QuantSpec("awq", 4, group_size, sym=False, awq_version="gemv")
    weight, _ = read_quant_weight(layer(awq_gemv_tensors("p", qt, group_size)), spec)
    assert torch.equal(weight.dequantize(), qt.dequantized)


@pytest.mark.parametrize("desc_act", [False, True])
def test_cpu_int4_kernel_matches_dequantized_linear(desc_act):
    qt = quantize_weight(source_weight(), 4, 64, sym=False, desc_act=desc_act)
    weight, _ = read_quant_weight(layer(gptq_tensors("p", qt, 4, "gptq")),
                                  QuantSpec("gptq", 4, 64, desc_act=desc_act, sym=False))
    cpu = torch.device("cpu")
    exact, fast = DequantLinear(weight, None, cpu, torch.float32), make_quant_linear(weight, None, cpu, torch.float32)
    assert isinstance(fast, Int4Linear) and not hasattr(fast, "weight")
    assert fast.packed.numel() * fast.packed.element_size() < exact.weight.numel() * 4 / 4
    x = torch.randn(3, 256)
    reference = exact(x)
    assert torch.allclose(fast(x), reference, atol=0.02 * reference.abs().max().item())


def test_int4_kernel_falls_back_to_dequantize_where_it_does_not_apply():
    qt = quantize_weight(source_weight(), 3, 32, sym=True, desc_act=False)
    weight, _ = read_quant_weight(layer(gptq_tensors("p", qt, 3, "gptq")), QuantSpec("gptq", 3, 32))
    assert isinstance(make_quant_linear(weight, None, torch.device("cpu"), torch.float32), DequantLinear)


# ---- configs ---------------------------------------------------------------------------------------------

def write(folder, name, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(data if isinstance(data, str) else json.dumps(data))


def test_quantize_config_json_of_a_thebloke_repo(tmp_path):
    write(tmp_path, "quantize_config.json", {"bits": 4, "group_size": 128, "damp_percent": 0.1, "desc_act": True,
                                             "static_groups": False, "sym": True, "true_sequential": True,
                                             "model_name_or_path": None, "model_file_base_name": "model"})
    spec = read_quant_spec(tmp_path)
    assert (spec.method, spec.bits, spec.group_size, spec.desc_act, spec.sym, spec.v1) == ("gptq", 4, 128, True,
                                                                                           True, True)
    assert spec.describe() == "GPTQ 4-bit, group 128, act-order, sym (quantize_config.json)"


def test_gptq_v2_and_group_minus_one_from_config_json(tmp_path):
    write(tmp_path, "config.json", {"model_type": "llama", "quantization_config": {
        "quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": False, "sym": False,
        "checkpoint_format": "gptq_v2"}})
    spec = read_quant_spec(tmp_path)
    assert (spec.bits, spec.group_size_for(576), spec.v1, spec.sym) == (8, 576, False, False)
    assert spec.source == "config.json quantization_config"


def test_awq_config_from_quant_config_json_only(tmp_path):
    write(tmp_path, "config.json", {"model_type": "llama"})
    write(tmp_path, "quant_config.json", {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"})
    spec = read_quant_spec(tmp_path)
    assert (spec.method, spec.bits, spec.group_size, spec.awq_version) == ("awq", 4, 64, "gemm")


def test_awq_config_from_config_json(tmp_path):
    write(tmp_path, "config.json", {"quantization_config": {"quant_method": "awq", "zero_point": True,
                                                            "group_size": 128, "bits": 4, "version": "gemm"}})
    assert read_quant_spec(tmp_path).describe() == "AWQ 4-bit, group 128, GEMM, zero point (config.json " \
                                                  "quantization_config)"


def test_plain_model_has_no_quant_spec(tmp_path):
    write(tmp_path, "config.json", {"model_type": "llama"})
    assert read_quant_spec(tmp_path) is None


@pytest.mark.parametrize("name", ["quantize_config.json", "quant_config.json", "config.json"])
def test_malformed_json_is_a_load_error_naming_the_file(tmp_path, name):
    write(tmp_path, name, "{bits: 4,")
    with pytest.raises(LoadError, match=name.replace(".", r"\.")):
        read_quant_spec(tmp_path)


def test_unsupported_values_are_named(tmp_path):
    write(tmp_path, "quantize_config.json", {"bits": 5, "group_size": 128})
    with pytest.raises(LoadError, match="bits 5"):
        read_quant_spec(tmp_path)
    write(tmp_path, "quantize_config.json", {"bits": 4, "group_size": 128})
    write(tmp_path / "b", "config.json", {"quantization_config": {"quant_method": "bitsandbytes"}})
    with pytest.raises(LoadError, match="bitsandbytes"):
        read_quant_spec(tmp_path / "b")
