"""The API through litellm's OpenAI-compatible provider (`openai/<model>` with api_base), the way litellm users
and the proxies built on it reach a local server, against a Hearth API server on the shared default model."""
import json
import os

import pytest

from api_fixtures import api  # noqa: F401
from conftest import DEFAULT_MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def litellm(api):
    # litellm fetches its model price list from the network at import unless told to use its bundled copy.
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import litellm
    return litellm


def ask(litellm, api, **kwargs):
    return litellm.completion(model=f"openai/{DEFAULT_MODEL}", api_base=api.url, api_key="unused", timeout=300,
                              num_retries=0, **kwargs)


def test_litellm_chats_whole_and_streamed(litellm, api):
    reply = ask(litellm, api, messages=QUESTION, temperature=0, max_tokens=24)
    assert reply.choices[0].message.content == "The capital of France is Paris."
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    pieces = [chunk.choices[0].delta.content or "" for chunk in
              ask(litellm, api, messages=QUESTION, temperature=0, max_tokens=24, stream=True) if chunk.choices]
    assert "".join(pieces) == "The capital of France is Paris."


def test_litellm_gets_a_forced_tool_call_and_schema_output(litellm, api):
    reply = ask(litellm, api, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                temperature=0, max_tokens=60)
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    reply = ask(litellm, api, messages=[{"role": "user", "content": "Name the capital of France as JSON."}],
                temperature=0.8, seed=1, max_tokens=60,
                response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}})
    assert set(json.loads(reply.choices[0].message.content)) == {"city"}
