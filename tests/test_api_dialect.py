"""text-generation-webui's API dialect, the way SillyTavern speaks it in its default mode, over raw HTTP (the
openai client cannot leave `model` out or send these fields as they are) against a Hearth API server on the
shared default model; and the queue's SSE comments while a stream waits its turn."""
import json
import threading
import time

import jsonschema
import pytest

from api_fixtures import api, client, http  # noqa: F401
from conftest import DEFAULT_MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
COUNTING = "1, 2, 3,"
# What SillyTavern sends besides the prompt in text-generation-webui mode: every sampler it knows, most off.
SILLYTAVERN_FIELDS = {
    "max_new_tokens": 8, "max_tokens": 8, "temperature": 0, "top_p": 1, "typical_p": 1, "min_p": 0, "top_k": -1,
    "repetition_penalty": 1, "repetition_penalty_range": 0, "presence_penalty": 0, "frequency_penalty": 0,
    "stopping_strings": ["\n"], "stop": ["\n"], "truncation_length": 8192, "ban_eos_token": False,
    "skip_special_tokens": True, "add_bos_token": True, "custom_token_bans": "", "temperature_last": True,
    "sampler_priority": ["temperature", "top_k", "top_p", "min_p"], "dry_multiplier": 0, "dry_base": 1.75,
    "dry_allowed_length": 2, "xtc_threshold": 0.1, "xtc_probability": 0, "mirostat_mode": 0, "mirostat_tau": 5,
    "mirostat_eta": 0.1, "dynamic_temperature": False, "dynatemp_low": 1, "dynatemp_high": 1,
    "smoothing_factor": 0, "smoothing_curve": 1, "top_n_sigma": 0, "tfs": 1, "top_a": 0, "epsilon_cutoff": 0,
    "eta_cutoff": 0, "guidance_scale": 1, "negative_prompt": "", "penalty_alpha": 0, "num_beams": 1,
    "length_penalty": 1, "min_length": 0, "encoder_repetition_penalty": 1, "no_repeat_ngram_size": 0,
    "early_stopping": False, "grammar_string": "", "json_schema": {}, "seed": -1, "n": 1,
}




@pytest.fixture(scope="module")
def tokenizer(loaded_state):
    return loaded_state.model.tokenizer


def sse_events(lines) -> tuple[list[dict], list[str]]:
    """(data payloads, comment lines) of an SSE stream's lines, up to [DONE]."""
    data, comments = [], []
    for line in lines:
        if line.startswith(":"):
            comments.append(line)
        elif line.startswith("data: ") and line != "data: [DONE]":
            data.append(json.loads(line[len("data: "):]))
    return data, comments


def test_a_sillytavern_request_without_model_streams(http):
    with http.stream("POST", "/v1/completions", json={"prompt": COUNTING, "stream": True,
                                                      **SILLYTAVERN_FIELDS}) as reply:
        assert reply.status_code == 200, reply.read()
        lines = list(reply.iter_lines())
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
    data, _ = sse_events(lines)
    assert data[0]["model"] == DEFAULT_MODEL
    assert "".join(chunk["choices"][0]["text"] for chunk in data).strip()
    assert data[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    chat = http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 24, "temperature": 0})
    assert chat.status_code == 200, chat.text
    assert chat.json()["model"] == DEFAULT_MODEL
    assert chat.json()["choices"][0]["message"]["content"] == "The capital of France is Paris."


