"""The sampler inside the decode step (engine/graph_sampling.py) against the shared one (engine/sampling.py): the
same probabilities after every transform, draws that follow them, shapes that never depend on the data, the
parameter sets it leaves to the shared sampler, and its wiring into the engine's step (CPU, eagerly; the
captured CUDA graph on a GPU). Its Triton kernels (engine/sampling_kernel.py) against its torch ops: the same
candidates, probabilities, chosen ids and history/counts for the same noise, under Triton's interpreter on CPU
and compiled on a GPU."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.generation import collect
from engine import sampling_kernel
from engine.graph_sampling import CANDIDATES, MAX_BOUND, GraphSampler, Plan, unsupported
from engine.model import Prompt
from engine.runtime import Engine, EngineModel, EngineStepper
from engine.sampling import GenerationParams, TokenControls, apply_penalties, truncate
from engine.weights import load_transformer
from tests.quant_fixtures import tiny_llama_dir, write_word_tokenizer
from tests.triton_interpreter import InterpreterChecks

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def params(**kw) -> GenerationParams:
    """Every sampler off unless named."""
    return GenerationParams(**{"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0, **kw})


# Each transform alone, then the mixes people use (the chat sampler, min_p presets, OpenAI-style top_p only),
# then everything at once; windows shorter than, longer than and equal to "all" of the history.
PARAMETER_SETS = [
    params(repetition_penalty=1.3),
    params(repetition_penalty=0.8, repetition_penalty_range=0),
    params(presence_penalty=0.7, repetition_penalty_range=16),
    params(frequency_penalty=-0.4, repetition_penalty_range=5000),
    params(temperature=0.35),
    params(top_k=1),
    params(top_k=40),
    params(top_k=1000),
    params(top_p=0.5),
    params(top_p=0.95, temperature=1.7),
    params(typical_p=0.6),
    params(min_p=0.05),
    params(min_p=0.3, temperature=2.5),
    params(temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.15),
    params(temperature=1.0, min_p=0.05, repetition_penalty=1.05, repetition_penalty_range=64),
    params(temperature=0.9, top_p=0.8, presence_penalty=0.5, frequency_penalty=0.3),
    params(temperature=0.8, top_k=200, top_p=0.97, typical_p=0.9, min_p=0.02, repetition_penalty=1.2,
           presence_penalty=0.2, frequency_penalty=0.1, repetition_penalty_range=40),
]


def shared_probs(logits: torch.Tensor, history: torch.Tensor, p: GenerationParams) -> torch.Tensor:
    """The shared sampler's distribution: its own functions, in Sampler.__call__'s order."""
    return truncate(apply_penalties(logits.float(), history, p) / p.temperature, p).softmax(-1)


def graph_probs(sampler: GraphSampler, logits: torch.Tensor, plan: Plan) -> torch.Tensor:
    probs, ids = sampler.distribution(logits, plan)
    return probs if ids is None else torch.zeros(sampler.vocab).scatter(0, ids, probs)


def random_case(seed: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=g) * (1 + 4 * torch.rand((), generator=g))
    # Short histories with repeats: only a few hundred ids in a vocabulary of thousands keeps them repeating.
    history = torch.randint(0, min(vocab, 300), (int(torch.randint(0, 200, (), generator=g)),), generator=g)
    return logits, history


@pytest.mark.parametrize("vocab", [700, 5000])   # below the candidate cap (a full sort) and above it
def test_probabilities_after_every_transform_equal_the_shared_samplers(vocab):
    sampler = GraphSampler(vocab, 4096, CPU)
    for i, p in enumerate(PARAMETER_SETS):
        assert unsupported(p) is None
        plan = Plan.of(p, vocab)
        for case in range(12):
            logits, history = random_case(1000 * i + case, vocab)
            sampler.start(p, plan, history, seed=0)
            ref = shared_probs(logits, history, p)
            got = graph_probs(sampler, logits, plan)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=lambda m: f"{p}: {m}")
            assert (got > 0).sum() == (ref > 0).sum()   # the same tokens kept, not just close masses


def test_the_counts_follow_the_history_as_tokens_are_appended():
    # The penalty window slides as picks append ids (counts updated in place, the leaving id subtracted): at
    # every step the distribution equals the shared sampler's over the whole history so far.
    vocab = 300
    for p in (params(repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.5,
                     repetition_penalty_range=7, temperature=0.8, top_k=50),
              params(repetition_penalty=1.2, repetition_penalty_range=0, top_p=0.9)):
        plan = Plan.of(p, vocab)
        sampler = GraphSampler(vocab, 512, CPU)
        logits, history = random_case(7, vocab)
        history = history[:5]
        sampler.start(p, plan, history, seed=3)
        for step in range(60):
            logits = torch.randn(vocab, generator=torch.Generator().manual_seed(step)) * 2
            torch.testing.assert_close(graph_probs(sampler, logits, plan), shared_probs(logits, history, p),
                                       atol=1e-5, rtol=0)
            sampler.before_pick(plan)
            token = sampler.pick(logits, plan)
            history = torch.cat([history, token.view(1)])


def test_greedy_takes_the_argmax_of_the_penalised_logits():
    vocab = 2000
    sampler = GraphSampler(vocab, 1024, CPU)
    for p in (params(temperature=0.0), params(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.8),
              params(temperature=0.0, mirostat_mode=2, xtc_probability=0.5)):   # greedy never reaches these
        assert unsupported(p) is None
        plan = Plan.of(p, vocab)
        assert plan.greedy
        for case in range(20):
            logits, history = random_case(case, vocab)
            sampler.start(p, plan, history, seed=0)
            sampler.before_pick(plan)
            ref = apply_penalties(logits, history, p).argmax()
            assert int(sampler.pick(logits, plan)) == int(ref)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of `counts` against `probs` and its degrees of freedom (cells with p > 0)."""
    kept = probs > 0
    expected = probs[kept] * counts.sum()
    return float(((counts[kept] - expected) ** 2 / expected).sum()), int(kept.sum()) - 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])   # CPU: torch ops; CUDA: kernels
