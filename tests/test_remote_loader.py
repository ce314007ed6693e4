"""The remote (OpenAI-compatible endpoint) loader: one Hearth (an AppState here, as the UI uses it) chats
through a second Hearth's API running in another process."""
import time

import openai
import pytest

from api.server import ApiConfig, ApiServer
from conftest import DEFAULT_MODEL, free_port, make_state, start_app
from engine.generation import DoneEvent, TextEvent, collect
from loaders.base import LoadError
from loaders.remote_loader import RemoteLoader, wire_size
from prompts import chat_session

KEY = "remote-test-key"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, default_model_dir):
    """Hearth A: `app.py serve --api` in its own process, serving the default model."""
    models = tmp_path_factory.mktemp("upstream") / "models"
    models.mkdir()
    (models / DEFAULT_MODEL).symlink_to(default_model_dir, target_is_directory=True)
    api_port = free_port()
    app = start_app(["--models-dir", str(models), "--model", DEFAULT_MODEL, "--api", "--api-port", str(api_port),
                     "--api-key", KEY], models.parent / "upstream.log")
    yield f"http://127.0.0.1:{api_port}/v1"
    app.stop()


@pytest.fixture(scope="module")
def front(tmp_path_factory, upstream):
    """Hearth B: its own AppState (empty models folder) with the remote loader pointed at Hearth A."""
    models = tmp_path_factory.mktemp("front") / "models"
    models.mkdir()
    state = make_state(models)
    state.load_model("", "remote", {"base_url": upstream, "api_key": KEY})
    yield state
    state.unload_model()


def greedy(state, **kw):
    return state.generation_params(temperature=0.0, **kw)


def test_remote_loader_never_claims_a_local_folder(default_model_dir, models_dir):
    assert RemoteLoader().detect(default_model_dir) is None
    state = make_state(models_dir)
    assert [d.loader for d in state.detect(DEFAULT_MODEL)] == ["transformers"]
    assert "remote" in state.registry.names() and not state.needs_model_folder("remote")


def test_loading_reads_the_served_model_and_its_context(front, upstream):
    model = front.model
    assert model.name == DEFAULT_MODEL and model.loader == "remote"
    assert model.context_length == 8192 and upstream in model.runtime


def test_chat_streams_through_the_other_hearth(front):
    updates = list(chat_session.send(front, [], QUESTION, greedy(front, max_new_tokens=24)))
    history, status = updates[-1]
    assert history[-1] == {"role": "assistant", "content": "The capital of France is Paris."}
    assert status.done and status.error is None
    assert len(updates) > 3, "the reply must arrive piece by piece"


def test_raw_prompt_stop_string_and_continue(front):
    text, done, stats = collect(front.generate(front.raw_prompt("1, 2, 3,"), greedy(front, max_new_tokens=6)))
    assert text == " 4, 5," and done.reason == "max_tokens" and stats.new_tokens == 6
    text, done, _ = collect(front.generate(front.raw_prompt("1, 2, 3,"),
                                           greedy(front, max_new_tokens=12, stop=[" 6"])))
    assert text == " 4, 5," and done.reason == "stop_string" and done.stop_string == " 6"
    partial = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "The capital of France"}]
    text, done, _ = collect(front.generate(front.continue_prompt(partial), greedy(front, max_new_tokens=12)))
    assert text == " is Paris."


def test_stop_ends_the_remote_generation_and_frees_the_other_hearth(front):
    events = front.generate(front.raw_prompt("1, 2, 3,"), greedy(front, max_new_tokens=4000), key="remote-stop")
    assert isinstance(next(events), TextEvent)
    assert front.stop("remote-stop")
    rest = list(events)
    assert isinstance(rest[-1], DoneEvent) and rest[-1].reason == "cancelled"
    started = time.monotonic()
    text, _, _ = collect(front.generate(front.raw_prompt("1, 2, 3,"), greedy(front, max_new_tokens=6)))
    assert text == " 4, 5,"
    assert time.monotonic() - started < 60, "the upstream kept generating for the client that hung up"


def test_the_front_hearth_serves_the_remote_model_through_its_own_api(front):
    server = ApiServer(front, ApiConfig(port=free_port())).start()   # loopback, no key
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        chunks = client.chat.completions.create(model=DEFAULT_MODEL, temperature=0, max_tokens=24, stream=True,
                                                messages=[{"role": "user", "content": QUESTION}])
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "The capital of France is Paris."
    finally:
        server.stop()


def test_load_errors_say_what_is_wrong(upstream, models_dir):
    state = make_state(models_dir)
    with pytest.raises(LoadError, match="401.*incorrect API key"):
        state.load_model("", "remote", {"base_url": upstream, "api_key": "wrong"})
    with pytest.raises(LoadError, match=f"does not serve 'gpt-4'.*{DEFAULT_MODEL}"):
        state.load_model("", "remote", {"base_url": upstream, "api_key": KEY, "model": "gpt-4"})
    with pytest.raises(LoadError, match="cannot reach"):
        state.load_model("", "remote", {"base_url": f"http://127.0.0.1:{free_port()}/v1", "timeout": 2})
    with pytest.raises(LoadError, match="must start with http"):
        state.load_model("", "remote", {"base_url": "localhost:5000/v1"})
    assert state.model is None


