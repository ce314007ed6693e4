"""LoRA adapters: detection, Hearth's engine against transformers + peft (fp32 logits, CPU) on the default model
plain and GPTQ-quantized, weights, several adapters, removal, mismatches, the CLI, saved settings and the API.
Decode's Triton kernels (engine.lora_kernel) against torch's matmuls: on CPU under Triton's interpreter, in a
child process (tests/triton_interpreter.py says why), and compiled on a GPU. The GPU tests (the kernels
inside the captured decode graph equal eager decode and torch's matmuls) skip without CUDA."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from engine import lora as engine_lora
from engine import lora_kernel
from engine.runtime import Engine
from engine.weights import load_transformer
from loaders.lora import list_loras, parse_lora_arg, read_info, read_weights
from tests.conftest import DEFAULT_MODEL, REPO, make_state
from tests.quant_fixtures import quantize_model_dir, tiny_llama_dir
from tests.triton_interpreter import InterpreterChecks

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
    assert model.layers[0].attention.output_order is not None   # o_proj's A columns follow it
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


@pytest.fixture(scope="module")
def lora_state(loras, tmp_path_factory):
    """An AppState over models/ with the adapters, the default model loaded; plus an adapter for another model
    size (`lora-tiny`, hidden 64 against the default model's 576)."""
    tiny = tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "tiny")
    if not (loras / "lora-tiny").exists():
        write_lora(hf_model(tiny), loras / "lora-tiny", seed=3, base="tiny")
    state = make_state(loras)
    state.load_model(DEFAULT_MODEL)
    yield state
    state.unload_model()


def greedy(state) -> str:
    from engine.generation import collect

    prompt = state.raw_prompt("The capital of France is")
    text, done, _ = collect(iter(state.generate(prompt, state.generation_params(temperature=0, max_new_tokens=8))))
    assert done.reason in ("max_tokens", "stop"), done
    return text


def test_adapters_switch_without_reload_and_a_mismatched_one_leaves_the_model_serving(lora_state):
    from loaders.base import LoadError

    state = lora_state
    model = state.model
    base = greedy(state)
    # weight 8: strong enough to change the greedy words, not only the logits
    assert state.set_loras({"lora-a": 8.0, "lora-b": 8.0}) == {"lora-a": 8.0, "lora-b": 8.0}
    adapted = greedy(state)
    assert adapted != base and state.model is model          # applied to the same loaded model, no reload
    mismatch = r"LoRA lora-tiny: model.layers.0.* has A \[8, \d+\] .*but the loaded model.s layer takes \d+ inputs"
    with pytest.raises(LoadError, match=mismatch):
        state.set_loras({"lora-tiny": 1.0})
    assert state.applied_loras() == {"lora-a": 8.0, "lora-b": 8.0}   # unchanged, and still serving with them
    assert greedy(state) == adapted
    with pytest.raises(LoadError, match="no LoRA adapter named 'nope'"):
        state.set_loras({"nope": 1.0})
    state.set_loras({"lora-a": 0.0, "lora-b": 0.0})   # the same set at weight 0: in place, exactly the base
    assert greedy(state) == base
    assert state.set_loras({}) == {}
    assert greedy(state) == base


def test_saved_adapters_are_applied_again_at_load(lora_state):
    state = lora_state
    state.set_loras({"lora-b": 0.5}, save=True)
    assert state.settings_store.get(DEFAULT_MODEL)["loras"] == {"lora-b": 0.5}
    try:
        state.load_model(DEFAULT_MODEL)
        assert state.applied_loras() == {"lora-b": 0.5}
        # Saving the Model tab's settings keeps them (saved and applied)
        state.save_model_settings(DEFAULT_MODEL, {**state.settings_store.get(DEFAULT_MODEL), "preset": "Default"})
        assert state.applied_loras() == {"lora-b": 0.5}
        assert state.settings_store.get(DEFAULT_MODEL)["loras"] == {"lora-b": 0.5}
    finally:
        state.settings_store.delete(DEFAULT_MODEL)
        state.set_loras({})