def test_internal_encode_and_decode_round_trip_and_agree_with_token_count(http):
    text = "The capital of France is Paris."
    encoded = http.post("/v1/internal/encode", json={"text": text}).json()
    assert encoded["length"] == len(encoded["tokens"]) > 0
    assert encoded["length"] == http.post("/v1/internal/token-count", json={"text": text}).json()["length"]
    assert http.post("/v1/internal/decode", json={"tokens": encoded["tokens"]}).json() == {"text": text}
    assert http.post("/v1/internal/encode", json={"text": ""}).json() == {"tokens": [], "length": 0}
    bad = http.post("/v1/internal/decode", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_internal_logits_are_the_next_token_distribution(http):
    logits = http.post("/v1/internal/logits", json={"prompt": COUNTING, "top_logits": 5})
    assert logits.status_code == 200, logits.text
    probabilities = logits.json()["logits"]
    assert len(probabilities) == 5
    values = list(probabilities.values())
    assert values == sorted(values, reverse=True) and 0 < sum(values) <= 1 + 1e-6
    greedy = http.post("/v1/completions", json={"prompt": COUNTING, "max_tokens": 1, "temperature": 0}).json()
    assert next(iter(probabilities)) == greedy["choices"][0]["text"]
    refused = http.post("/v1/internal/logits", json={"prompt": COUNTING, "use_samplers": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "use_samplers"


def test_stopping_strings_and_max_new_tokens_are_honoured(http):
    stopped = http.post("/v1/completions", json={"prompt": COUNTING, "max_new_tokens": 12, "temperature": 0,
                                                 "stopping_strings": [" 6"]}).json()
    assert stopped["choices"][0]["text"] == " 4, 5,"
    assert stopped["choices"][0]["finish_reason"] == "stop"
    short = http.post("/v1/completions", json={"prompt": COUNTING, "max_new_tokens": 3, "temperature": 0}).json()
    assert short["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("field", ["ban_eos_token", "ignore_eos"])
def test_banning_eos_runs_the_reply_to_max_tokens(http, field):
    body = {"messages": QUESTION, "max_tokens": 24, "temperature": 0}
    plain = http.post("/v1/chat/completions", json=body).json()
    assert plain["choices"][0]["finish_reason"] == "stop" and plain["usage"]["completion_tokens"] < 24
    banned = http.post("/v1/chat/completions", json={**body, field: True}).json()
    assert banned["choices"][0]["finish_reason"] == "length" and banned["usage"]["completion_tokens"] == 24


def test_custom_token_bans_keep_tokens_out(http, tokenizer):
    first = tokenizer.encode(" 4", add_special_tokens=False)[0]
    body = {"prompt": COUNTING, "max_tokens": 3, "temperature": 0}
    assert http.post("/v1/completions", json=body).json()["choices"][0]["text"].startswith(" 4")
    banned = http.post("/v1/completions", json={**body, "custom_token_bans": f"{first}, 1"}).json()
    assert not banned["choices"][0]["text"].startswith(" 4")
    bad = http.post("/v1/completions", json={**body, "custom_token_bans": "12, x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "custom_token_bans"


def test_truncation_length_keeps_the_end_of_the_prompt(http):
    long_prompt = ", ".join(str(i) for i in range(1, 60)) + ","
    full = http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 4, "temperature": 0}).json()
    assert full["usage"]["prompt_tokens"] > 40
    cut = http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 4, "temperature": 0,
                                             "truncation_length": 40}).json()
    assert cut["usage"]["prompt_tokens"] == 36
    assert cut["choices"][0]["text"] == full["choices"][0]["text"]
    assert cut["choices"][0]["text"].startswith(" 60")


def test_add_bos_token_adds_or_leaves_out_the_bos(http, tokenizer):
    body = {"prompt": COUNTING, "max_tokens": 1, "temperature": 0}
    plain = http.post("/v1/completions", json=body).json()["usage"]["prompt_tokens"]
    assert tokenizer.bos_token_id is not None
    with_bos = http.post("/v1/completions", json={**body, "add_bos_token": True}).json()["usage"]["prompt_tokens"]
    without = http.post("/v1/completions", json={**body, "add_bos_token": False}).json()["usage"]["prompt_tokens"]
    assert (with_bos, without) == (plain + 1, plain)   # this tokenizer adds no BOS by itself


def test_skip_special_tokens_leaves_them_out_of_the_text(http, tokenizer):
    special = tokenizer.bos_token_id   # forced with logit_bias, so the reply is that special token twice
    body = {"prompt": COUNTING, "max_tokens": 2, "temperature": 0, "logit_bias": {str(special): 100}}
    shown = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert shown == tokenizer.bos_token * 2
    assert http.post("/v1/completions", json={**body, "skip_special_tokens": True}).json()["choices"][0]["text"] == ""


def test_off_spellings_and_low_repetition_penalty_are_accepted(http):
    body = {"prompt": COUNTING, "max_tokens": 3}
    for extra in ({"top_k": -1}, {"repetition_penalty": 1.0}, {"repetition_penalty": 0.9}, {"top_k": 0}):
        reply = http.post("/v1/completions", json={**body, **extra})
        assert reply.status_code == 200, (extra, reply.text)
    refused = http.post("/v1/completions", json={**body, "top_k": -2})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "top_k" and refused.json()["error"]["message"].startswith("top_k")


@pytest.mark.parametrize("field,value", [
    ("tfs", 0.9), ("top_a", 0.2),
    ("functions", [{"name": "f", "parameters": {"type": "object"}}]),   # the legacy form of tools
])
def test_known_fields_hearth_cannot_honour_are_400s_naming_them(http, field, value):
    reply = http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2, field: value})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == field
    assert reply.json()["error"]["code"] == "unsupported_parameter"


