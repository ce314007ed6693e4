"""One request's generation: its RunHandle read in a worker thread, by the HTTP handler as an async stream.

The model's decode loop is blocking, so the handle is read in its own thread (waiting its turn in the app's
generation line); events cross to the event loop through an asyncio queue. When the client goes away, the
run is abandoned: the handle's cancel flag is checked by the decode loop after every token, so the model is
free for the next request within one token.
"""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from fastapi import Request

from engine.generation import DoneEvent, GenerationEvent, QueuedEvent
from engine.sampling import GenerationParams
from engine.model import Prompt

_END = object()


class GenerationRun:
    def __init__(self, state, prompt: Prompt, params: GenerationParams):
        self.state, self.prompt, self.params = state, prompt, params

    @staticmethod
    def _produce(handle, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        def post(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
                handle.cancel()

        try:
            for event in handle:
                post(event)
        except Exception as exc:  # a failure outside the model's own error handling still ends the reply
            post(DoneEvent(reason="error", text="", error=f"{type(exc).__name__}: {exc}"))
        finally:
            post(_END)

    async def events(self, request: Request, heartbeat: float | None = None) -> AsyncIterator[GenerationEvent]:
        """The generation's events; a client disconnect (seen while streaming or waiting) cancels the run.
        With `heartbeat`, a run still waiting in line repeats its last QueuedEvent every `heartbeat` seconds:
        the scheduler reports only changes, and a stream must show life or clients with read timeouts quit."""
        try:
            handle = self.state.generate(self.prompt, self.params, "api")
        except Exception as exc:  # e.g. the model was unloaded between the request's checks and now
            yield DoneEvent(reason="error", text="", error=f"{type(exc).__name__}: {exc}")
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        threading.Thread(target=self._produce, args=(handle, loop, queue), daemon=True,
                         name="hearth-api-generation").start()
        watcher = asyncio.create_task(self._cancel_on_disconnect(request, handle))
        waiting: QueuedEvent | None = None   # the last report while the run waits in line
        try:
            while True:
                if waiting is not None and heartbeat:
                    try:
                        item = await asyncio.wait_for(queue.get(), heartbeat)
                    except asyncio.TimeoutError:
                        yield waiting
                        continue
                else:
                    item = await queue.get()
                if item is _END:
                    break
                waiting = item if isinstance(item, QueuedEvent) and item.ahead else None
                yield item
        finally:
            watcher.cancel()
            handle.cancel()   # a no-op after a finished generation; stops one whose reader went away

    @staticmethod
    async def _cancel_on_disconnect(request: Request, handle) -> None:
        # The body has been read, so the next ASGI message can only be the client hanging up.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        handle.cancel()