def test_cli_generate_takes_lora_weights_and_refuses_a_mismatched_one(lora_state, loras):
    def run(*loras_args):
        args = [sys.executable, str(REPO / "app.py"), "generate", "--models-dir", str(loras), "--model",
                DEFAULT_MODEL, "--prompt", "The capital of France is", "--max-new-tokens", "4", "--temperature", "0"]
        for text in loras_args:
            args += ["--lora", text]
        return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=REPO)

    good = run("lora-a:0.5", "lora-b")
    assert good.returncode == 0, good.stderr
    assert "LoRA lora-a x0.5, lora-b x1" in good.stderr
    bad = run("lora-tiny")
    assert bad.returncode == 1 and "error: LoRA lora-tiny" in bad.stderr
    inspect = subprocess.run([sys.executable, str(REPO / "app.py"), "inspect", "--models-dir", str(loras), "--model",
                              DEFAULT_MODEL], capture_output=True, text=True, timeout=600, cwd=REPO)
    listed = {info["name"]: info["base_model"] for info in json.loads(inspect.stdout)["loras"]}
    assert listed == {"lora-a": DEFAULT_MODEL, "lora-b": DEFAULT_MODEL, "lora-tiny": "tiny"}


def test_parse_lora_arg():
    assert parse_lora_arg("my-lora") == ("my-lora", 1.0)
    assert parse_lora_arg("my-lora:0.25") == ("my-lora", 0.25)
    with pytest.raises(ValueError, match="finite"):
        parse_lora_arg("my-lora:nan")


def test_api_lora_load_and_unload_need_the_admin_key(lora_state):
    import httpx

    from api.server import ApiConfig, ApiServer
    from tests.conftest import free_port

    server = ApiServer(lora_state, ApiConfig(port=free_port(), api_key="user", admin_key="admin")).start()
    try:
        with httpx.Client(base_url=server.url.removesuffix("/v1"), timeout=600) as http:
            user, admin = {"Authorization": "Bearer user"}, {"Authorization": "Bearer admin"}
            body = {"lora_names": ["lora-a", "lora-b"], "lora_weights": [1.0, 0.5]}
            assert http.post("/v1/internal/lora/load", json=body, headers=user).status_code == 403
            listed = http.get("/v1/internal/lora/list", headers=user).json()
            assert listed["lora_names"] == ["lora-a", "lora-b", "lora-tiny"]
            r = http.post("/v1/internal/lora/load", json=body, headers=admin)
            assert r.status_code == 200, r.text
            assert r.json() == {"lora_names": ["lora-a", "lora-b"], "lora_weights": [1.0, 0.5]}
            assert http.get("/v1/internal/model/info", headers=user).json()["lora_names"] == ["lora-a", "lora-b"]
            bad = http.post("/v1/internal/lora/load", json={"lora_names": ["lora-tiny"]}, headers=admin)
            assert bad.status_code == 400 and "lora-tiny" in bad.json()["error"]["message"]
            assert http.post("/v1/internal/lora/unload", headers=user).status_code == 403
            assert http.post("/v1/internal/lora/unload", headers=admin).json() == {"lora_names": []}
            assert http.get("/v1/internal/model/info", headers=user).json()["lora_names"] == []
    finally:
        server.stop()
        lora_state.set_loras({})


def low_rank_inputs(rows: int, ranks: list[int], k: int, n: int, dtype, device="cpu", seed=0):
    """x [rows, k], y [rows, n] and adapters [(A [r, k], B [n, r])] of these ranks, values of order 1 out."""
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *shape, scale: (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)
    adapters = [(rnd(r, k, scale=k ** -0.5), rnd(n, r, scale=r ** -0.5)) for r in ranks]
    return rnd(rows, k, scale=1.0), rnd(rows, n, scale=1.0), adapters


def torch_low_rank(x, y, adapters) -> torch.Tensor:
    """What LoraLinear's torch path computes for these adapters stacked (A rows, B columns), in fp32: u = x @ A^T
    rounded to the dtype as its matmul rounds it, then y + u @ B^T."""
    a = torch.cat([a for a, _ in adapters])
    b = torch.cat([b for _, b in adapters], dim=1)
    u = (x.float() @ a.float().t()).to(x.dtype).float()
    return y.float() + u @ b.float().t()