def test_seeded_draws_follow_the_distribution_and_repeat_with_the_seed(device):
    vocab, draws = 2000, 8000
    logits = (torch.randn(vocab, generator=torch.Generator().manual_seed(11)) * 3).to(device)
    p = params(temperature=0.7, top_p=0.9, top_k=20, min_p=0.02)
    plan = Plan.of(p, vocab)
    sampler = GraphSampler(vocab, 16, torch.device(device))
    assert sampler.kernels == (device == "cuda") and plan.bound
    empty = torch.tensor([], dtype=torch.long, device=device)
    sampler.start(p, plan, empty, seed=1234)

    def draw(n: int) -> torch.Tensor:
        ids = []
        for _ in range(n):
            sampler.before_pick(plan)
            ids.append(sampler.pick(logits, plan))
        return torch.stack(ids)

    ids = draw(draws)
    counts = torch.bincount(ids, minlength=vocab).double()
    probs = shared_probs(logits, empty, p).double()
    stat, df = chi_square(counts, probs)
    assert df >= 3 and not counts[probs == 0].any()
    # Far in the tail for a right sampler (mean df, sd sqrt(2 df)), far below what a wrong one gives: the same
    # draws against the distribution without the temperature fail it.
    limit = df + 8 * math.sqrt(2 * df) + 10
    assert stat < limit, (stat, df)
    hot = shared_probs(logits, empty, params(top_p=0.9, top_k=20, min_p=0.02))
    assert chi_square(counts, hot.double())[0] > 10 * limit
    sampler.start(p, plan, empty, seed=1234)
    assert torch.equal(draw(200), ids[:200])          # the seed decides the ids
    sampler.start(p, plan, empty, seed=1235)
    assert not torch.equal(draw(200), ids[:200])