def test_the_ui_of_another_hearth_loads_the_remote_model(upstream, tmp_path, models_dir):
    """Hearth B (a second `app.py serve` process) picks the remote loader on its Model tab, driven through its
    Gradio API, and then answers with the model that Hearth A serves (asked through B's own API)."""
    from gradio_client import Client

    front_api_port = free_port()
    front_ui = start_app(["--models-dir", str(models_dir), "--api", "--api-port", str(front_api_port)],
                         tmp_path / "front-ui.log")
    try:
        client = Client(front_ui.url, verbose=False)
        load = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/load_model"]
        by_label = {p["label"]: p["parameter_name"] for p in load["parameters"]}
        # The Model tab still asks for a model pick; the remote loader ignores it (it has no folder).
        status = client.predict(DEFAULT_MODEL, "remote", api_name="/load_model",
                                **{by_label["base url"]: upstream, by_label["api key"]: KEY})
        assert f"Loaded **{DEFAULT_MODEL}**" in status and f"remote ({upstream})" in status
        front_api = openai.OpenAI(base_url=f"http://127.0.0.1:{front_api_port}/v1", api_key="unused",
                                  max_retries=0, timeout=120)
        assert front_api.get("/internal/model/info", cast_to=dict)["loader"] == "remote"
        reply = front_api.chat.completions.create(model=DEFAULT_MODEL, temperature=0, max_tokens=24,
                                                  messages=[{"role": "user", "content": QUESTION}])
        assert reply.choices[0].message.content == "The capital of France is Paris."
    finally:
        front_ui.stop()


def test_a_base_url_without_v1_is_explained(upstream, models_dir):
    state = make_state(models_dir)
    with pytest.raises(LoadError, match="usually ends in /v1"):
        state.load_model("", "remote", {"base_url": upstream.removesuffix("/v1"), "api_key": KEY})


def server_count(upstream: str, messages: list[dict]) -> int:
    import httpx

    response = httpx.post(upstream + "/internal/token-count", json={"messages": messages},
                          headers={"Authorization": f"Bearer {KEY}"}, trust_env=False)
    response.raise_for_status()
    return response.json()["length"]


def test_prompt_length_is_the_servers_token_count_so_long_chats_keep_their_turns(front, upstream):
    assert "counted in bytes" not in front.model.runtime
    one = [{"role": "user", "content": QUESTION}]
    prompt = front.chat_prompt(one)
    assert prompt.ids is None and prompt.messages == tuple(one)   # the server gets the messages themselves
    assert prompt.n_tokens == server_count(upstream, one) < wire_size(prompt)
    # A history of ~12 000 bytes but ~3 000 tokens, with room for 4 096: counting bytes would drop turns.
    history = []
    for i in range(40):
        history += [{"role": "user", "content": f"Question {i}: tell me one fact about the number {i}."},
                    {"role": "assistant", "content": f"The number {i} is an integer, and it comes after {i - 1}."}]
    history.append({"role": "user", "content": QUESTION})
    budget_fill = front.model.context_length - 4096
    prompt = front.chat_prompt(history, max_new_tokens=budget_fill)
    assert wire_size(prompt) > 4096 >= prompt.n_tokens == server_count(upstream, history)
    assert prompt.dropped_turns == 0 and not prompt.notice


def test_without_a_server_count_the_prompt_length_is_its_byte_count():
    import httpx

    from engine.model import Prompt
    from loaders.remote_loader import RemoteModel

    def unreachable(prompt):
        raise httpx.ConnectError("the server went away")

    def model(counter):
        return RemoteModel(httpx.Client(), "http://127.0.0.1:9/v1", "m", 4096, True, counter)

    raw = Prompt(text="Grüße, 世界")   # a raw prompt: 15 bytes
    assert model(None).count_tokens(raw) == wire_size(raw) == 15
    assert "counted in bytes" in model(None).runtime
    assert model(unreachable).count_tokens(raw) == 15
    assert model(lambda prompt: 3).count_tokens(raw) == 3


def test_the_request_carries_the_messages_as_they_are(front):
    """No local template and no stop strings of its own: the server applies its template to the messages
    the user wrote (a Continue asks it to go on with the last one)."""
    from loaders.remote_loader import request_body

    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    prompt = front.chat_prompt(history)
    assert prompt.stop == () and not prompt.continue_final
    body = request_body(front.model.name, prompt, greedy(front), True)
    assert body["messages"] == history and "prompt" not in body and "continue_final_message" not in body
    partial = history + [{"role": "assistant", "content": "The capital"}]
    body = request_body(front.model.name, front.continue_prompt(partial), greedy(front), True)
    assert body["messages"] == partial and body["continue_final_message"] is True
    assert body["add_generation_prompt"] is False
    assert request_body(front.model.name, front.raw_prompt("1, 2,"), greedy(front), True)["prompt"] == "1, 2,"


def test_samplers_beyond_openais_are_sent_or_refused_by_name_never_dropped():
    """DRY, XTC, mirostat, ...: sent under text-generation-webui's names when extra_samplers is on; with it off a
    sampler set away from its default is refused naming it, never silently left out of the request."""
    from engine.model import Prompt
    from engine.sampling import GenerationParams
    from loaders.base import LoadError
    from loaders.remote_loader import request_body

    prompt = Prompt(text="", messages=({"role": "user", "content": "hi"},))
    params = GenerationParams(dry_multiplier=0.8, xtc_probability=0.5, xtc_threshold=0.2)
    body = request_body("m", prompt, params, True)
    assert (body["dry_multiplier"], body["xtc_probability"], body["xtc_threshold"]) == (0.8, 0.5, 0.2)
    assert "mirostat_mode" not in body          # left at its default: nothing to send
    with pytest.raises(LoadError, match="^dry_multiplier: this remote model's extra_samplers option is off"):
        request_body("m", prompt, params, False)
    plain = request_body("m", prompt, GenerationParams(), False)
    assert set(plain) >= {"temperature", "top_p", "messages"} and "dry_multiplier" not in plain
