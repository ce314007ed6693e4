"""Template variables (prompts.template_options): a chat template that takes `tools` renders the request's tool
list and the tool loop itself, one that takes `enable_thinking` gets the switch, and templates that take
neither keep the Hermes injection. The real default model's weights and tokenizer, loaded from a folder whose
tokenizer_config.json carries a Qwen2.5-style template written here; checked against transformers'
apply_chat_template, through AppState, and end to end with the openai client."""
from __future__ import annotations

import json

import openai
import pytest

from api.server import ApiConfig, ApiServer
from conftest import free_port, make_state
from prompts.chat import render_messages
from prompts.template_options import TemplateOptions, referenced_variables
from prompts.tool_prompt import hermes_messages

# Qwen2.5-Instruct's chat template (tools, tool calls, tool results), with Qwen3's enable_thinking switch.
QWEN_TOOLS = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""
TOOLS_MODEL = "SmolLM2-with-tools-template"

# A description with characters Jinja's own tojson would escape for HTML, and keys in a non-sorted order.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city (temperature < 50 & > -50)",
    "parameters": {"type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                                                    "city": {"type": "string"}},
                   "required": ["city", "unit"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
LOOP = [*ASK, {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
HERMES_PREAMBLE = "You are a function calling AI model."


@pytest.fixture(scope="module")
def tools_state(tmp_path_factory, default_model_dir):
    """An AppState with the default model's weights loaded from a folder whose own chat template takes tools."""
    models = tmp_path_factory.mktemp("tools") / "models"
    folder = models / TOOLS_MODEL
    folder.mkdir(parents=True)
    for path in default_model_dir.iterdir():
        if path.name != "tokenizer_config.json":
            (folder / path.name).symlink_to(path)
    config = json.loads((default_model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN_TOOLS}),
                                                  encoding="utf-8")
    state = make_state(models)
    state.load_model(TOOLS_MODEL)
    yield state
    state.unload_model()


def test_which_variables_a_template_takes_is_read_from_its_source():
    assert {"tools", "enable_thinking", "messages", "add_generation_prompt"} <= referenced_variables(QWEN_TOOLS)
    assert "tools" not in referenced_variables("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert referenced_variables("{% if %}") == frozenset()   # broken: rendering it reports the error


def test_a_tools_template_gets_the_tool_list_where_it_puts_it(tools_state):
    template = tools_state.loaded.template
    assert template.takes("tools") and template.takes("enable_thinking")
    text = tools_state.chat_prompt(ASK, options=TemplateOptions(tools=(WEATHER,))).text
    # The definition exactly as sent (key order kept, nothing escaped), inside the template's own <tools>.
    assert "# Tools\n\nYou may call one or more functions" in text
    assert f"<tools>\n{json.dumps(WEATHER)}\n</tools>" in text
    assert HERMES_PREAMBLE not in text
    assert "<tools>" not in tools_state.chat_prompt(ASK).text   # no tools offered: the template's plain branch


def test_a_tool_loop_renders_through_the_template_like_transformers(tools_state):
    prompt = tools_state.chat_prompt(LOOP, options=TemplateOptions(tools=(WEATHER,)))
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", ' \
           '"unit": "celsius"}}\n</tool_call><|im_end|>\n' in prompt.text
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 18}\n</tool_response>\n<tool_response>\nsunny\n' \
           '</tool_response><|im_end|>\n<|im_start|>assistant\n' in prompt.text
    # transformers renders a tool loop with arguments as objects (its documented form): the same text.
    loop = [*LOOP[:1], {**LOOP[1], "tool_calls": [{**CALL, "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]}, *LOOP[2:]]
    expected = tools_state.model.tokenizer.apply_chat_template(loop, tools=[WEATHER], chat_template=QWEN_TOOLS,
                                                               tokenize=False, add_generation_prompt=True)
    assert prompt.text == expected


def test_enable_thinking_reaches_a_template_that_branches_on_it(tools_state):
    off = tools_state.chat_prompt(ASK, options=TemplateOptions(enable_thinking=False)).text
    on = tools_state.chat_prompt(ASK, options=TemplateOptions(enable_thinking=True)).text
    default = tools_state.chat_prompt(ASK).text
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on == default and default.endswith("<|im_start|>assistant\n")
    cont = tools_state.continue_prompt([*ASK, {"role": "assistant", "content": "It is"}],
                                       options=TemplateOptions(enable_thinking=False)).text
    assert cont.endswith("<think>\n\n</think>\n\nIt is")


def test_a_template_without_tools_keeps_the_hermes_injection(loaded_state):
    template = loaded_state.loaded.template
    assert not template.takes("tools") and not template.takes("enable_thinking")
    text = loaded_state.chat_prompt(LOOP, options=TemplateOptions(tools=(WEATHER,), enable_thinking=False)).text
    assert HERMES_PREAMBLE in text and f"<tools>\n{json.dumps(WEATHER)}\n</tools>" in text
    assert "<|im_start|>user\n<tool_response>\n{\"temperature\": 18}\n</tool_response>\n<tool_response>\nsunny\n" \
           "</tool_response><|im_end|>" in text
    assert "<think>" not in text   # this template has no thinking switch: the text is as always


def test_a_model_whose_server_applies_the_template_gets_tools_in_its_messages_and_refuses_enable_thinking():
    def count(prompt):   # the server's count of the prompt stands in as its size in characters
        return len(prompt.text)

    prompt = render_messages(count, LOOP, template_name="server", template_source="server",
                             options=TemplateOptions(tools=(WEATHER,)))
    assert [m["role"] for m in prompt.messages] == ["system", "user", "assistant", "user"]
    assert HERMES_PREAMBLE in prompt.messages[0]["content"] and "get_weather" in prompt.messages[0]["content"]
    with pytest.raises(ValueError, match="^enable_thinking"):
        render_messages(count, ASK, template_name="server", template_source="server",
                        options=TemplateOptions(enable_thinking=False))


# ---- end to end, with the openai client ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tools_client(tools_state):
    server = ApiServer(tools_state, ApiConfig(port=free_port())).start()
    yield openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=300)
    server.stop()


def test_openai_client_tools_and_a_tool_loop_go_through_the_template(tools_client, tools_state):
    native = len(tools_state.chat_prompt(ASK, options=TemplateOptions(tools=(WEATHER,))).ids)
    hermes = len(tools_state.chat_prompt(hermes_messages(ASK, (WEATHER,))).ids)
    first = tools_client.chat.completions.create(model=TOOLS_MODEL, messages=ASK, tools=[WEATHER],
                                                 tool_choice="required", max_tokens=60, temperature=0)
    assert first.usage.prompt_tokens == native != hermes
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
    loop = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    second = tools_client.chat.completions.create(model=TOOLS_MODEL, messages=loop, tools=[WEATHER],
                                                  max_tokens=8, temperature=0)
    expected = tools_state.chat_prompt(loop, options=TemplateOptions(tools=(WEATHER,)))
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in expected.text
    assert second.usage.prompt_tokens == len(expected.ids)


def test_openai_client_enable_thinking_reaches_the_template(tools_client, tools_state):
    plain = len(tools_state.chat_prompt(ASK).ids)
    off = len(tools_state.chat_prompt(ASK, options=TemplateOptions(enable_thinking=False)).ids)
    assert off > plain
    reply = tools_client.chat.completions.create(model=TOOLS_MODEL, messages=ASK, max_tokens=4, temperature=0,
                                                 extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert reply.usage.prompt_tokens == off
    reply = tools_client.chat.completions.create(model=TOOLS_MODEL, messages=ASK, max_tokens=4, temperature=0,
                                                 extra_body={"enable_thinking": False})
    assert reply.usage.prompt_tokens == off
    with pytest.raises(openai.BadRequestError) as refused:
        tools_client.chat.completions.create(model=TOOLS_MODEL, messages=ASK, max_tokens=4,
                                             extra_body={"chat_template_kwargs": {"reasoning_effort": "low"}})
    assert refused.value.body["param"] == "chat_template_kwargs.reasoning_effort"


def test_a_reasoning_reply_comes_back_as_reasoning_content_whole_and_streamed(tools_client):
    """A reply inside a thinking block (here: the assistant message being continued opened `<think>`) comes back
    as `reasoning_content`, the field DeepSeek/vLLM/llama.cpp's server use, not as content; streamed as deltas
    that add up to the whole reply's."""
    opened = [*ASK, {"role": "assistant", "content": "<think>\n"}]
    body = {"continue_final_message": True, "add_generation_prompt": False}
    whole = tools_client.chat.completions.create(model=TOOLS_MODEL, messages=opened, max_tokens=8, temperature=0,
                                                 extra_body=body)
    message = whole.choices[0].message.model_dump()
    assert message["reasoning_content"] and "<think>" not in message["reasoning_content"]
    assert not message["content"]
    stream = tools_client.chat.completions.create(model=TOOLS_MODEL, messages=opened, max_tokens=8, temperature=0,
                                                  stream=True, extra_body=body)
    parts = [chunk.choices[0].delta.model_dump() for chunk in stream if chunk.choices]
    assert "".join(p.get("reasoning_content") or "" for p in parts) == message["reasoning_content"]
    assert not "".join(p.get("content") or "" for p in parts)
    # A reply without a block has no reasoning_content.
    plain = tools_client.chat.completions.create(model=TOOLS_MODEL, messages=ASK, max_tokens=4, temperature=0)
    assert plain.choices[0].message.content and "reasoning_content" not in plain.choices[0].message.model_dump()
