"""Tool calling on the OpenAI API: the real `openai` client against a Hearth API server on the shared default
model (forced tools by constrained decoding, streamed and whole; a tool loop), raw HTTP for the refusals, and
the parser for the three call formats models emit (Hermes/Qwen, Llama 3.1, Mistral), whole and streamed."""
import json

import jsonschema
import openai
import pytest

from api.tools import ToolStream, parse_tool_calls, tool_request
from prompts.tool_prompt import hermes_messages
from api_fixtures import api, client, http  # noqa: F401

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


# ---- the parser ---------------------------------------------------------------------------------------------
HERMES = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' \
         '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
LLAMA = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; ' \
        '{"name": "get_time", "parameters": {"zone": "CET"}}'
MISTRAL = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, ' \
          '{"name": "get_time", "arguments": {"zone": "CET"}}]'
EXPECTED = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"zone": "CET"})]


@pytest.mark.parametrize("text, content", [(HERMES, "Let me check."), (LLAMA, None), (MISTRAL, None),
                                           (LLAMA.removeprefix("<|python_tag|>"), None)])
def test_the_three_call_formats_parse_whole(text, content):
    found_content, calls = parse_tool_calls(text)
    assert found_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == EXPECTED
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("text, content", [(HERMES, "Let me check.\n"), (LLAMA, ""), (MISTRAL, "")])
def test_the_three_call_formats_parse_streamed_in_small_pieces(text, content):
    stream = ToolStream(tool_request({"tools": [WEATHER, TIME]}))
    sent = "".join(stream.feed(text[i:i + 3]) for i in range(0, len(text), 3))
    rest, calls = stream.finish()
    assert sent + rest == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == EXPECTED


def test_text_that_is_no_call_stays_content_whole_and_streamed():
    for text in ("Paris is sunny today.", "<tool_call>\n{not json}\n</tool_call>", "{broken"):
        assert parse_tool_calls(text) == (text, [])
        stream = ToolStream(tool_request({"tools": [WEATHER]}))
        sent = "".join(stream.feed(ch) for ch in text)
        assert stream.finish() == (text[len(sent):], [])


def test_parallel_tool_calls_false_keeps_the_first_call_only():
    stream = ToolStream(tool_request({"tools": [WEATHER, TIME], "parallel_tool_calls": False}))
    stream.feed(HERMES)
    rest, calls = stream.finish()
    assert [c.name for c in calls] == ["get_weather"]


def test_a_tag_cut_by_the_tokenizer_is_not_sent_as_content():
    stream = ToolStream(tool_request({"tools": [TIME]}))
    assert stream.feed("Sure. <tool") == "Sure. "
    assert stream.feed("_call>\n") == ""
    stream.feed('{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>')
    rest, calls = stream.finish()
    assert rest == "" and [c.name for c in calls] == ["get_time"]


def test_the_tool_list_and_a_tool_loop_become_hermes_messages():
    tools = tool_request({"tools": [WEATHER]}).definitions()
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = hermes_messages([{"role": "system", "content": "Be brief."}, *ASK,
                                {"role": "assistant", "content": "", "tool_calls": [call]},
                                {"role": "tool", "content": "18 C"}, {"role": "tool", "content": "sunny"}], tools)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\n") and '"name": "get_weather"' in messages[0]["content"]
    assert json.loads(messages[2]["content"].removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")) == \
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
    assert messages[3]["content"] == "<tool_response>\n18 C\n</tool_response>\n<tool_response>\nsunny\n" \
                                     "</tool_response>"
    assert "<tools>" not in hermes_messages(ASK, tool_request({"tools": [WEATHER], "tool_choice": "none"})
                                            .definitions())[0]["content"]


# ---- over the API -------------------------------------------------------------------------------------------
def test_a_forced_named_tool_returns_a_call_whose_arguments_fit_the_schema(client):
    reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=ASK,
                                           tools=[WEATHER, TIME], max_tokens=80, temperature=0.8, seed=3,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_streams_a_call_as_deltas_id_and_name_then_arguments(client):
    stream = client.chat.completions.create(model=client.models.list().data[0].id, messages=ASK,
                                            tools=[TIME], tool_choice="required", max_tokens=60, stream=True,
                                            temperature=0)
    deltas, finish = [], None
    for chunk in stream:
        if chunk.choices:
            deltas.extend(chunk.choices[0].delta.tool_calls or [])
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_time"
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    arguments = json.loads("".join(d.function.arguments or "" for d in deltas))
    assert isinstance(arguments["zone"], str)


def test_a_tool_loop_is_accepted(client):
    model = client.models.list().data[0].id
    first = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=80, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "sunny"}'}]
    second = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER], max_tokens=24,
                                            temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_tool_choice_none_and_auto_answer_without_refusing(http):
    for choice in ("none", "auto"):
        reply = http.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "tool_choice": choice,
                                                        "max_tokens": 16, "temperature": 0})
        assert reply.status_code == 200, reply.text
        body = reply.json()["choices"][0]
        assert body["finish_reason"] in ("stop", "length", "tool_calls")
        if choice == "none":
            assert "tool_calls" not in body["message"]


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nowhere"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tool_choice": "required", "ban_eos_token": True}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0]"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_tool_requests_hearth_cannot_honour_are_400s_naming_the_field(http, extra, param):
    reply = http.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "max_tokens": 8, **extra})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
