"""Writes real GPTQ and AWQ checkpoints from full-precision weights, for tests.

The packing here follows ../shared/FORMATS.md (AutoGPTQ 0.7.1 / AutoAWQ 0.2.9 layouts) and is written
independently of loaders/quant/formats.py: it scatters each value to its bit position in numpy, while the
reader gathers blocks in torch, so a shared misreading of the layout would not cancel out.

Quantization is round-to-nearest (no GPTQ error correction); what matters for tests is the file layout.
`quantize_model_dir` turns a model folder (e.g. the default model) into a quantized model folder.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # nibble i of a word holds column 8c + AWQ_PACK_ORDER[i]
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                "README.md")


@dataclass
class QuantizedTensor:
    """One linear layer's RTN quantization: integers, zeros and scales, and what they decode to."""
    q: np.ndarray          # uint32 [in, out]
    zeros: np.ndarray      # uint32 [G, out] (true zero points)
    scales: torch.Tensor   # fp16 [G, out]
    g_idx: np.ndarray      # int32 [in]

    @property
    def dequantized(self) -> torch.Tensor:
        """fp32 [out, in]: what the stored integers, zeros and scales decode to."""
        gi = torch.from_numpy(self.g_idx.astype(np.int64))
        deq = (torch.from_numpy(self.q.astype(np.float32)) - torch.from_numpy(self.zeros.astype(np.float32))[gi]) \
            * self.scales.float()[gi]
        return deq.t().contiguous()


