"""One request's generation: AppState.generate in a worker thread, read by the HTTP handler as an async stream.

The model's decode loop is blocking, so it runs in its own thread (waiting its turn in AppState's FIFO queue);
events cross to the event loop through an asyncio queue. When the client goes away, the run is abandoned:
AppState.stop(key) sets the cancel flag the decode loop checks after every token, so the model is free for the
next request within one token.
"""
from __future__ import annotations

import asyncio
import threading
import uuid
from typing import AsyncIterator

from fastapi import Request

from engine.generation import DoneEvent, GenerationEvent
from engine.sampling import GenerationParams
from prompts.chat import Prompt

_END = object()


class GenerationRun:
    def __init__(self, state, prompt: Prompt, params: GenerationParams):
        self.state, self.prompt, self.params = state, prompt, params
        self.key = f"api-{uuid.uuid4().hex}"
        self._abandoned = threading.Event()

    def abandon(self) -> None:
        self._abandoned.set()
        self.state.stop(self.key)

    def _produce(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        def post(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
                self.abandon()

        try:
            for event in self.state.generate(self.prompt, self.params, self.key):
                # Abandoned before the generation registered its cancel flag: stop it now that it has.
                if self._abandoned.is_set():
                    self.state.stop(self.key)
                post(event)
        except Exception as exc:  # e.g. the model was unloaded between the request's checks and now
            post(DoneEvent(reason="error", text="", error=f"{type(exc).__name__}: {exc}"))
        finally:
            post(_END)

    async def events(self, request: Request) -> AsyncIterator[GenerationEvent]:
        """The generation's events; a client disconnect (seen while streaming or waiting) abandons the run."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        threading.Thread(target=self._produce, args=(loop, queue), daemon=True, name=self.key).start()
        watcher = asyncio.create_task(self._abandon_on_disconnect(request))
        try:
            while (item := await queue.get()) is not _END:
                yield item
        finally:
            watcher.cancel()
            self.abandon()   # a no-op after a finished generation; stops one whose reader went away

    async def _abandon_on_disconnect(self, request: Request) -> None:
        # The body has been read, so the next ASGI message can only be the client hanging up.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.abandon()