def kernel_low_rank(x, y, adapters) -> torch.Tensor:
    """The same through engine.lora_kernel (the adapters stacked as engine.lora.apply stacks them)."""
    a = torch.cat([a for a, _ in adapters]).contiguous()
    b = torch.cat([b for _, b in adapters], dim=1).contiguous()
    return lora_kernel.add_delta(y, lora_kernel.low_rank_delta(x, a, b))


INTERPRETER_CHECKS = InterpreterChecks()
interpreter_check = INTERPRETER_CHECKS.check


@interpreter_check("rows1_rank16", rows=1, ranks=[16])
@interpreter_check("rows3_rank16", rows=3, ranks=[16])
@interpreter_check("rows8_rank16", rows=8, ranks=[16])
@interpreter_check("rows1_two_adapters_rank48", rows=1, ranks=[16, 32])
@interpreter_check("rows3_two_adapters_rank48", rows=3, ranks=[16, 32])
@interpreter_check("rows8_two_adapters_rank48", rows=8, ranks=[16, 32])
def kernels_equal_torch_matmuls(rows, ranks):
    """fp16 (the interpreter's tl.dot multiplies bf16's raw bits, Triton 3.7: bf16 is checked on the GPU),
    K = 1100 (three input splits, the last short), N = 300 (the last output block partly outside)."""
    x, y, adapters = low_rank_inputs(rows, ranks, 1100, 300, torch.float16, seed=rows)
    got = kernel_low_rank(x, y, adapters)
    want = torch_low_rank(x, y, adapters)
    assert got.shape == y.shape and got.dtype == torch.float16
    assert (want - y.float()).abs().max() > 0.5   # the adapters change the output clearly
    torch.testing.assert_close(got.float(), want, atol=4e-3, rtol=2e-3)   # fp16's rounding of the output


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """{check name: "ok" or its traceback} from one child running every check under the interpreter."""
    return INTERPRETER_CHECKS.run_child(__file__, tmp_path_factory.mktemp("lora-interpreter"), timeout=600)


@pytest.mark.parametrize("name", list(INTERPRETER_CHECKS.checks))
def test_lora_kernels_under_the_interpreter(interpreted, name):
    assert interpreted[name] == "ok", interpreted[name]


def test_lora_kernel_interpreter_really_interpreted(interpreted):
    INTERPRETER_CHECKS.assert_all_ran(interpreted)


def test_lora_kernels_take_decode_rows_on_cuda_only():
    """Prefill (more than 8 rows), CPU and fp32 keep torch's matmuls (the CPU tests compare them with peft)."""
    a = torch.zeros(16, 64, dtype=torch.bfloat16)
    assert not lora_kernel.usable(torch.zeros(1, 64, dtype=torch.bfloat16), a)   # CPU
    if torch.cuda.is_available():
        a = a.cuda()
        assert lora_kernel.usable(torch.zeros(1, 1, 64, dtype=torch.bfloat16, device="cuda"), a)
        assert lora_kernel.usable(torch.zeros(8, 1, 64, dtype=torch.bfloat16, device="cuda"), a)
        assert not lora_kernel.usable(torch.zeros(1, 9, 64, dtype=torch.bfloat16, device="cuda"), a)
        assert not lora_kernel.usable(torch.zeros(1, 64, device="cuda"), a.float())


@needs_cuda
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("ranks", [[16], [16, 32]])
def test_cuda_lora_kernels_equal_torch_matmuls_at_7b_shapes(rows, ranks):
    """bf16, compiled: w2's 11008 inputs (22 splits) and w13's 22016 outputs, within bf16's rounding."""
    x, y, adapters = low_rank_inputs(rows, ranks, 11008, 22016, torch.bfloat16, device="cuda", seed=rows)
    got = kernel_low_rank(x, y, adapters)
    want = torch_low_rank(x, y, adapters)
    assert (want - y.float()).abs().max() > 0.5
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=1e-2)