def test_unknown_fields_are_ignored(http):
    reply = http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2, "frobnicate": 7})
    assert reply.status_code == 200, reply.text


def _read_stream(http, path: str, body: dict, lines: list, started: threading.Event) -> None:
    with http.stream("POST", path, json={**body, "stream": True}) as reply:
        for line in reply.iter_lines():
            lines.append(line)
            if line.startswith("data: "):
                started.set()


def wait_for(condition, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_waiting_stream_says_it_is_queued_and_stop_generation_ends_the_running_one(http):
    first_lines, second_lines = [], []
    first_started, second_started = threading.Event(), threading.Event()
    # The first reply cannot end by itself for a long time: EOS is banned and the budget is thousands.
    first = threading.Thread(target=_read_stream, args=(http, "/v1/completions", {
        "prompt": COUNTING, "max_tokens": 4000, "temperature": 0, "ban_eos_token": True}, first_lines,
        first_started))
    first.start()
    assert first_started.wait(240)
    second = threading.Thread(target=_read_stream, args=(http, "/v1/chat/completions", {
        "messages": QUESTION, "max_tokens": 24, "temperature": 0}, second_lines, second_started))
    second.start()
    # The scheduler reports the wait once; the comment repeats every few seconds while the stream waits.
    wait_for(lambda: sum(line.startswith(": queued") for line in second_lines) >= 2)
    assert http.post("/v1/internal/stop-generation", json={}).json() == "OK"
    first.join(240)
    second.join(240)
    assert not first.is_alive() and not second.is_alive()
    data, _ = sse_events(first_lines)
    assert data[-1]["choices"][0]["finish_reason"] == "stop"   # stopped, not run to its 4000 tokens
    data, comments = sse_events(second_lines)
    assert comments and set(comments) == {": queued, 1 ahead"}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in data) == "The capital of France is Paris."
    assert second_lines[-1] == "data: [DONE]" or "data: [DONE]" in second_lines


# ---- structured output (llguidance) ----------------------------------------------------------------------
CITY_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "population", "capital"],
               "properties": {"city": {"type": "string", "maxLength": 40},
                              "population": {"type": "integer", "minimum": 0},
                              "capital": {"type": "boolean"}}}


def test_json_schema_output_validates_in_10_of_10_sampled_runs(client):
    messages = [{"role": "user", "content": "Describe Paris as JSON with city, population and capital."}]
    for seed in range(10):
        reply = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=messages, temperature=1.0, top_p=1.0, max_tokens=200, seed=seed,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}})
        text = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop", (seed, text)
        jsonschema.validate(json.loads(text), CITY_SCHEMA)


def test_json_object_output_parses_as_an_object(client):
    # As OpenAI asks, the prompt says JSON too (without it a small model may write an object past max_tokens).
    messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, temperature=0, max_tokens=200,
                                           response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_grammar_string_constrains_a_streamed_completion(http):
    with http.stream("POST", "/v1/completions", json={
            "prompt": "Is Paris the capital of France? Answer:", "max_tokens": 10, "temperature": 1.0, "stream": True,
            "grammar_string": 'root ::= " " ("yes" | "no") "."'}) as reply:
        data, _ = sse_events(list(reply.iter_lines()))
    assert "".join(c["choices"][0]["text"] for c in data) in (" yes.", " no.")
    bad = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "grammar_string": "root ::= ("})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "grammar_string"
    schema = http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2,
                                                     "response_format": {"type": "json_schema"}})
    assert schema.status_code == 400 and schema.json()["error"]["param"] == "response_format"


def test_temperature_last_truncates_before_the_temperature():
    """SillyTavern sends temperature_last: min_p then judges the raw distribution, not the flattened one."""
    import torch
    from engine.sampling import GenerationParams, Sampler, TokenControls
    logits, history = torch.tensor([0.0, -1.0, -3.0]), torch.tensor([], dtype=torch.long)
    common = dict(temperature=3.0, min_p=0.2, top_k=0, top_p=1.0, seed=5)

    def draws(params) -> set[int]:
        sampler = Sampler(params)
        return {int(sampler(logits, history)) for _ in range(300)}
    assert draws(GenerationParams(**common)) == {0, 1, 2}   # at temperature 3 min_p keeps all three
    assert draws(TokenControls(**common, temperature_last=True)) == {0, 1}   # exp(-3) < 0.2 of the top


def test_do_sample_false_is_greedy(http):
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.5, "top_p": 1.0, "top_k": 0}
    greedy = http.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    for seed in (1, 2, 3):
        reply = http.post("/v1/completions", json={**body, "seed": seed, "do_sample": False}).json()
        assert reply["choices"][0]["text"] == greedy
