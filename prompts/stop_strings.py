"""Stop strings a template implies: the text that would open the next user turn, plus the EOS token texts.

A model that has finished its reply but missed its end-of-turn token goes on to write the next turn
("USER:", "[INST]", "<|im_start|>user"); stopping there keeps it from talking to itself.
"""
from __future__ import annotations

from typing import Sequence

from prompts.sandbox import TemplateRenderError
from prompts.library import ChatTemplate

_REPLY, _NEXT = "\x00REPLY\x00", "\x00NEXT\x00"


def derive_stop_strings(template: ChatTemplate, eos_texts: Sequence[str] = ()) -> list[str]:
    """Render user/assistant/user and take what the template writes between the reply and the next user
    message: each line of it (EOS texts split out) is a stop string."""
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _REPLY},
                    {"role": "user", "content": _NEXT}]
    eos = [e for e in eos_texts if e]
    try:
        text = template.render(conversation, add_generation_prompt=False)
    except TemplateRenderError:
        return list(dict.fromkeys(eos))
    start, end = text.find(_REPLY), text.find(_NEXT)
    if start < 0 or end < start:
        return list(dict.fromkeys(eos))
    between = text[start + len(_REPLY):end]
    pieces = [between]
    for marker in eos:
        pieces = [part for piece in pieces for part in piece.split(marker)]
        if marker in between:
            pieces.append(marker)
    stops = [line.strip() for piece in pieces for line in piece.splitlines() if line.strip()]
    return list(dict.fromkeys(stops + eos))


def merge_stops(user_stops: Sequence[str], derived: Sequence[str]) -> list[str]:
    """User stop strings first, then the template's, without duplicates or empty strings."""
    return [s for s in dict.fromkeys([*user_stops, *derived]) if s]