@needs_cuda
def test_cuda_graph_decode_with_a_lora_equals_eager(tmp_path):
    """A rank-16 adapter on every linear of a GPTQ act-order model: decode replayed from CUDA graphs (the Triton
    kernels, x @ A^T beside the base layer on a side stream) equals eager decode and, within bf16's rounding,
    the same graphs through torch's matmuls; a new weight is read by the graphs already captured (in place)."""
    from tests.test_engine import cuda_tiny_gptq

    model_dir = cuda_tiny_gptq(tmp_path)
    write_lora(hf_model(tmp_path / "fp"), tmp_path / "lora", seed=4, r=16, lora_alpha=32, base="fp")
    ids = torch.randint(0, 256, (40,)).tolist()
    outs = []
    for graphs, kernel in ((False, True), (True, True), (True, False)):
        model, _ = load_transformer(model_dir, [torch.device("cuda")], torch.bfloat16)
        weights = read_weights(read_info(tmp_path / "lora"))
        engine_lora.apply(model, [(weights, 1.0)])
        layers = [m for m in model.modules() if isinstance(m, engine_lora.LoraLinear)]
        for layer in layers:
            layer.kernel = kernel
        engine = Engine(model, 1024, use_graphs=graphs, prefill_chunk=128)
        with torch.no_grad():
            steps = [engine.prefill(ids[:30]).clone()]
            for pos in range(30, 36):
                steps.append(engine.decode(torch.tensor(ids[pos], device="cuda"), pos).clone())
            engine_lora.reweight(model, [(weights, 0.5)])
            for pos in range(36, 40):
                steps.append(engine.decode(torch.tensor(ids[pos], device="cuda"), pos).clone())
        outs.append(torch.stack(steps))
    eager, graphed, torch_path = outs
    torch.testing.assert_close(graphed, eager, atol=1e-3, rtol=1e-3)
    assert rel_err(graphed, torch_path) < 2e-2


@needs_cuda
def test_a_new_adapter_set_after_captured_graphs_captures_again_in_a_fresh_pool(tmp_path):
    """What loaders.lora_apply does when the adapters change after a chat: decode under graphs with one adapter,
    apply another (new module shapes), EngineModel.drop_graphs, decode again. Capturing into the pool of the freed
    graphs tripped the caching allocator's assert; the new graphs must compute the new adapter's logits."""
    from engine.runtime import EngineModel
    from tests.test_engine import cuda_tiny_gptq

    model_dir = cuda_tiny_gptq(tmp_path)
    fp = hf_model(tmp_path / "fp")
    write_lora(fp, tmp_path / "lora-a", seed=4, r=16, lora_alpha=32, base="fp")
    write_lora(fp, tmp_path / "lora-b", seed=5, r=8, lora_alpha=16, base="fp")
    ids = torch.randint(0, 256, (34,)).tolist()
    outs = []
    for graphs in (False, True):
        model, _ = load_transformer(model_dir, [torch.device("cuda")], torch.bfloat16)
        engine = Engine(model, 1024, use_graphs=graphs, prefill_chunk=128)
        loaded = EngineModel(model_dir, engine, None, [], 1024, "test", "")
        steps = []
        for name in ("lora-a", "lora-b"):
            engine_lora.apply(model, [(read_weights(read_info(tmp_path / name)), 1.0)])
            loaded.drop_graphs()
            with torch.no_grad():
                engine.prefill(ids[:30])
                for pos in range(30, 34):
                    steps.append(engine.decode(torch.tensor(ids[pos], device="cuda"), pos).clone())
        outs.append(torch.stack(steps))
    eager, graphed = outs
    torch.testing.assert_close(graphed, eager, atol=1e-3, rtol=1e-3)
    assert rel_err(eager[:4], eager[4:]) > 1e-3   # the second adapter changed the logits


def test_fit_problems_name_another_base_and_other_shapes(lora_state, loras):
    """What the Model tab warns with: nothing for an adapter made for the loaded model; another base model
    and the first layer whose shapes differ for one made for another model size."""
    from loaders.lora_apply import fit_problems

    model = lora_state.model
    assert fit_problems(read_info(loras / "lora-a"), model) == []
    assert fit_problems(read_info(loras / "lora-b"), model) == []
    problems = fit_problems(read_info(loras / "lora-tiny"), model)
    assert problems[0] == f"made for tiny, the loaded model is {DEFAULT_MODEL}"
    assert problems[1].startswith("shapes differ: model.layers.0.") and "in the adapter, " in problems[1]
    assert "576 in the model" in problems[1] or "576 → " in problems[1]
    assert fit_problems(read_info(loras / "lora-a"), None) == []


