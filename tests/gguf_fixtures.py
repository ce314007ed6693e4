"""Small random GGUF models of architectures Hearth's engine does not run, written with the `gguf` package's
GGUFWriter in llama.cpp's own layout, so the llama.cpp loader's tests run them on CPU without a download.

`write_gpt_oss_gguf`: a tiny gpt-oss (llama.cpp's LLM_ARCH_OPENAI_MOE, "gpt-oss" in the file) with what sets it
apart from the Llama family, as llama.cpp's src/models/openai-moe.cpp reads it: MXFP4 experts (gate/up/down per
expert, with biases), a router with a bias, attention sinks (one logit a head), q/k/v/o biases, every second
layer on a sliding window, YaRN RoPE scaling, and the harmony chat template. The vocabulary is borrowed from
another GGUF (the default model's BPE one) with harmony's control tokens added after it, so prompts tokenize
as a real gpt-oss file's do: `<|start|>`, `<|message|>`, `<|channel|>`, `<|end|>` are one token each, and
`<|return|>`/`<|call|>` make llama.cpp treat `<|end|>` as a turn separator, not an end of generation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# harmony's control tokens, appended to the borrowed vocabulary (gpt-oss's o200k_harmony has them too).
HARMONY_TOKENS = ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>"]

# The harmony format, short: gpt-oss's own template also writes the date, tools and the commentary channel, and
# drops past analysis; these are the turn and channel markers a reply and the reasoning splitter depend on. The
# user's system message becomes the developer turn, as in gpt-oss's template.
HARMONY_TEMPLATE = (
    "<|start|>system<|message|>You are a tiny random test model.\nReasoning: medium\n\n"
    "# Valid channels: analysis, final. Channel must be included for every message.<|end|>"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' or message.role == 'developer' -%}"
    "<|start|>developer<|message|># Instructions\n\n{{ message.content }}<|end|>"
    "{%- elif message.role == 'assistant' -%}"
    "<|start|>assistant<|channel|>final<|message|>{{ message.content }}<|end|>"
    "{%- else -%}"
    "<|start|>{{ message.role }}<|message|>{{ message.content }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}")

# Shapes: small, but every kind of layer is there (GQA, 2 layers: one sliding-window, one global).
GPT_OSS_SHAPE = {"embedding": 32, "heads": 4, "kv_heads": 2, "head_dim": 16, "layers": 2, "experts": 4,
                 "experts_used": 2, "expert_ff": 64, "sliding_window": 8, "context": 131072,
                 "yarn_factor": 32.0, "yarn_original_context": 4096}


def borrowed_vocabulary(gguf_path: Path) -> dict:
    """The BPE vocabulary of `gguf_path` (tokens, types, merges, pre-tokenizer), as GGUFReader reads it."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    model = fields["tokenizer.ggml.model"].contents()
    if model != "gpt2":
        raise ValueError(f"{gguf_path.name} has a {model!r} tokenizer; a gpt2-style BPE one is needed")
    return {"tokens": fields["tokenizer.ggml.tokens"].contents(),
            "types": fields["tokenizer.ggml.token_type"].contents(),
            "merges": fields["tokenizer.ggml.merges"].contents(),
            "pre": fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else "default"}


def write_gpt_oss_gguf(path: Path, vocab_source: Path, seed: int = 0, chat_template: str = HARMONY_TEMPLATE) -> Path:
    """A random gpt-oss GGUF at `path` with `vocab_source`'s BPE vocabulary plus harmony's tokens: experts in
    MXFP4 (gguf's quants module packs them as llama.cpp's converter does for gpt-oss), the embedding and output
    in Q8_0 (they are most of the file: ~5 MB in all), the rest F32. Written in a few seconds."""
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType, TokenType, quants

    s = GPT_OSS_SHAPE
    rng = np.random.default_rng(seed)
    vocab = borrowed_vocabulary(vocab_source)
    tokens = list(vocab["tokens"]) + HARMONY_TOKENS
    types = list(vocab["types"]) + [int(TokenType.CONTROL)] * len(HARMONY_TOKENS)
    n_vocab, d, ff, n_exp = len(tokens), s["embedding"], s["expert_ff"], s["experts"]
    q_dim, kv_dim = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]

    def normal(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), "gpt-oss")
    writer.add_name("tiny-random-gpt-oss")
    writer.add_file_type(LlamaFileType.MOSTLY_MXFP4_MOE)
    writer.add_context_length(s["context"])
    writer.add_embedding_length(d)
    writer.add_block_count(s["layers"])
    writer.add_feed_forward_length(ff)
    writer.add_expert_feed_forward_length(ff)
    writer.add_expert_count(n_exp)
    writer.add_expert_used_count(s["experts_used"])
    writer.add_head_count(s["heads"])
    writer.add_head_count_kv(s["kv_heads"])
    writer.add_key_length(s["head_dim"])
    writer.add_value_length(s["head_dim"])
    writer.add_rope_dimension_count(s["head_dim"])
    writer.add_rope_freq_base(150000.0)
    writer.add_rope_scaling_type(RopeScalingType.YARN)
    writer.add_rope_scaling_factor(s["yarn_factor"])
    writer.add_rope_scaling_orig_ctx_len(s["yarn_original_context"])
    writer.add_sliding_window(s["sliding_window"])   # llama.cpp puts every second layer (0, 2, ...) on it
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(0)                       # the borrowed vocabulary's <|endoftext|>; never added
    writer.add_add_bos_token(False)
    writer.add_eos_token_id(tokens.index("<|return|>"))
    writer.add_pad_token_id(0)
    writer.add_chat_template(chat_template)

    def q8_0(array: np.ndarray) -> np.ndarray:
        return quants.quantize(array, GGMLQuantizationType.Q8_0)

    def mxfp4(array: np.ndarray) -> np.ndarray:
        return quants.quantize(array, GGMLQuantizationType.MXFP4)

    # numpy shapes are ggml's reversed: [n_vocab, d] is llama.cpp's {d, n_vocab}.
    writer.add_tensor("token_embd.weight", q8_0(normal(n_vocab, d, scale=1.0)),
                      raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    writer.add_tensor("output.weight", q8_0(normal(n_vocab, d)), raw_dtype=GGMLQuantizationType.Q8_0)
    for i in range(s["layers"]):
        block = f"blk.{i}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(d, dtype=np.float32))
        writer.add_tensor(f"{block}.post_attention_norm.weight", np.ones(d, dtype=np.float32))
        for name, rows in (("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)):
            writer.add_tensor(f"{block}.{name}.weight", normal(rows, d))
            writer.add_tensor(f"{block}.{name}.bias", normal(rows))
        writer.add_tensor(f"{block}.attn_output.weight", normal(d, q_dim))
        writer.add_tensor(f"{block}.attn_output.bias", normal(d))
        writer.add_tensor(f"{block}.attn_sinks.weight", normal(s["heads"], scale=1.0))
        writer.add_tensor(f"{block}.ffn_gate_inp.weight", normal(n_exp, d, scale=1.0))
        writer.add_tensor(f"{block}.ffn_gate_inp.bias", normal(n_exp))
        for name, shape in (("ffn_gate_exps", (n_exp, ff, d)), ("ffn_up_exps", (n_exp, ff, d)),
                            ("ffn_down_exps", (n_exp, d, ff))):
            writer.add_tensor(f"{block}.{name}.weight", mxfp4(normal(*shape)), raw_dtype=GGMLQuantizationType.MXFP4)
            writer.add_tensor(f"{block}.{name}.bias", normal(n_exp, shape[1]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