def act_order_permutation(weight: torch.Tensor, by_input: bool = False) -> np.ndarray:
    """A desc_act-like processing order. GPTQ orders a matrix's inputs by its input's Hessian diagonal, so
    matrices reading the same input (q, k, v; gate, up) share one order: by_input=True mimics that with an
    order fixed by the input width alone. by_input=False: each matrix's own order (columns by descending
    weight norm), which files may also carry."""
    if by_input:
        return np.random.RandomState(weight.shape[1]).permutation(weight.shape[1])
    norms = weight.float().norm(dim=0)
    return torch.argsort(norms, descending=True, stable=True).numpy()


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int, sym: bool, desc_act: bool,
                    order_by_input: bool = False) -> QuantizedTensor:
    """Round-to-nearest quantize W [out, in] in groups of `group_size` inputs (-1 = all inputs)."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    gs = in_features if group_size == -1 else group_size
    order = act_order_permutation(w, order_by_input) if desc_act else np.arange(in_features)
    g_idx = np.empty(in_features, dtype=np.int32)
    g_idx[order] = np.arange(in_features) // gs          # the k-th processed column joins group k // gs
    groups = int(g_idx.max()) + 1
    maxq = (1 << bits) - 1
    ordered = w[:, torch.from_numpy(order.astype(np.int64))]    # [out, in] in processing order
    q_ordered = torch.empty(out_features, in_features)
    zero_rows, scale_rows = [], []
    for g in range(groups):
        block = ordered[:, g * gs:(g + 1) * gs]                  # group g's members, contiguous here
        if sym:
            amax = block.abs().amax(dim=1).clamp(min=1e-8)
            scale = (2 * amax / maxq).half()
            zero = torch.full((out_features,), float(1 << (bits - 1)))
        else:
            lo = block.amin(dim=1).clamp(max=0)
            hi = block.amax(dim=1).clamp(min=0)
            scale = ((hi - lo).clamp(min=1e-8) / maxq).half()
            zero = torch.round(-lo / scale.float()).clamp(0, maxq)
        q_ordered[:, g * gs:(g + 1) * gs] = torch.round(block / scale.float()[:, None] + zero[:, None]).clamp(0, maxq)
        zero_rows.append(zero)
        scale_rows.append(scale)
    q = np.empty((in_features, out_features), dtype=np.uint32)
    q[order] = q_ordered.t().numpy().astype(np.uint32)            # back to the checkpoint's input order
    zeros = torch.stack(zero_rows).numpy().astype(np.uint32)
    scales = torch.stack(scale_rows)
    return QuantizedTensor(q, zeros, scales, g_idx)


def pack_bit_stream(values: np.ndarray, bits: int) -> np.ndarray:
    """uint32 [K, N] values < 2**bits -> int32 [K*bits/32, N]: value k lands at bit k*bits of a
    column's bit stream, least significant bits first, spilling into the next word when it straddles."""
    k, n = values.shape
    if (k * bits) % 32:
        raise ValueError(f"{k} values of {bits} bits do not fill whole 32-bit words")
    words = np.zeros(((k * bits) // 32, n), dtype=np.uint64)
    # The bit position of value i repeats every 32 values (32*bits bits = `bits` whole words), so handle
    # all rows with the same i % 32 at once.
    for j in range(min(32, k)):
        rows = values[j::32].astype(np.uint64)                     # values j, j+32, j+64, ...
        word, offset = divmod(j * bits, 32)
        first = word + bits * np.arange(rows.shape[0])             # the word holding bit j*bits of each block
        words[first] |= (rows << np.uint64(offset)) & np.uint64(0xFFFFFFFF)
        if offset + bits > 32:
            words[first + 1] |= rows >> np.uint64(32 - offset)
    return words.astype(np.uint32).view(np.int32)


def gptq_tensors(prefix: str, qt: QuantizedTensor, bits: int, checkpoint_format: str) -> dict[str, torch.Tensor]:
    """The five AutoGPTQ tensors of one layer (qweight, qzeros, scales, g_idx and the all-zero bias)."""
    mask = (1 << bits) - 1
    stored_zeros = qt.zeros if checkpoint_format == "gptq_v2" else (qt.zeros - 1) & mask   # v1 keeps z-1
    return {
        f"{prefix}.qweight": torch.from_numpy(pack_bit_stream(qt.q, bits)),
        f"{prefix}.qzeros": torch.from_numpy(np.ascontiguousarray(pack_bit_stream(stored_zeros.T.copy(), bits).T)),
        f"{prefix}.scales": qt.scales.clone(),
        f"{prefix}.g_idx": torch.from_numpy(qt.g_idx.copy()),
        f"{prefix}.bias": torch.zeros(qt.q.shape[1], dtype=torch.float16),
    }


def pack_awq_columns(values: np.ndarray) -> np.ndarray:
    """uint32 [R, N] nibbles -> int32 [R, N/8] in AutoAWQ's interleaved GEMM order."""
    r, n = values.shape
    words = np.zeros((r, n // 8), dtype=np.uint32)
    for c in range(n // 8):
        for i, column in enumerate(AWQ_PACK_ORDER):
            words[:, c] |= values[:, 8 * c + column] << np.uint32(4 * i)
    return words.view(np.int32)


def awq_tensors(prefix: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.qweight": torch.from_numpy(pack_awq_columns(qt.q)),
        f"{prefix}.qzeros": torch.from_numpy(pack_awq_columns(qt.zeros)),
        f"{prefix}.scales": qt.scales.clone(),
    }


def is_quantizable(name: str, tensor: torch.Tensor) -> bool:
    """The decoder layers' linear weights; embeddings, norms and lm_head stay in fp16 as in real repos."""
    return name.endswith(".weight") and tensor.dim() == 2 and ".layers." in name and "norm" not in name


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def write_shards(out_dir: Path, tensors: dict[str, torch.Tensor], weight_name: str, shards: int) -> None:
    if shards <= 1:
        save_file(tensors, out_dir / weight_name, metadata={"format": "pt"})
        return
    stem = weight_name.removesuffix(".safetensors")
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"{stem}-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, out_dir / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out_dir / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


@dataclass
class PackedModel:
    out_dir: Path
    # Every tensor the quantized folder decodes to, fp32, by the fp model's names; None unless asked for.
    reference: dict[str, torch.Tensor] | None


def quantize_model_dir(src_dir: Path, out_dir: Path, method: str = "gptq", bits: int = 4, group_size: int = 128,
                       desc_act: bool = False, sym: bool = True, checkpoint_format: str = "gptq",
                       config_in: str = "quantize_config.json", weight_name: str = "model.safetensors",
                       shards: int = 1, keep_reference: bool = False, order_by_input: bool = False) -> PackedModel:
    """Write a GPTQ or AWQ (GEMM) copy of the fp model in `src_dir` to `out_dir`.

    order_by_input (desc_act): matrices sharing an input share its act-order order, as GPTQ's own files do.
    config_in: where the quantization config goes: "quantize_config.json" (AutoGPTQ), "quant_config.json"
    (old AWQ repos) or "config.json" (a `quantization_config` entry, as newer repos carry).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in COPIED_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out_dir / name)
    source = read_state_dict(src_dir)
    tensors: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] | None = {} if keep_reference else None
    for name, tensor in source.items():
        if is_quantizable(name, tensor):
            prefix = name.removesuffix(".weight")
            if method == "gptq":
                qt = quantize_weight(tensor, bits, group_size, sym, desc_act, order_by_input)
                tensors.update(gptq_tensors(prefix, qt, bits, checkpoint_format))
            else:
                qt = quantize_weight(tensor, 4, group_size, sym=False, desc_act=False)
                tensors.update(awq_tensors(prefix, qt))
            if reference is not None:
                reference[name] = qt.dequantized
        else:
            tensors[name] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
            if reference is not None:
                reference[name] = tensors[name].float()
    write_shards(out_dir, tensors, weight_name, shards)
    write_quant_config(out_dir, method, bits, group_size, desc_act, sym, checkpoint_format, config_in)
    return PackedModel(out_dir, reference)


def write_quant_config(out_dir: Path, method: str, bits: int, group_size: int, desc_act: bool, sym: bool,
                       checkpoint_format: str, config_in: str) -> None:
    if method == "gptq":
        cfg = {"bits": bits, "group_size": group_size, "damp_percent": 0.1, "desc_act": desc_act,
               "static_groups": False, "sym": sym, "true_sequential": True, "model_name_or_path": None,
               "model_file_base_name": "model", "quant_method": "gptq"}
        if checkpoint_format != "gptq":
            cfg["checkpoint_format"] = checkpoint_format
    else:
        cfg = {"quant_method": "awq", "zero_point": True, "group_size": group_size, "bits": 4, "version": "gemm"}
    if config_in == "config.json":
        config = json.loads((out_dir / "config.json").read_text())
        config["quantization_config"] = cfg
        (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    elif config_in == "quant_config.json":
        (out_dir / "quant_config.json").write_text(json.dumps(
            {"zero_point": True, "q_group_size": group_size, "w_bit": 4, "version": "GEMM"}))
    else:
        (out_dir / config_in).write_text(json.dumps(cfg, indent=2))


def awq_gemv_tensors(prefix: str, qt: QuantizedTensor, group_size: int) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMV layout: qweight [out, in/8] and qzeros [out, padded G/8] packed in sequence along the
    input axis; scales [out, padded G]. Padding follows AutoAWQ's calculate_zeros_width."""
    in_features, out_features = qt.q.shape
    groups = qt.zeros.shape[0]
    multiple = 1 if group_size >= 128 else (2 if group_size == 64 else 4)
    width = -(-groups // 8)
    width = -(-width // multiple) * multiple              # words of packed zeros per output row

    def sequential(values: np.ndarray) -> np.ndarray:     # [rows, K] -> [rows, K/8], nibble i = column 8c+i
        rows, k = values.shape
        words = np.zeros((rows, k // 8), dtype=np.uint32)
        for i in range(k):
            words[:, i // 8] |= values[:, i] << np.uint32(4 * (i % 8))
        return words.view(np.int32)

    zeros = np.zeros((out_features, width * 8), dtype=np.uint32)
    zeros[:, :groups] = qt.zeros.T
    scales = torch.zeros(out_features, width * 8, dtype=torch.float16)
    scales[:, :groups] = qt.scales.t()
    return {f"{prefix}.qweight": torch.from_numpy(sequential(qt.q.T.copy())),
            f"{prefix}.qzeros": torch.from_numpy(sequential(zeros)),
            f"{prefix}.scales": scales}


def tiny_llama_dir(out_dir: Path, seed: int = 0, hidden: int = 64, intermediate: int = 128, vocab_size: int = 128,
                   tokenizer_from: Path | None = None, **config_overrides) -> Path:
    """A tiny random Llama (fp32 safetensors + config) for format tests; `tokenizer_from` copies a real
    tokenizer in (then vocab_size must cover it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False, **config_overrides)
    model = LlamaForCausalLM(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out_dir / "model.safetensors",
              metadata={"format": "pt"})
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if (tokenizer_from / name).is_file():
                shutil.copyfile(tokenizer_from / name, out_dir / name)
    return out_dir


def write_word_tokenizer(out_dir: Path, vocab_size: int) -> Path:
    """A word-level tokenizer ("w3 w4 ..." -> [3, 4]) built in code, for tiny models that must load through
    a loader where the default model's tokenizer is not at hand (the GPU machine)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return out_dir


def write_gguf_header_only(path: Path, architecture: str = "llama", file_type: int = 3,
                           context_length: int = 2048) -> Path:
    """A GGUF file with metadata and one small tensor: enough for detection, not for running."""
    from gguf import GGUFWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), architecture)
    writer.add_file_type(file_type)
    writer.add_context_length(context_length)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GGUF_LLAMA_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}
GGUF_LLAMA_LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                          "mlp.down_proj": "ffn_down"}


def llama_cpp_rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per head (its rope pairs adjacent dims); HF keeps halves."""
    out = weight.shape[0]
    return weight.reshape(heads, 2, out // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_from_llama_dir(src_dir: Path, gguf_path: Path) -> Path:
    """An F32 GGUF (llama.cpp layout, gpt2-style BPE tokenizer and chat template in the metadata) of the
    tiny Llama in `src_dir`, written with the `gguf` package; transformers can load it with gguf_file=."""
    from gguf import GGUFWriter

    config = json.loads((src_dir / "config.json").read_text())
    tokenizer = json.loads((src_dir / "tokenizer.json").read_text())
    tok_config = json.loads((src_dir / "tokenizer_config.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(gguf_path), "llama")
    writer.add_file_type(0)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(merges)
    special = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    writer.add_bos_token_id(special[tok_config["bos_token"]])
    writer.add_eos_token_id(special[tok_config["eos_token"]])
    if tok_config.get("chat_template"):
        writer.add_chat_template(tok_config["chat_template"])
    for name, tensor in read_state_dict(src_dir).items():
        array = tensor.float().numpy()
        if name in GGUF_LLAMA_NAMES:
            target = GGUF_LLAMA_NAMES[name]
        else:
            _, _, layer, rest = name.split(".", 3)                   # model.layers.<i>.<rest>
            module = rest.removesuffix(".weight")
            target = f"blk.{layer}.{GGUF_LLAMA_LAYER_NAMES[module]}.weight"
            if module == "self_attn.q_proj":
                array = llama_cpp_rope_permute(array, heads)
            elif module == "self_attn.k_proj":
                array = llama_cpp_rope_permute(array, kv_heads)
        writer.add_tensor(target, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf_path