def test_transformers_model_with_adapters_through_loraset_equals_peft(loras, default_model_dir, tmp_path):
    """The transformers loader's model (fp32, CPU) takes adapters through LoraSet (peft inside transformers):
    its logits equal transformers+peft's; a new weight and removal are exact; an adapter for another model size
    is refused with the layer and shapes, the model unchanged."""
    from loaders.base import LoadError
    from loaders.lora_apply import LoraSet, fit_problems

    write_lora(hf_model(tiny_llama_dir(tmp_path / "tiny")), tmp_path / "lora-tiny", seed=3, base="tiny")
    state = make_state(loras)
    model = state.load_model(DEFAULT_MODEL, "transformers", {"dtype": "float32", "device": "cpu",
                                                            "runtime": "transformers"})
    try:
        def logits():
            with torch.no_grad():
                return model.hf_model(PROMPT[None]).logits[0].float()

        base = logits()
        assert fit_problems(read_info(loras / "lora-a"), model) == []
        loras_set = LoraSet(model)
        a, b = read_info(loras / "lora-a"), read_info(loras / "lora-b")
        loras_set.set([(a, 1.0)])
        one = logits()
        assert rel_err(one, base) > 0.02
        torch.testing.assert_close(one, peft_logits(hf_model(default_model_dir), [(loras / "lora-a", 1.0)]),
                                   atol=2e-4, rtol=1e-4)
        loras_set.set([(a, 0.5), (b, 1.5)])
        torch.testing.assert_close(logits(), peft_logits(hf_model(default_model_dir), [(loras / "lora-a", 0.5),
                                                                                      (loras / "lora-b", 1.5)]),
                                   atol=2e-4, rtol=1e-4)
        loras_set.set([(a, 1.0), (b, 0.0)])   # reweighted in place: lora-b at 0 is exactly absent
        assert torch.equal(logits(), one)
        loras_set.set([(a, 0.0), (b, 0.0)])
        assert torch.equal(logits(), base)
        loras_set.set([])
        assert loras_set.applied == {}
        assert torch.equal(logits(), base)
        with pytest.raises(LoadError, match=r"LoRA lora-tiny does not fit .*: shapes differ: model.layers.0.\S+ is "
                                            r"\d+ inputs → \d+ outputs in the adapter, \d+ → \d+ in the model"):
            loras_set.set([(read_info(tmp_path / "lora-tiny"), 1.0)])
        assert loras_set.applied == {} and torch.equal(logits(), base)
    finally:
        state.unload_model()


