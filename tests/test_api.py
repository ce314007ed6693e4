"""The OpenAI-compatible API, driven by the real `openai` client against a real uvicorn server on the default
model (the server runs in this process over the shared `loaded_state`, so the model loads once)."""
import threading
import time

import httpx
import openai
import pytest

from api.server import ApiConfig, ApiServer
from conftest import DEFAULT_MODEL, free_port

KEY = "test-key-123"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
COUNTING = "1, 2, 3,"   # greedy, the default model counts on for hundreds of tokens


@pytest.fixture(scope="module")
def api(loaded_state):
    server = ApiServer(loaded_state, ApiConfig(port=free_port(), api_key=KEY)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api.url, api_key=KEY, max_retries=0, timeout=120)


def test_chat_completion_answers_the_golden_question(client):
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    assert reply.object == "chat.completion" and reply.model == DEFAULT_MODEL
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "The capital of France is Paris."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_has_openai_chunks_and_usage_last(client):
    chunks = list(client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, temperature=0,
                                                 max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text_chunks = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(text_chunks) > 1, "the reply must arrive in several pieces"
    assert "".join(text_chunks) == "The capital of France is Paris."
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream_and_whole_agree(client):
    whole = client.completions.create(model=DEFAULT_MODEL, prompt=COUNTING, temperature=0, max_tokens=6)
    assert whole.object == "text_completion"
    assert whole.choices[0].text == " 4, 5,"
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6
    chunks = list(client.completions.create(model=DEFAULT_MODEL, prompt=COUNTING, temperature=0, max_tokens=6,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_sequence_ends_the_completion_before_it(client):
    reply = client.completions.create(model=DEFAULT_MODEL, prompt=COUNTING, temperature=0, max_tokens=12,
                                      stop=[" 6"])
    assert reply.choices[0].text == " 4, 5,"
    assert reply.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client):
    def sample(seed):
        return client.completions.create(model=DEFAULT_MODEL, prompt="Once upon a time", temperature=1.5,
                                         top_p=1.0, max_tokens=6, seed=seed, extra_body={"top_k": 0}).choices[0].text
    first = sample(1234)
    assert first == sample(1234)
    assert any(sample(seed) != first for seed in (1, 2, 3)), "different seeds should sample differently"


def test_extra_sampler_fields_are_applied_and_bounded(client):
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=24,
                                           extra_body={"top_k": 1, "min_p": 0.5, "repetition_penalty": 1.0})
    assert reply.choices[0].message.content == "The capital of France is Paris."   # top_k=1 is greedy
    with pytest.raises(openai.BadRequestError, match="repetition_penalty must be at most 3") as err:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=4,
                                       extra_body={"repetition_penalty": 9.0})
    assert err.value.body["param"] == "repetition_penalty"   # the field's name, as the client sent it


def test_models_list_and_unknown_model_is_404(client):
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL]
    assert client.models.retrieve(DEFAULT_MODEL).context_length == 8192
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=4)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_bad_requests_are_400_in_openai_shape(api, client):
    raw = httpx.post(api.url + "/chat/completions", content=b"{not json", timeout=30,
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400
    error = raw.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_json" and error["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens must be a positive integer"):
        client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=-5)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=DEFAULT_MODEL, messages=[])
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=DEFAULT_MODEL, prompt="hello " * 9000, max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded" and "8192" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=DEFAULT_MODEL, prompt=COUNTING, max_tokens=8190)
    assert err.value.body["code"] == "context_length_exceeded" and err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="token ids must be between 0 and"):
        client.completions.create(model=DEFAULT_MODEL, prompt=[1, 2, 10_000_000], max_tokens=4)
    with pytest.raises(openai.BadRequestError) as err:   # refused by size, before it is tokenized
        client.completions.create(model=DEFAULT_MODEL, prompt="x" * 400_000, max_tokens=4)
    assert err.value.body["code"] == "request_too_large"


def test_missing_or_wrong_key_is_401(api):
    raw = httpx.get(api.url + "/models", timeout=30)
    assert raw.status_code == 401 and raw.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=api.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_eight_concurrent_streams_all_complete_correctly(client):
    prompts = ["1, 2, 3,", "a, b, c,"]
    expected = {p: client.completions.create(model=DEFAULT_MODEL, prompt=p, temperature=0, max_tokens=4)
                .choices[0].text for p in prompts}
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def stream(i):
        try:
            chunks = client.completions.create(model=DEFAULT_MODEL, prompt=prompts[i % 2], temperature=0,
                                               max_tokens=4, stream=True)
            results[i] = "".join(c.choices[0].text for c in chunks)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert results == {i: expected[prompts[i % 2]] for i in range(8)}


def test_client_disconnect_frees_the_model_for_the_next_request(client, loaded_state):
    long_run = client.completions.create(model=DEFAULT_MODEL, prompt=COUNTING, temperature=0, max_tokens=4000,
                                         stream=True)
    received = [next(long_run).choices[0].text for _ in range(3)]
    assert "".join(received).startswith(" 4")
    long_run.close()   # hang up mid-stream
    started = time.monotonic()
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    waited = time.monotonic() - started
    assert reply.choices[0].message.content == "The capital of France is Paris."
    # The abandoned run had ~4000 tokens left (minutes on this CPU); the next reply needs a few seconds.
    assert waited < 60, f"the next request waited {waited:.1f} s: the abandoned generation kept the model"


def test_token_count_and_model_info(client, loaded_state):
    count = client.post("/internal/token-count", cast_to=dict, body={"text": COUNTING})
    assert count["length"] == len(loaded_state.raw_prompt(COUNTING).ids) and count["context_length"] == 8192
    chat = client.post("/internal/token-count", cast_to=dict, body={"messages": QUESTION})
    assert chat["length"] == len(loaded_state.chat_prompt(QUESTION).ids)
    info = client.get("/internal/model/info", cast_to=dict)
    assert info["model_name"] == DEFAULT_MODEL and info["loader"] == "transformers"


def test_completion_from_token_ids_with_echo(client, loaded_state):
    ids = loaded_state.raw_prompt(COUNTING).ids
    reply = client.completions.create(model=DEFAULT_MODEL, prompt=ids, temperature=0, max_tokens=6, echo=True)
    assert reply.choices[0].text == COUNTING + " 4, 5,"
    assert reply.usage.prompt_tokens == len(ids)