class OpTrace(TorchDispatchMode):
    """Every aten op run inside it, with the shapes of its outputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((str(func), tuple(tuple(t.shape) for t in flat if isinstance(t, torch.Tensor))))
        return out


def test_the_step_never_changes_shape_with_the_data_and_never_reads_back():
    # The same ops with the same shapes whatever the logits and history (ties, -inf, a peaked or a flat row,
    # no history or a long one), and none that reads a value back, sizes a result by the data or copies a host
    # value in (lift_fresh: `t[i] = v`, a copy a CUDA graph cannot hold).
    vocab = 4000
    banned = ("unique", "nonzero", "masked_select", "bincount", "_local_scalar_dense", "item", "lift_fresh")
    rows = [torch.randn(vocab) * 3, torch.zeros(vocab), torch.full((vocab,), -1.0).index_fill(0, torch.arange(5),
                                                                                            9.0),
            torch.randn(vocab).masked_fill(torch.rand(vocab) < 0.9, float("-inf")), torch.randn(vocab).round()]
    histories = [torch.tensor([], dtype=torch.long), torch.randint(0, vocab, (900,)), torch.full((30,), 7)]
    for p in PARAMETER_SETS + [params(temperature=0.0, repetition_penalty=1.3)]:
        plan = Plan.of(p, vocab)
        sampler = GraphSampler(vocab, 2048, CPU)
        traces = set()
        for logits in rows:
            for history in histories:
                sampler.start(p, plan, history, seed=5)
                sampler.before_pick(plan)
                with OpTrace() as trace:
                    sampler.pick(logits, plan)
                assert not [op for op, _ in trace.ops if any(b in op for b in banned)], trace.ops
                traces.add(tuple(trace.ops))
        assert len(traces) == 1, p


def test_parameter_sets_it_cannot_express_keep_the_shared_sampler():
    chat = dict(temperature=0.7, top_p=0.9, top_k=20)
    assert {unsupported(params(**chat, dry_multiplier=0.8)), unsupported(params(temperature=0, dry_multiplier=0.8))} \
        == {"DRY"}
    assert unsupported(params(**chat, xtc_probability=0.5)) == "XTC"
    assert unsupported(params(**chat, mirostat_mode=2)) == "mirostat"
    assert unsupported(params(**chat, top_n_sigma=1.0)) == "top_n_sigma"
    assert unsupported(params(**chat, dynamic_temperature=True)) == "dynamic_temperature"
    assert unsupported(params(**chat, smoothing_factor=0.3)) == "smoothing_factor"
    assert unsupported(TokenControls(**chat, grammar='start: "a"')) == "a grammar"
    assert unsupported(TokenControls(**chat, logprobs=2)) == "logprobs"
    assert unsupported(TokenControls(**chat, logit_bias={5: -100.0})) == "logit_bias"
    assert unsupported(TokenControls(**chat, ban_eos=True)) == "logit_bias"
    assert unsupported(TokenControls(**chat, temperature_last=True)) == "temperature_last"
    # What the API sends for a plain request, and the samplers' own "off" values, stay in the step.
    assert unsupported(TokenControls(**chat, skip_special_tokens=True)) is None
    assert unsupported(params(**chat, top_n_sigma=-1.0, mirostat_mode=0)) is None


def test_the_candidate_cap_is_used_only_when_top_k_bounds_the_kept_tokens():
    vocab = 32000
    assert Plan.of(params(top_k=20, top_p=0.9), vocab).candidates == CANDIDATES
    assert Plan.of(params(top_k=1000), vocab).candidates == CANDIDATES
    assert Plan.of(params(top_p=0.9), vocab).candidates == vocab      # no top_k: a full sort
    assert Plan.of(params(min_p=0.1), vocab).candidates == 0          # nothing needs an order
    assert Plan.of(params(top_k=50, top_p=0.9), 600).candidates == 600


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return write_word_tokenizer(tiny_llama_dir(tmp_path_factory.mktemp("tiny"), vocab_size=128), 128)


def engine_model(model_dir, sample_in_step: bool) -> EngineModel:
    from transformers import AutoTokenizer

    model, _ = load_transformer(model_dir, [CPU], torch.float32)
    engine = Engine(model, 256, use_graphs=False, prefill_chunk=16, sample_in_step=sample_in_step)
    return EngineModel(model_dir, engine, AutoTokenizer.from_pretrained(model_dir), [], 256, "test", "test")


def generate(model: EngineModel, p: GenerationParams) -> tuple[str, int | None]:
    ids = torch.randint(3, 128, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    text, done, _ = collect(model.generate(Prompt(text="", ids=ids), p))
    assert done.error is None and done.reason == "max_tokens", done
    return text, done.seed


def test_the_engine_samples_in_its_step_and_chooses_the_shared_sampler_in_one_place(tiny_model_dir):
    # The step's wiring run eagerly on CPU (the same ops the CUDA graph captures): greedy text with penalties
    # equals the shared sampler's; a seed repeats a sampled reply; DRY falls back to the shared sampler.
    in_step, shared = engine_model(tiny_model_dir, True), engine_model(tiny_model_dir, False)
    greedy = params(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.2, repetition_penalty_range=8,
                    max_new_tokens=30)
    assert generate(in_step, greedy)[0] == generate(shared, greedy)[0]
    assert in_step.engine.sampler.picks == 30 and shared.engine.sampler is None
    chat = params(temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.15, max_new_tokens=30, seed=42)
    text, seed = generate(in_step, chat)
    assert seed == 42 and len(text.split()) == 30
    assert generate(in_step, chat)[0] == text
    assert generate(in_step, params(**{**vars(chat), "seed": 43}))[0] != text
    assert EngineStepper(in_step.engine).sampling(params(dry_multiplier=0.8)) is None
    in_step.engine.sampler.picks = 0
    generate(in_step, params(temperature=0.7, dry_multiplier=0.8, max_new_tokens=5))
    assert in_step.engine.sampler.picks == 0   # the shared sampler took it


@needs_cuda
def test_sampling_inside_the_captured_step_gives_the_eager_ids(tmp_path):
    # One engine under CUDA graphs: the sampler captured inside the decode step against the same sampler run
    # eagerly on the logits of the step's plain graph, same seed; the prompt crosses the first cache bucket,
    # so two picking graphs are captured and replayed.
    model_dir = write_word_tokenizer(tiny_llama_dir(tmp_path / "m", vocab_size=2048, hidden=128, intermediate=256),
                                     2048)
    model, _ = load_transformer(model_dir, [torch.device("cuda")], torch.bfloat16)
    engine = Engine(model, 1024, use_graphs=True, prefill_chunk=128)
    prompt = torch.randint(3, 2048, (240,), generator=torch.Generator().manual_seed(0)).tolist()
    history = torch.tensor(prompt, device="cuda")
    for p in (params(temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.15),
              params(temperature=1.0, min_p=0.05, presence_penalty=0.5), params(temperature=0.9, top_p=0.8),
              params(temperature=0.0, repetition_penalty=1.3)):
        plan = engine.sampling_plan(p)
        runs = []
        for in_graph in (True, False):
            with torch.no_grad():
                logits = engine.prefill(prompt)
                engine.sampler.start(p, plan, history, seed=7)
                token = engine.pick(logits, plan)
                ids = [int(token)]
                for pos in range(len(prompt), len(prompt) + 30):
                    if in_graph:
                        token = engine.decode_and_pick(pos, plan)
                    else:
                        logits = engine.decode(token.clone(), pos)
                        engine.sampler.before_pick(plan)
                        token = engine.sampler.pick(logits, plan)
                    ids.append(int(token))
            runs.append(ids)
        assert runs[0] == runs[1], p
        assert {(256, plan), (512, plan)} <= set(engine.graphs)


def test_the_kernels_bound_follows_top_k_and_other_plans_keep_the_torch_ops():
    vocab = 32000
    assert Plan.of(params(temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.15), vocab).bound == 64
    assert Plan.of(params(top_k=1), vocab).bound == 32
    assert Plan.of(params(top_k=16), vocab).bound == 32
    assert Plan.of(params(top_k=MAX_BOUND // 2, typical_p=0.9), vocab).bound == MAX_BOUND
    assert Plan.of(params(top_k=MAX_BOUND // 2 + 1), vocab).bound == 0      # past the kernels' list: torch
    assert Plan.of(params(top_k=20), 40).bound == 0                         # a list longer than the vocabulary
    assert Plan.of(params(top_p=0.9), vocab).bound == 0                     # no top_k: the whole vocabulary
    assert Plan.of(params(min_p=0.05), vocab).bound == 0
    assert Plan.of(params(temperature=0.0, repetition_penalty=1.3), vocab).bound == 1
    assert Plan.of(params(temperature=0.0), vocab).bound == 0               # plain argmax: one torch kernel


def test_a_plan_without_a_bound_keeps_the_torch_ops_where_kernels_are_on():
    # Kernels on, on a CPU without the interpreter: a plan the kernels do not take must never reach them (they
    # would fail on CPU tensors), and picks what the torch ops pick.
    vocab = 3000
    p = params(top_k=400, top_p=0.9, repetition_penalty=1.2)
    plan = Plan.of(p, vocab)
    assert plan.bound == 0
    on, off = GraphSampler(vocab, 512, CPU, kernels=True), GraphSampler(vocab, 512, CPU, kernels=False)
    logits, history = random_case(3, vocab)
    for sampler in (on, off):
        sampler.start(p, plan, history, seed=9)
    for _ in range(5):
        on.before_pick(plan)
        off.before_pick(plan)
        assert int(on.pick(logits, plan)) == int(off.pick(logits, plan))


# The kernels against the torch ops. Each case: parameters, vocabulary, and the logits rows of its steps.
KERNEL_PARAMETERS = {
    "chat": params(temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.15),
    "chat_short_window": params(temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.15,
                                repetition_penalty_range=3, presence_penalty=0.4, frequency_penalty=0.3),
    "everything": params(temperature=0.8, top_k=100, top_p=0.97, typical_p=0.9, min_p=0.02,
                         repetition_penalty=1.2, presence_penalty=0.2, frequency_penalty=0.1,
                         repetition_penalty_range=40),
    "top_k_1": params(top_k=1),
    "top_k_20": params(top_k=20),
    "top_k_min_p": params(temperature=1.3, top_k=40, min_p=0.05),
    "greedy_penalties": params(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5,
                               repetition_penalty_range=6),
}


def kernel_rows(kind: str, vocab: int, steps: int, seed: int, device="cpu") -> list[torch.Tensor]:
    """Logits rows: random; ties (30 tokens share one value, ranks 15 to 44 with the 20th among them, spread over
    every block; two ids share the max); -inf (most of the row, and a row with fewer finite values than top_k)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for step in range(steps):
        x = torch.randn(vocab, generator=g) * 3
        if kind == "ties":
            x = x / 6   # below 3: no ties among the rest (clamping would tie hundreds with the k-th at top_k 100)
            spread = torch.randperm(vocab, generator=g)
            x[spread[:12]] = 6.0 + torch.arange(12.0) / 8   # 12 distinct larger values, the first 12 kept
            x[spread[12:42]] = 5.0                          # 30 ties with the 20th largest
            x[spread[42:44]] = 9.0                          # two ids share the max (greedy: the smaller)
        elif kind == "neg_inf":
            x = x.masked_fill(torch.rand(vocab, generator=g) < (0.9 if step % 2 else 0.9995), float("-inf"))
        rows.append(x.to(device))
    return rows