def peft_to_gguf(peft_dir, out, n_head: int, n_kv_head: int) -> None:
    """A GGUF LoRA adapter from a PEFT one, in the layout of llama.cpp's convert_lora_to_gguf.py: general.type
    "adapter", adapter.type "lora", adapter.lora.alpha; per adapted weight `blk.N.<name>.weight.lora_a` (A, [r, K])
    and `.lora_b` (B, [N, r]), B's rows of q and k in the interleaved-RoPE order the model converter gives
    those weights."""
    import numpy as np
    from gguf import GGUFWriter
    from safetensors.torch import load_file

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    config = json.loads((peft_dir / "adapter_config.json").read_text())

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:   # convert_hf_to_gguf.py's LlamaModel.permute
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = GGUFWriter(str(out), "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(config["lora_alpha"]))
    for key, a in sorted(load_file(str(peft_dir / "adapter_model.safetensors")).items()):
        if ".lora_A." not in key:
            continue
        b = load_file(str(peft_dir / "adapter_model.safetensors"))[key.replace(".lora_A.", ".lora_B.")]
        layer, module = re.fullmatch(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_A\.weight", key).groups()
        if module == "self_attn.q_proj":
            b = permute(b, n_head)
        elif module == "self_attn.k_proj":
            b = permute(b, n_kv_head)
        name = f"blk.{layer}.{names[module]}.weight"
        writer.add_tensor(f"{name}.lora_a", a.float().numpy().astype(np.float32))
        writer.add_tensor(f"{name}.lora_b", b.float().contiguous().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_llamacpp_model_takes_a_gguf_adapter_and_weight_0_or_removal_gives_the_base(loras, smollm2_q4_1,
                                                                                   default_model_dir, tmp_path):
    """A GGUF adapter written from the random PEFT one, on the default model's GGUF loaded by llama.cpp (over an
    F32 copy, so the products are plain float as transformers' are): it moves the logits as transformers+peft's
    adapter does; weight 0 and removal give the base logits back exactly; one for another size is refused with
    the layer and shapes."""
    pytest.importorskip("llama_cpp")
    from loaders.base import LoadError
    from loaders.llamacpp_install import state as build_state
    from loaders.lora_apply import LoraSet, fit_problems
    from tests.test_llamacpp import float_copy, last_logits

    if not build_state().ready:
        pytest.skip("llama-cpp-python is not built here")
    models = tmp_path / "models"
    (models / "smol-f32").mkdir(parents=True)
    float_copy(smollm2_q4_1, models / "smol-f32" / "smol.F32.gguf")
    config = json.loads((default_model_dir / "config.json").read_text())
    (models / "lora-gguf").mkdir()
    peft_to_gguf(loras / "lora-a", models / "lora-gguf" / "lora-a.gguf", config["num_attention_heads"],
                 config["num_key_value_heads"])
    (models / "lora-a").symlink_to(loras / "lora-a", target_is_directory=True)
    state = make_state(models)
    assert [info.name for info in state.list_loras()] == ["lora-a", "lora-gguf"]
    model = state.load_model("smol-f32", "llama.cpp")
    try:
        gguf_info, peft_info = state.lora_info("lora-gguf"), state.lora_info("lora-a")
        assert (gguf_info.kind, gguf_info.alpha) == ("gguf", 16.0)
        assert fit_problems(gguf_info, model) == []
        assert fit_problems(peft_info, model)[-1].startswith("a PEFT adapter: llama.cpp")
        ids = PROMPT.tolist()
        base = torch.from_numpy(last_logits(model, ids))
        loras_set = LoraSet(model)
        loras_set.set([(gguf_info, 1.0)])
        adapted = torch.from_numpy(last_logits(model, ids))
        assert rel_err(adapted, base) > 0.02
        # llama.cpp's F32 products are not bit-equal to torch's: the adapter's change must match peft's closely
        hf = hf_model(default_model_dir)
        with torch.no_grad():
            hf_base = hf(PROMPT[None]).logits[0, -1]
        ref = peft_logits(hf, [(loras / "lora-a", 1.0)])[-1]
        assert rel_err(adapted - base, ref - hf_base) < 0.05
        loras_set.set([(gguf_info, 0.0)])
        assert torch.equal(torch.from_numpy(last_logits(model, ids)), base)
        loras_set.set([])
        assert torch.equal(torch.from_numpy(last_logits(model, ids)), base)
        # An adapter for another model size: refused with the layer and shapes, the model unchanged
        from gguf import GGUFWriter

        (models / "lora-small").mkdir()
        writer = GGUFWriter(str(models / "lora-small" / "small.gguf"), "llama")
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", 8.0)
        writer.add_tensor("blk.0.attn_q.weight.lora_a", torch.randn(4, 64).numpy())
        writer.add_tensor("blk.0.attn_q.weight.lora_b", torch.randn(64, 4).numpy())
        for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file,
                      writer.close):
            write()
        small = state.lora_info("lora-small")
        assert fit_problems(small, model) == ["shapes differ: blk.0.attn_q.weight is 64 inputs → 64 outputs in the "
                                              "adapter, 576 → 576 in the model"]
        with pytest.raises(LoadError, match="LoRA lora-small does not fit smol-f32: shapes differ"):
            loras_set.set([(small, 1.0)])
        assert loras_set.applied == {} and torch.equal(torch.from_numpy(last_logits(model, ids)), base)
    finally:
        state.unload_model()


if __name__ == "__main__":   # the child of `interpreted`
    INTERPRETER_CHECKS.child_main()
