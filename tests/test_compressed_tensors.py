"""The 2026 quantized checkpoint formats: llm-compressor's compressed-tensors "pack-quantized" (W4A16/W8A16,
group and channel strategies, asymmetric zero points, act-order g_idx) read against weights packed here from
the format's description (the compressed-tensors package's PackedQuantizationCompressor: signed levels plus
2^(bits-1), packed least significant bits first along the input axis; zero points packed along the output
axis), whole models on the engine and on the CPU loader; detection naming the format; AWQ's
modules_to_not_convert; GPTQModel's `format: gptq_v2` and its quantized lm_head."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.weights import load_transformer
from loaders.base import LoadError
from loaders.gptq_loader import GPTQLoader
from core.compressed_tensors import read_compressed_weight
from core.quant_formats import read_quant_spec
from loaders.quant.loader import QuantOptions
from tests.quant_fixtures import gptq_tensors, quantize_weight, read_state_dict, write_word_tokenizer
from tests.test_families import engine_logits, hf_logits, prompt, save_family

CPU = [torch.device("cpu")]


def ct_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, actorder: bool):
    """Round-to-nearest in compressed-tensors' terms: signed levels q, signed zero points z [out, G], fp16
    scales [out, G], g_idx [in]; and W = (q - z) * s as fp32 [out, in]."""
    w = w.detach().float()
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    order = np.random.RandomState(in_f).permutation(in_f) if actorder else np.arange(in_f)
    g_idx = np.empty(in_f, dtype=np.int64)
    g_idx[order] = np.arange(in_f) // gs
    groups = int(g_idx.max()) + 1
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.empty(out_f, in_f)
    scales = torch.empty(out_f, groups, dtype=torch.float16)
    zeros = torch.zeros(out_f, groups)
    for g in range(groups):
        cols = torch.from_numpy(np.nonzero(g_idx == g)[0])
        block = w[:, cols]
        if sym:
            scale = (block.abs().amax(1).clamp(min=1e-8) / qmax).half()
            zero = torch.zeros(out_f)
        else:
            lo, hi = block.amin(1).clamp(max=0), block.amax(1).clamp(min=0)
            scale = ((hi - lo).clamp(min=1e-8) / (qmax - qmin)).half()
            zero = torch.round(qmin - lo / scale.float()).clamp(qmin, qmax)
        q[:, cols] = torch.round(block / scale.float()[:, None] + zero[:, None]).clamp(qmin, qmax)
        scales[:, g], zeros[:, g] = scale, zero
    gi = torch.from_numpy(g_idx)
    deq = (q - zeros[:, gi]) * scales.float()[:, gi]
    return q.to(torch.int64), zeros.to(torch.int64), scales, g_idx, deq


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values [R, C] -> int32 [R, ceil(C / (32 / bits))]: value c of a row at bit bits * (c % per) of
    word c // per, the last word zero-padded."""
    per = 32 // bits
    rows, cols = values.shape
    padded = np.zeros((rows, -(-cols // per) * per), dtype=np.uint64)
    padded[:, :cols] = values
    words = np.zeros((rows, padded.shape[1] // per), dtype=np.uint64)
    for j in range(per):
        words |= padded[:, j::per] << np.uint64(bits * j)
    return words.astype(np.uint32).view(np.int32)


def ct_tensors(prefix: str, w: torch.Tensor, bits: int, group_size: int, sym: bool, actorder: bool,
               old_zero_points: bool = False):
    """The pack-quantized tensors of one layer and what they decode to."""
    q, z, scales, g_idx, deq = ct_quantize(w, bits, group_size, sym, actorder)
    offset = 1 << (bits - 1)
    tensors = {f"{prefix}.weight_packed": torch.from_numpy(pack_rows((q + offset).numpy().astype(np.uint64), bits)),
               f"{prefix}.weight_scale": scales,
               f"{prefix}.weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}
    if not sym:
        zp = (z + offset).numpy().astype(np.uint64)                                      # [out, G]
        tensors[f"{prefix}.weight_zero_point"] = (z.to(torch.int8) if old_zero_points else
                                                  torch.from_numpy(np.ascontiguousarray(pack_rows(zp.T.copy(), bits).T)))
    if actorder:
        tensors[f"{prefix}.weight_g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
    return tensors, deq


def ct_config(bits: int, group_size: int, sym: bool, actorder: bool, ignore=("lm_head",)) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else group_size, "actorder": "group" if actorder else None,
               "dynamic": False, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": list(ignore)}


CASES = {
    "w4-g32-sym": (4, 32, True, False, False),
    "w4-g16-asym": (4, 16, False, False, False),
    "w4-g32-actorder-asym": (4, 32, False, True, False),
    "w8-channel-sym": (8, -1, True, False, False),
    "w8-g32-asym-int8-zero-points": (8, 32, False, False, True),   # older files: zero points unpacked
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", [(24, 64), (40, 36)])   # 36 inputs: a padded last word, a partial group
def test_reader_decodes_independently_packed_layers(case, shape):
    bits, group_size, sym, actorder, old_zp = CASES[case]
    if actorder and shape[1] % group_size:
        pytest.skip("act-order groups are whole")
    torch.manual_seed(0)
    w = torch.randn(shape)
    tensors, deq = ct_tensors("p", w, bits, group_size, sym, actorder, old_zp)
    qw, bias = read_compressed_weight({k.removeprefix("p."): v for k, v in tensors.items()}, bits, sym, group_size)
    assert bias is None and qw.bits == bits and (qw.in_features, qw.out_features) == (shape[1], shape[0])
    torch.testing.assert_close(qw.dequantize(torch.float32), deq, atol=0, rtol=0)


def write_ct_model(src: Path, out: Path, bits: int, group_size: int, sym: bool, actorder: bool) -> dict:
    """A compressed-tensors copy of the fp model folder `src` (lm_head and embeddings in float); returns the
    tensors it decodes to by the fp model's names."""
    out.mkdir(parents=True)
    tensors, reference = {}, {}
    for name, w in read_state_dict(src).items():
        if name.endswith(".weight") and w.dim() == 2 and ".layers." in name:
            layer, deq = ct_tensors(name.removesuffix(".weight"), w, bits, group_size, sym, actorder)
            tensors.update(layer)
            reference[name] = deq
        else:
            tensors[name] = w.half()
            reference[name] = tensors[name].float()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = ct_config(bits, group_size, sym, actorder)
    (out / "config.json").write_text(json.dumps(config))
    return reference


@pytest.mark.parametrize("bits,group_size,sym,actorder", [(4, 32, True, False), (4, 32, False, True),
                                                          (8, -1, True, False)])
def test_compressed_model_matches_its_dequantized_reference(tmp_path, bits, group_size, sym, actorder):
    hf = save_family(tmp_path / "fp", "qwen3-gqa-untied")
    reference = write_ct_model(tmp_path / "fp", tmp_path / "ct", bits, group_size, sym, actorder)
    hf.load_state_dict(reference, strict=False)
    ids = prompt()
    ref = hf_logits(hf, ids)
    model, kinds = load_transformer(tmp_path / "ct", CPU, torch.float32)
    assert any(kind.startswith(f"{bits}-bit") for kind in kinds), kinds
    got = engine_logits(model, ids)
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2   # CPU kernels take bf16 activations


def test_gptq_loader_detects_and_loads_compressed_tensors_on_cpu(tmp_path):
    hf = save_family(tmp_path / "fp", "qwen3-gqa-untied")
    reference = write_ct_model(tmp_path / "fp", tmp_path / "ct", 4, 32, False, True)
    write_word_tokenizer(tmp_path / "ct", 96)
    detection = GPTQLoader().detect(tmp_path / "ct")
    assert detection.reason == ("compressed-tensors pack-quantized W4A16, group 32, act-order, asym, lm_head kept "
                                "in float (config.json quantization_config)")
    model = GPTQLoader().load(tmp_path / "ct", QuantOptions())   # CPU: transformers with dequantized layers
    assert model.runtime.startswith("hearth gptq on transformers (cpu")
    hf.load_state_dict(reference, strict=False)
    ids = prompt()
    with torch.no_grad():
        got = model.hf_model(ids[None]).logits[0].float()
    torch.testing.assert_close(got, hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change,message", [
    (lambda c: c["config_groups"]["group_0"].update(input_activations={"num_bits": 8, "type": "int"}),
     "quantizes activations"),
    (lambda c: c.update(format="float-quantized") or c["config_groups"]["group_0"].pop("format"),
     "format 'float-quantized'"),
    (lambda c: c["config_groups"]["group_0"]["weights"].update(num_bits=3), "3 bits"),
    (lambda c: c["config_groups"].update(group_1={**c["config_groups"]["group_0"], "weights": {
        **c["config_groups"]["group_0"]["weights"], "num_bits": 8}}), "different ways"),
])
def test_compressed_configs_hearth_cannot_read_are_refused_by_name(tmp_path, change, message):
    config = {"model_type": "llama", "quantization_config": ct_config(4, 128, True, False)}
    change(config["quantization_config"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=message):
        read_quant_spec(tmp_path)


def test_awq_modules_to_not_convert_and_gptqmodel_v2_format(tmp_path):
    config = {"model_type": "qwen3_moe", "quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True,
        "modules_to_not_convert": ["mlp.gate", "lm_head"]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = read_quant_spec(tmp_path)
    assert spec.keep_float == ("mlp.gate", "lm_head") and "mlp.gate, lm_head kept in float" in spec.describe()
    # GPTQModel names the v2 layout (zero points stored as they are) in `format`.
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                                     "sym": True, "format": "gptq_v2", "lm_head": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = read_quant_spec(tmp_path)
    assert spec.checkpoint_format == "gptq_v2" and not spec.v1


def test_quantized_lm_head_runs_quantized_on_the_engine(tmp_path):
    """GPTQModel's lm_head: true quantizes the head too (lm_head.qweight): the engine runs it quantized
    rather than falling back to the embedding."""
    hf = save_family(tmp_path / "fp", "qwen3-gqa-untied")
    out = tmp_path / "q"
    out.mkdir()
    shutil.copyfile(tmp_path / "fp" / "config.json", out / "config.json")
    tensors, reference = {}, {}
    for name, w in read_state_dict(tmp_path / "fp").items():
        if name.endswith(".weight") and w.dim() == 2 and "embed" not in name:
            qt = quantize_weight(w, 4, 32, sym=True, desc_act=False)
            tensors.update(gptq_tensors(name.removesuffix(".weight"), qt, 4, "gptq_v2"))
            reference[name] = qt.dequantized
        else:
            tensors[name] = w.half()
            reference[name] = tensors[name].float()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                     "sym": True, "checkpoint_format": "gptq_v2", "lm_head": True}
    (out / "config.json").write_text(json.dumps(config))
    hf.load_state_dict(reference, strict=False)
    ids = prompt()
    model, _ = load_transformer(out, CPU, torch.float32)
    assert model.output.kernel == "tinygemm"
    got = engine_logits(model, ids)
    ref = hf_logits(hf, ids)
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2