def check_kernels_equal_torch_ops(case: str, vocab: int, kind: str = "random", steps: int = 3, device="cpu",
                                  block: int | None = None) -> None:
    """Two samplers with one history and seed, one by the torch ops and one by the kernels: at every step the
    same candidate probabilities (scattered over the vocabulary), the same chosen id, history, counts and noise
    row."""
    name = case
    p = KERNEL_PARAMETERS[case]
    device = torch.device(device)
    plan = Plan.of(p, vocab)
    assert plan.bound, plan
    torch_ops, kernels = GraphSampler(vocab, 256, device, kernels=False), GraphSampler(vocab, 256, device,
                                                                                      kernels=True)
    history = torch.randint(0, min(vocab, 60), (40,), generator=torch.Generator().manual_seed(vocab)).to(device)
    for sampler in (torch_ops, kernels):
        sampler.start(p, plan, history, seed=vocab)
    for step, logits in enumerate(kernel_rows(kind, vocab, steps, seed=steps * vocab, device=device)):
        torch_ops.before_pick(plan)
        kernels.before_pick(plan)
        if plan.greedy:
            got = sampling_kernel.pick(logits, kernels, plan, block=block)
        else:
            ref, ref_ids = torch_ops.distribution(logits, plan)
            ref = torch.zeros(vocab, device=device).scatter(0, ref_ids, ref)
            probs = torch.empty(plan.bound, device=device)
            ids = torch.empty(plan.bound, dtype=torch.long, device=device)
            got = sampling_kernel.pick(logits, kernels, plan, block=block, distribution=(probs, ids))
            mine = torch.zeros(vocab, device=device).scatter(0, ids, probs)
            torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0, msg=lambda m: f"{name} step {step}: {m}")
            assert torch.equal(mine > 0, ref > 0), f"{name} step {step}: other tokens kept"
            if kind == "ties" and name == "top_k_20":
                assert int((ref > 0).sum()) == 44   # the 14 larger values and all 30 ties with the 20th largest
        want = torch_ops.pick(logits, plan)
        assert int(got) == int(want), (name, step)
        for mine, theirs in zip(kernels.state(), torch_ops.state()):
            assert torch.equal(mine, theirs), (name, step)


