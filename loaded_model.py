"""LoadedModel: one load of one model, with everything a generation needs resolved once.

AppState makes one at each load (and a new one when the user saves settings for the loaded model): the
Model, its saved and effective settings, its chat template and the template's stop strings. From then on a
prompt costs no file reads: `prompt(messages | text, mode, budget)` renders through what was resolved here.

The Prompt fits the model's declared capabilities (engine.model.Model): a model with a local tokenizer gets
the template's exact text and its token ids; a model that applies its own chat template (a remote server)
gets the messages as they are, counted by the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from engine.model import Message, Model, Prompt
from loaders.lora_apply import LoraSet
from loaders.model_settings import sampler_values
from prompts.chat import eos_texts, render_messages, render_raw, render_with_template
from prompts.library import CHOSEN, ChatTemplate, TemplateLibrary
from prompts.stop_strings import derive_stop_strings
from prompts.template_options import NO_OPTIONS, TemplateOptions
from prompts.templates import resolve_template

MODES = ("chat", "continue", "raw")
SERVER = "the server's own chat template"


@dataclass
class LoadedModel:
    model: Model
    library: TemplateLibrary
    # The model's entry in config-user.yaml (instruction_template, preset, system_message, ...); {} if none.
    saved: dict[str, Any] = field(default_factory=dict)
    # {setting: Effective} (loaders.model_settings); None for a model with no folder here (a remote endpoint).
    settings: dict[str, Any] | None = None
    # The LoRA adapters on the model (loaders.lora_apply). The model keeps them across a re-resolve (Save
    # settings makes a new LoadedModel): the caller hands the old set on. None: a fresh, empty set.
    loras: LoraSet | None = None
    template: ChatTemplate = field(init=False)
    _stops: dict[tuple[str, str], tuple[str, ...]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.loras is None:
            self.loras = LoraSet(self.model)
        if self.model.applies_chat_template:
            self.template = ChatTemplate(name="server", source=SERVER, jinja="",
                                         reason=f"{self.model.name} applies its own template")
        else:
            self.template = resolve_template(self.model.model_dir, self.library, self.saved)

    @property
    def name(self) -> str:
        return self.model.name

    def template_for(self, choice: str | None = None) -> ChatTemplate:
        """The template a prompt uses: `choice` (a library name picked in the UI) when it names one, else the
        model's own resolution. A model that applies its own template ignores the choice."""
        if choice and not self.model.applies_chat_template:
            found = self.library.find(choice)
            if found:
                return self.library.get(found, CHOSEN, f"{found} picked in the Text Generation tab")
        return self.template

    def stops_for(self, template: ChatTemplate) -> tuple[str, ...]:
        """The stop strings `template` implies for this model (worked out once per template)."""
        key = (template.name, template.source)
        if key not in self._stops:
            texts = eos_texts(self.model.tokenizer, self.model.eos_token_ids)
            self._stops[key] = tuple(derive_stop_strings(template, texts))
        return self._stops[key]

    def prompt(self, source: Sequence[Message] | str, mode: str = "chat", budget: int | None = None,
               template: str | None = None, options: TemplateOptions = NO_OPTIONS) -> Prompt:
        """The Prompt for `source`: messages to reply to (mode "chat"), messages whose last (assistant) one
        is a reply to go on with ("continue"), or text to continue as is ("raw"). With `budget` (tokens left
        for the prompt) the oldest whole turns are dropped to fit. `template`: a library name picked in the UI.
        `options`: the tool list and enable_thinking switch the chat template gets (prompts.template_options).
        ValueError for a raw text that makes no tokens (a model needs one to continue from), and for options
        with a raw text (it has no template to take them)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        model = self.model
        if mode == "raw":
            if not isinstance(source, str):
                raise ValueError("a raw prompt is text, not messages")
            if options != NO_OPTIONS:
                raise ValueError("tools and enable_thinking go through a chat template; a raw prompt has none")
            if model.counts_tokens_locally:
                prompt = render_raw(model.tokenizer, source)
            else:
                plain = Prompt(text=source, template_source="raw text", template_name="none")
                prompt = Prompt(text=source, template_source="raw text", template_name="none",
                                counted=model.count_tokens(plain) if source else 0)
            if prompt.n_tokens == 0:
                raise ValueError("the prompt is empty: give some text for the model to continue")
            return prompt
        if isinstance(source, str):
            raise ValueError("a chat prompt is a list of messages, not text")
        continue_final = mode == "continue"
        chosen = self.template_for(template)
        if model.applies_chat_template:
            return render_messages(model.count_tokens, source, budget=budget, continue_final=continue_final,
                                   template_name=chosen.name, template_source=chosen.source, options=options)
        return render_with_template(chosen, model.tokenizer, source, budget=budget, continue_final=continue_final,
                                    stops=self.stops_for(chosen), options=options)

    def template_info(self, choice: str | None = None) -> dict[str, str]:
        """Which template a prompt uses and why, with the system message it starts from."""
        template = self.template_for(choice)
        return {"name": template.name, "source": template.source, "reason": template.reason,
                "system_message": self.saved.get("system_message") or template.system_message,
                "warning": template.warning}

    def sampler(self) -> dict[str, Any] | None:
        """The sampler values the next generation uses unless told otherwise (saved > preset > model metadata
        > settings.yaml); None where no settings apply (settings.yaml's alone then)."""
        return sampler_values(self.settings) if self.settings is not None else None
