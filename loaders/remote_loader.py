"""The "OpenAI-compatible endpoint" loader: chat through a model that another server runs.

The server (vLLM, TGI, a llama.cpp server, another Hearth) owns the weights, the tokenizer and the chat
template, so this loader reads no local folder: it never claims one in `detect`, the user picks it on the
Model tab and gives it a base URL. Its Model declares `applies_chat_template` and no local token counting,
so the prompt it gets carries the messages themselves (engine.model.Prompt.messages): `generate` sends them
to `/v1/chat/completions` as they are (the server applies its own template), or a raw prompt's text to
`/v1/completions`, and turns the server's chunks into Hearth's generation events. How many tokens a prompt is
(for context checks and dropping old turns) the server says where it has a route for it (Hearth's
/v1/internal/token-count, vLLM's /tokenize); elsewhere the byte count stands in, an upper bound.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from engine.generation import DoneEvent, GenerationEvent, StatsEvent, TextEvent
from engine.model import Model, Prompt
from engine.sampling import GenerationParams
from loaders.base import Detection, LoadError, Progress, no_progress
from core.options import option, specs

FALLBACK_CONTEXT = 4096
# Samplers outside OpenAI's list that vLLM, llama.cpp's server and Hearth accept as extra request fields.
EXTRA_SAMPLERS = ("top_k", "min_p", "repetition_penalty")
# What request_body sends under OpenAI's own names.
OPENAI_FIELDS = ("max_new_tokens", "temperature", "top_p", "presence_penalty", "frequency_penalty", "stop", "seed")


@dataclass
class RemoteOptions:
    base_url: str = option("http://127.0.0.1:5000/v1", "The server's OpenAI API root, ending in /v1 (vLLM: "
                                                         "http://HOST:8000/v1, Hearth: http://HOST:5000/v1).")
    api_key: str = option("", "API key sent as 'Authorization: Bearer ...' (empty: none).")
    model: str = option("", "Model id on that server; empty = the first one its /v1/models lists.")
    context_length: int = option(0, "Context length in tokens; 0 = what the server reports (4096 if it "
                                    "reports none).", minimum=0, maximum=1048576, step=256)
    timeout: float = option(30.0, "Seconds to wait for the server to connect or to send the next piece.",
                            minimum=1.0, maximum=3600.0, step=1.0)
    extra_samplers: bool = option(True, "Also send top_k, min_p and repetition_penalty, and any other sampler "
                                        "set away from its default (DRY, XTC, mirostat, ...) under "
                                        "text-generation-webui's names; servers that reject unknown fields need "
                                        "this off, and then such a sampler is refused by name.")


def wire_messages(prompt: Prompt) -> list[dict] | None:
    """The prompt's messages as the request sends them (None for a raw prompt)."""
    return None if prompt.messages is None else [dict(m) for m in prompt.messages]


def wire_size(prompt: Prompt) -> int:
    """The request's prompt in bytes: what stands in for a token count no server gives (never fewer)."""
    messages = wire_messages(prompt)
    text = prompt.text if messages is None else json.dumps(messages, ensure_ascii=False)
    return len(text.encode("utf-8"))


