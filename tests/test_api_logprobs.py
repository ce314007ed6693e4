"""Token log-probabilities, logit_bias, n and suffix on the OpenAI API: the real `openai` client (and raw HTTP
where the client has no parameter) against a Hearth API server over the shared default model. Reported
probabilities are checked against a fresh forward pass of the loaded model over each prefix: the logits the
model computes, softmaxed here."""
import math

import httpx
import openai
import pytest
import torch

from api_fixtures import api, client  # noqa: F401
from conftest import DEFAULT_MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
COUNTING = "1, 2, 3,"


@pytest.fixture(scope="module")
def reference(loaded_state):
    """The loaded model's log-softmax rows, run afresh the way generation runs it: `ids[:start]` as the prompt,
    then one token at a time. Row i is the distribution for ids[start + i]. (The test uses the model between
    API requests, which run one at a time and have all finished.)"""
    from engine.runtime import EngineStepper

    def log_softmax(ids: list[int], start: int) -> torch.Tensor:
        stepper = EngineStepper(loaded_state.model.engine)
        with torch.inference_mode():
            rows = [stepper.start(ids[:start])]
            for token_id in ids[start:-1]:
                rows.append(stepper.step(torch.tensor(token_id)))
            return torch.stack([row.float().log_softmax(-1) for row in rows])
    return log_softmax


def test_chat_top_logprobs_match_a_softmax_of_the_models_logits(client, loaded_state, reference):
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, temperature=0, max_tokens=12,
                                           logprobs=True, top_logprobs=3)
    assert reply.choices[0].message.content == "The capital of France is Paris."
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    tokenizer = loaded_state.model.tokenizer
    prompt_ids = loaded_state.chat_prompt([dict(m) for m in QUESTION]).ids
    generated = tokenizer.encode(reply.choices[0].message.content, add_special_tokens=False)
    assert len(generated) == len(content)
    rows = reference(prompt_ids + generated, len(prompt_ids))
    for position, entry in enumerate(content):
        assert len(entry.top_logprobs) == 3
        expected = rows[position].topk(3)
        got_tokens = [alt.token for alt in entry.top_logprobs]
        assert got_tokens == [tokenizer.decode([i]) for i in expected.indices.tolist()]
        for alt, want in zip(entry.top_logprobs, expected.values.tolist()):
            assert abs(math.exp(alt.logprob) - math.exp(want)) < 1e-3, (position, alt.token)
        assert abs(math.exp(entry.logprob) - math.exp(rows[position][generated[position]].item())) < 1e-3
        assert entry.bytes == list(entry.token.encode("utf-8"))


def test_chat_logprobs_stream_with_the_text(client):
    chunks = list(client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, temperature=0,
                                                 max_tokens=12, logprobs=True, top_logprobs=2, stream=True))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is Paris."
    assert "".join(e.token for e in entries) == text
    assert all(len(e.top_logprobs) == 2 for e in entries)


def test_no_logprobs_unless_asked(client):
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, temperature=0, max_tokens=4)
    assert reply.choices[0].logprobs is None


def test_completion_logprobs_stream_and_whole_agree(client):
    whole = client.completions.create(model=DEFAULT_MODEL, prompt=COUNTING, temperature=0, max_tokens=6,
                                      logprobs=2)
    lp = whole.choices[0].logprobs
    assert "".join(lp.tokens) == whole.choices[0].text == " 4, 5,"
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == 6
    assert all(len(top) == 2 and max(top.values()) >= chosen - 1e-6
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    chunks = list(client.completions.create(model=DEFAULT_MODEL, prompt=COUNTING, temperature=0, max_tokens=6,
                                            logprobs=2, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for block in streamed for t in block.tokens] == lp.tokens
    assert [v for block in streamed for v in block.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert [o for block in streamed for o in block.text_offset] == lp.text_offset


def test_echo_with_max_tokens_0_scores_the_prompt(client, loaded_state, reference):
    reply = client.completions.create(model=DEFAULT_MODEL, prompt=COUNTING, max_tokens=0, echo=True, logprobs=1)
    choice = reply.choices[0]
    assert choice.text == COUNTING and reply.usage.completion_tokens == 0
    ids = loaded_state.raw_prompt(COUNTING).ids
    assert "".join(choice.logprobs.tokens) == COUNTING and len(choice.logprobs.tokens) == len(ids)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    rows = reference(ids, 1)
    for position in range(1, len(ids)):
        want = rows[position - 1][ids[position]].item()
        assert abs(math.exp(choice.logprobs.token_logprobs[position]) - math.exp(want)) < 1e-3


def test_echo_with_logprobs_streams_prompt_then_reply(client):
    chunks = list(client.completions.create(model=DEFAULT_MODEL, prompt=COUNTING, max_tokens=6, echo=True,
                                            logprobs=0, temperature=0, stream=True))
    assert chunks[0].choices[0].text == COUNTING
    assert chunks[0].choices[0].logprobs.token_logprobs[0] is None
    assert "".join(c.choices[0].text for c in chunks) == COUNTING + " 4, 5,"
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert "".join(tokens) == COUNTING + " 4, 5,"


def test_logit_bias_forces_and_bans_tokens(client, loaded_state):
    forced = loaded_state.model.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    reply = client.completions.create(model=DEFAULT_MODEL, prompt=COUNTING, temperature=0, max_tokens=3,
                                      logit_bias={str(forced): 100})
    assert reply.choices[0].text == " Paris" * 3
    first = loaded_state.model.tokenizer.encode(" 4", add_special_tokens=False)[0]
    banned = client.completions.create(model=DEFAULT_MODEL, prompt=COUNTING, temperature=0, max_tokens=3,
                                       logit_bias={str(first): -100})
    assert not banned.choices[0].text.startswith(" 4")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=DEFAULT_MODEL, prompt=COUNTING, max_tokens=3, logit_bias={"99999999": 1})
    assert err.value.body["param"] == "logit_bias"


def test_n_sampled_choices_one_after_another(client):
    def sample():
        return client.completions.create(model=DEFAULT_MODEL, prompt="Once upon a time", temperature=1.5,
                                         top_p=1.0, max_tokens=8, seed=7, n=3)
    reply = sample()
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.text for c in reply.choices]
    assert len(set(texts)) > 1, "each choice draws with its own seed"
    assert [c.text for c in sample().choices] == texts   # a fixed seed reproduces all of them
    assert reply.usage.completion_tokens == sum(
        client.completions.create(model=DEFAULT_MODEL, prompt="Once upon a time", temperature=1.5, top_p=1.0,
                                  max_tokens=8, seed=7 + i).usage.completion_tokens for i in range(3))
    chunks = list(client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, temperature=0,
                                                 max_tokens=12, n=2, stream=True))
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == index)
        assert text == "The capital of France is Paris."
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=2, n=9)
    assert err.value.body["param"] == "n"


def test_suffix_is_refused_by_name(api):
    reply = httpx.post(f"{api.url}/completions", json={"model": DEFAULT_MODEL, "prompt": "def f(", "suffix": ")",
                                                        "max_tokens": 4}, timeout=120)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "suffix"
    assert "fill-in-the-middle" in reply.json()["error"]["message"]