KERNEL_CHECKS = InterpreterChecks()
# Under the interpreter a program's sort costs seconds (~3.5 minutes for these on a 2-core machine with a 32000
# case and more steps): 5000 ids (three blocks, the last partial) for every case, two or three steps (the
# 40-id history already fills the short window, which slides from the first step on); the GPU test below runs
# 32000, 151936 and 262144 for all.
KERNEL_CASES = [("chat", 5000, "random", 2), ("chat_short_window", 5000, "random", 3),
                ("everything", 5000, "random", 2), ("top_k_1", 5000, "random", 2),
                ("top_k_min_p", 5000, "random", 2), ("greedy_penalties", 5000, "random", 8),
                ("chat", 5000, "ties", 2), ("top_k_20", 5000, "ties", 2), ("greedy_penalties", 5000, "ties", 2),
                ("chat", 5000, "neg_inf", 2), ("everything", 5000, "neg_inf", 2)]
for _name, _vocab, _kind, _steps in KERNEL_CASES:
    KERNEL_CHECKS.check(f"{_name}_{_vocab}_{_kind}", case=_name, vocab=_vocab, kind=_kind,
                        steps=_steps)(check_kernels_equal_torch_ops)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """{check name: "ok" or its traceback} from one child running every kernel check under the interpreter."""
    return KERNEL_CHECKS.run_child(__file__, tmp_path_factory.mktemp("sampling-interpreter"), timeout=1800)