def request_body(model: str, prompt: Prompt, params: GenerationParams, extra_samplers: bool) -> dict:
    body: dict[str, Any] = {
        "model": model, "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
        "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed >= 0:
        body["seed"] = params.seed
    if extra_samplers:
        body.update({name: getattr(params, name) for name in EXTRA_SAMPLERS})
    for spec in specs(GenerationParams):     # every other sampler is sent or refused, never silently dropped
        value = getattr(params, spec.name)
        if spec.name in OPENAI_FIELDS or spec.name in EXTRA_SAMPLERS or value == spec.default:
            continue
        if not extra_samplers:
            raise LoadError(f"{spec.name}: this remote model's extra_samplers option is off, so {spec.name} "
                            "cannot be sent; set it back to its default or turn extra_samplers on")
        body[spec.name] = value
    messages = wire_messages(prompt)
    if messages is not None:
        body["messages"] = messages
        if prompt.continue_final:  # vLLM and Hearth understand these two; others ignore them
            body.update(continue_final_message=True, add_generation_prompt=False)
    else:
        body["prompt"] = prompt.text
    return body


def sse_payloads(lines: Iterator[str]) -> Iterator[dict]:
    """The JSON objects of a server-sent-event stream, up to `data: [DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments (": ping"), event names
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def error_message(response: httpx.Response) -> str:
    """The server's own words from an OpenAI error body, else the status line."""
    try:
        response.read()
        err = response.json().get("error")
        if isinstance(err, dict) and err.get("message"):
            return f"{response.status_code}: {err['message']}"
        if isinstance(err, str):
            return f"{response.status_code}: {err}"
    except (ValueError, AttributeError, httpx.HTTPError):
        pass
    return f"{response.status_code} {response.reason_phrase}"


class RemoteModel(Model):
    """A model another server runs: it gets the messages, applies its own template and counts its own tokens."""
    counts_tokens_locally = False
    applies_chat_template = True

    def __init__(self, client: httpx.Client, base_url: str, model: str, context_length: int,
                 extra_samplers: bool, counter: Callable[[Prompt], int] | None = None):
        self.client = client
        self.base_url = base_url
        self.name = model
        self.loader = "remote"
        self.runtime = f"remote ({base_url})" + ("" if counter else ", prompt length counted in bytes")
        self.context_length = context_length
        self.extra_samplers = extra_samplers
        self.counter = counter
        # The same prompt is counted more than once while old turns are dropped to fit.
        self._counts: dict[str, int] = {}

    def count_tokens(self, prompt: Prompt) -> int:
        """The server's count of `prompt` where it can give one, else its size in bytes (an upper bound)."""
        key = json.dumps([wire_messages(prompt), prompt.text, prompt.continue_final], ensure_ascii=False)
        if key not in self._counts:
            count = None
            if self.counter is not None:
                try:
                    count = self.counter(prompt)
                except (httpx.HTTPError, ValueError, KeyError, TypeError):
                    count = None   # the server could not count this one: the byte count is still safe
            self._counts[key] = count if count is not None else wire_size(prompt)
        return self._counts[key]

    def generate(self, prompt: Prompt, params: GenerationParams,
                 cancel: threading.Event | None = None) -> Iterator[GenerationEvent]:
        t0 = time.perf_counter()
        route = "/chat/completions" if prompt.messages is not None else "/completions"
        parts: list[str] = []
        usage: dict = {}
        finish, stop_string, error, ttft, pieces = None, None, None, 0.0, 0
        watcher = None
        try:
            with self.client.stream("POST", self.base_url + route,
                                    json=request_body(self.name, prompt, params, self.extra_samplers)) as response:
                if response.status_code != 200:
                    raise LoadError(f"the server answered {error_message(response)}")
                # A server still busy with others sends nothing for a while: closing the response from a
                # watcher is what makes Stop immediate then (the read below ends with an error we expect).
                watcher = _close_on_cancel(response, cancel)
                for chunk in sse_payloads(response.iter_lines()):
                    if "error" in chunk:
                        raise LoadError(f"the server reported: {chunk['error'].get('message', chunk['error'])}")
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                        if piece:
                            if not parts:
                                ttft = time.perf_counter() - t0
                            parts.append(piece)
                            pieces += 1
                            yield TextEvent(piece)
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
                            if isinstance(choice.get("stop_reason"), str):
                                stop_string = choice["stop_reason"]
                    if cancel is not None and cancel.is_set():
                        break
        except (httpx.HTTPError, LoadError, ValueError) as exc:
            if cancel is None or not cancel.is_set():
                error = str(exc) if isinstance(exc, LoadError) else f"{type(exc).__name__}: {exc}"
        finally:
            if watcher is not None:
                watcher.done.set()
        if error is not None:
            reason = "error"
        elif cancel is not None and cancel.is_set() and finish is None:
            reason = "cancelled"
        elif finish == "length":
            reason = "max_tokens"
        else:
            reason = "stop_string" if stop_string else "eos"
        elapsed = time.perf_counter() - t0
        new_tokens = int(usage.get("completion_tokens") or pieces)
        yield StatsEvent(prompt_tokens=int(usage.get("prompt_tokens") or 0), new_tokens=new_tokens,
                         seconds=elapsed, time_to_first_token=ttft,
                         tokens_per_second=(new_tokens - 1) / (elapsed - ttft) if new_tokens > 1 and elapsed > ttft
                         else 0.0)
        yield DoneEvent(reason=reason, text="".join(parts), stop_string=stop_string, error=error,
                        seed=params.seed if params.seed >= 0 else None)

    def unload(self) -> None:
        self.client.close()


class _Watcher(threading.Thread):
    def __init__(self, response: httpx.Response, cancel: threading.Event):
        super().__init__(daemon=True, name="remote-cancel-watcher")
        self.response, self.cancel, self.done = response, cancel, threading.Event()

    def run(self) -> None:
        # AppState.generate sets `cancel` when a generation ends for any reason, so this thread always ends.
        while not self.done.is_set():
            if self.cancel.wait(0.05):
                if not self.done.is_set():
                    self.response.close()
                return


def _close_on_cancel(response: httpx.Response, cancel: threading.Event | None) -> _Watcher | None:
    if cancel is None:
        return None
    watcher = _Watcher(response, cancel)
    watcher.start()
    return watcher


def server_models(client: httpx.Client, base_url: str) -> list[dict] | None:
    """The server's /v1/models entries; None when it has no such route (some servers only serve completions)."""
    try:
        response = client.get(base_url + "/models")
    except httpx.HTTPError as exc:
        raise LoadError(f"cannot reach {base_url}: {type(exc).__name__}: {exc}") from None
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise LoadError(f"{base_url}/models answered {error_message(response)}")
    try:
        data = response.json().get("data")
    except (ValueError, AttributeError):
        data = None
    if not isinstance(data, list):
        raise LoadError(f"{base_url}/models did not return an OpenAI model list; is this the /v1 root?")
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def server_token_counter(client: httpx.Client, base_url: str, model: str) -> Callable[[Prompt], int] | None:
    """A function counting a prompt's tokens with the server's own tokenizer and template, from the first
    route that answers a probe: Hearth's /v1/internal/token-count ({"length"}), vLLM's /tokenize beside /v1
    ({"count"}); None when neither does (llama.cpp's and TGI's routes count text without the template)."""
    root = base_url.removesuffix("/v1")

    def what(prompt: Prompt, text_field: str) -> dict:
        messages = wire_messages(prompt)
        return {text_field: prompt.text} if messages is None else {"messages": messages}

    routes = [
        (base_url + "/internal/token-count", "length", lambda p: what(p, "text")),
        (root + "/tokenize", "count", lambda p: {"model": model, **what(p, "prompt")}),
    ]
    probe = Prompt(text="", messages=({"role": "user", "content": "Hello"},))
    for url, field, body in routes:
        try:
            response = client.post(url, json=body(probe))
            works = response.status_code == 200 and isinstance(response.json().get(field), int)
        except (httpx.HTTPError, ValueError, AttributeError):
            works = False
        if works:
            def count(prompt: Prompt, url=url, field=field, body=body) -> int:
                response = client.post(url, json=body(prompt))
                response.raise_for_status()
                return int(response.json()[field])
            return count
    return None


def reported_context(entry: dict) -> int | None:
    """vLLM says max_model_len, Hearth context_length, llama.cpp's server meta.n_ctx_train."""
    for value in (entry.get("max_model_len"), entry.get("context_length"),
                  (entry.get("meta") or {}).get("n_ctx_train")):
        if isinstance(value, int) and value > 0:
            return value
    return None


class RemoteLoader:
    name = "remote"
    description = ("OpenAI-compatible endpoint: chat through a model that vLLM, TGI, a llama.cpp server or "
                   "another Hearth serves. Needs no model folder: set base_url (and model) below.")
    options_type = RemoteOptions
    uses_model_folder = False   # AppState loads it from options alone

    def detect(self, model_dir: Path) -> Detection | None:
        return None   # a local folder is never a remote endpoint: this loader is only chosen by name

    def load(self, model_dir: Path | None, options: RemoteOptions, progress: Progress = no_progress) -> RemoteModel:
        base_url = options.base_url.strip().rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise LoadError(f"base_url must start with http:// or https:// (got {options.base_url!r})")
        headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        client = httpx.Client(headers=headers, timeout=httpx.Timeout(options.timeout), trust_env=False)
        try:
            progress(0.3, f"asking {base_url} for its models")
            models = server_models(client, base_url)
            wanted = options.model.strip()
            if models is None:
                if not wanted:
                    raise LoadError(f"{base_url}/models does not exist: check that base_url is the API root "
                                    "(it usually ends in /v1), or set the model option for a server without it")
                entry = {"id": wanted}   # trust the name; the first request will tell if it is wrong
            elif not wanted:
                if not models:
                    raise LoadError(f"{base_url} serves no model right now")
                entry = models[0]
            else:
                entry = next((m for m in models if m["id"] == wanted), None)
                if entry is None:
                    known = ", ".join(m["id"] for m in models) or "none"
                    raise LoadError(f"{base_url} does not serve {wanted!r} (it serves: {known})")
        except LoadError:
            client.close()
            raise
        context = options.context_length or reported_context(entry) or FALLBACK_CONTEXT
        progress(0.7, "asking whether the server counts tokens")
        counter = server_token_counter(client, base_url, entry["id"])
        progress(1.0, "ready")
        return RemoteModel(client, base_url, entry["id"], context, options.extra_samplers, counter)