@pytest.mark.parametrize("name", list(KERNEL_CHECKS.checks))
def test_sampling_kernels_under_the_interpreter_equal_the_torch_ops(interpreted, name):
    assert interpreted[name] == "ok", interpreted[name]


def test_sampling_kernel_interpreter_really_interpreted(interpreted):
    KERNEL_CHECKS.assert_all_ran(interpreted)


@needs_cuda
@pytest.mark.parametrize("vocab", [32000, 151936, 262144])
# Not "everything" on ties: its top_p cuts inside the tied group, and which tied tokens stay there depends on
# the sort's order among equal values, which torch leaves open (the shared sampler's as much as the ops').
@pytest.mark.parametrize("name,kind", [(name, kind) for name in KERNEL_PARAMETERS
                                       for kind in ("random", "ties", "neg_inf")
                                       if (name, kind) != ("everything", "ties")])
def test_cuda_sampling_kernels_equal_the_torch_ops(name, vocab, kind):
    check_kernels_equal_torch_ops(name, vocab, kind, steps=12, device="cuda")


@needs_cuda
@pytest.mark.parametrize("name", ["chat", "everything", "greedy_penalties"])
def test_cuda_sampling_kernels_replayed_in_a_graph_pick_the_eager_ids(name):
    # The two launches captured in a CUDA graph (temporary buffers from the graph's pool), replayed step after
    # step, against the same sampler run eagerly with the same seed.
    vocab = 151936
    p = KERNEL_PARAMETERS[name]
    plan = Plan.of(p, vocab)
    rows = kernel_rows("random", vocab, 20, seed=1, device="cuda")
    history = torch.randint(0, 60, (40,), device="cuda")
    chosen = []
    for in_graph in (True, False):
        sampler = GraphSampler(vocab, 256, torch.device("cuda"))
        sampler.start(p, plan, history, seed=4)
        logits = torch.empty(vocab, device="cuda")
        if in_graph:
            kept = [t.clone() for t in sampler.state()]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                sampler.pick(logits, plan)   # compiles the kernels outside the capture
            torch.cuda.current_stream().wait_stream(side)
            for t, copy in zip(sampler.state(), kept):
                t.copy_(copy)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = sampler.pick(logits, plan)
        ids = []
        for row in rows:
            logits.copy_(row)
            sampler.before_pick(plan)
            if in_graph:
                graph.replay()
                ids.append(int(out))
            else:
                ids.append(int(sampler.pick(logits, plan)))
        chosen.append(ids)
    assert chosen[0] == chosen[1]


if __name__ == "__main__":
    KERNEL_CHECKS.child_main()
