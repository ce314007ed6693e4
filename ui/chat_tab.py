"""Text Generation tab: Chat / Chat-instruct / Instruct / Notebook, the exact prompt sent, presets, templates and saved
conversations. Logic lives in prompts/ (chat_session, presets, conversations, templates); this file only wires
widgets to it."""

import functools

import gradio as gr

from engine.sampling import GenerationParams
from loaders.base import LoadError
from core.options import OptionError
from prompts import chat_session, reasoning
from prompts.chat_modes import CHAT_MODES, INSTRUCT
from prompts.conversations import ConversationStore
from prompts.presets import PRESETS_DIR, load_presets, save_preset
from prompts.sandbox import TemplateRenderError
from ui.chats_panel import build_chats_panel
from ui.characters_panel import CharactersPanel
from ui import chat_render
from ui.widgets import values_from, widgets_for

MODES = (*CHAT_MODES, "Notebook")
AUTO = "Auto (the model's template)"
USER_ERRORS = (LoadError, OptionError, ValueError, TemplateRenderError)
# text-generation-webui's chat keys (Enter sends and Shift+Enter breaks the line in the textbox itself):
# each clicks the button it stands for, so it does exactly what the click does.
KEYBOARD_JS = """() => {
    if (window.__hearthKeys) return;
    window.__hearthKeys = true;
    document.addEventListener('keydown', (e) => {
        const click = (id) => {   // only while the chat is on screen (not on another tab, not in Notebook)
            const b = document.getElementById(id);
            if (b && b.offsetParent !== null) { e.preventDefault(); e.stopPropagation(); b.click(); }
        };
        if (e.key === 'Escape') click('chat-stop');
        else if (e.key === 'Enter' && (e.ctrlKey || e.metaKey) && !e.altKey) click('chat-regenerate');
        else if (e.key === 'Enter' && e.altKey && !e.ctrlKey) click('chat-continue');
    }, true);
}"""


def build_chat_tab(state) -> dict:
    conversations = ConversationStore(state.conversations_dir)
    template_names = [AUTO, *state.template_library.names()]
    with gr.Tab("Text Generation", elem_id="tab-chat") as tab:
        template_info = gr.Markdown("", elem_id="chat-template-info")
        file_problems = gr.Markdown("", elem_id="chat-file-problems")  # skipped user files
        mode = gr.Radio(list(MODES), value=INSTRUCT, label="Mode", elem_id="chat-mode")
        characters = CharactersPanel(state, conversations)   # the character modes' picker, import, your name
        with gr.Column(visible=True) as chat_area:
            # editable: any message can be corrected in place (`on_edit`); copy: per message and the whole chat.
            chatbot = gr.Chatbot(elem_id="chatbot", height=420, label="Chat", editable="all",
                                 buttons=["copy", "copy_all"])
            with gr.Row():
                message = gr.Textbox(placeholder="Send a message (Enter; Shift+Enter: new line; Esc: stop; "
                                     "Ctrl+Enter: regenerate; Alt+Enter: continue)", show_label=False,
                                     elem_id="chat-input", scale=6, autofocus=True, max_lines=12)
                send_btn = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
                stop_btn = gr.Button("Stop", variant="stop", elem_id="chat-stop", scale=1)
            with gr.Row():
                regen_btn = gr.Button("Regenerate", elem_id="chat-regenerate")
                continue_btn = gr.Button("Continue", elem_id="chat-continue")
                remove_btn = gr.Button("Remove last", elem_id="chat-remove-last")
                clear_btn = gr.Button("Clear", elem_id="chat-clear")
            with gr.Row():   # the last reply's versions (Regenerate keeps the one it replaces)
                version_prev = gr.Button("◀", elem_id="chat-version-prev", size="sm", scale=0, min_width=40)
                version_label = gr.Markdown("", elem_id="chat-version-label")
                version_next = gr.Button("▶", elem_id="chat-version-next", size="sm", scale=0, min_width=40)
            versions_state = gr.State({})
        with gr.Column(visible=False) as notebook_area:
            notebook = gr.Textbox(lines=14, label="Notebook (the model continues this text)",
                                  elem_id="notebook-text")
            with gr.Row():
                notebook_btn = gr.Button("Generate", variant="primary", elem_id="notebook-generate")
                notebook_stop = gr.Button("Stop", variant="stop", elem_id="notebook-stop")
        status = gr.Markdown("", elem_id="chat-status")
        with gr.Accordion("Prompt (exactly what the model was sent)", open=False, elem_id="prompt-accordion"):
            prompt_tokens = gr.Markdown("", elem_id="prompt-tokens")
            prompt_view = gr.Textbox(lines=10, show_label=False, interactive=False, elem_id="prompt-view")
        system_message = gr.Textbox(label="System message", lines=2, elem_id="system-message",
                                    placeholder="Leave empty to use the template's default")
        with gr.Row():
            template = gr.Dropdown(template_names, value=AUTO, label="Instruction template", elem_id="template")
            preset = gr.Dropdown(load_presets().names(), value=None, label="Preset", elem_id="preset")
            preset_name = gr.Textbox(label="New preset name", elem_id="preset-name")
            save_preset_btn = gr.Button("Save as new preset", elem_id="preset-save")
            thinking = gr.Checkbox(True, label="Enable thinking", elem_id="chat-enable-thinking")
        with gr.Accordion("Conversations", open=False, elem_id="conversations"):
            conversation_id = gr.State("")   # the conversation on screen: every change is saved into it
            gr.Markdown(f"Saved in `{conversations.folder}` (settings `data_dir`, `--data-dir`).",
                        elem_id="conversation-folder")
            with gr.Row():
                conversation_list = gr.Dropdown([], label="Saved conversations", elem_id="conversation-list")
                new_btn = gr.Button("New", elem_id="conversation-new")
                open_btn = gr.Button("Open", elem_id="conversation-open")
                delete_btn = gr.Button("Delete", variant="stop", elem_id="conversation-delete")
            with gr.Row(visible=False, elem_id="conversation-delete-confirm") as confirm_row:
                confirm_text = gr.Markdown("", elem_id="conversation-delete-question")
                confirm_yes = gr.Button("Yes, move it to the trash", variant="stop", elem_id="conversation-delete-yes")
                confirm_no = gr.Button("Keep it", elem_id="conversation-delete-no")
            with gr.Row():
                rename_text = gr.Textbox(label="Title", elem_id="conversation-title")
                rename_btn = gr.Button("Rename", elem_id="conversation-rename")
            with gr.Row():
                trash_list = gr.Dropdown([], label="Trash", elem_id="trash-list")
                restore_btn = gr.Button("Restore", elem_id="trash-restore")
                empty_trash_btn = gr.Button("Empty trash", variant="stop", elem_id="trash-empty")
            # The panel's own line: a conversation action's message neither hides nor outlives a reply's status.
            conversation_status = gr.Markdown("", elem_id="conversation-status")
            # Search, export, import: a conversation they put on screen brings its versions (`switched` below).
            panel_switches = build_chats_panel(
                conversations, chatbot=chatbot, conversation_id=conversation_id, system_message=system_message,
                versions_state=versions_state, conversation_list=conversation_list, status=conversation_status,
                choices=lambda selected: conversation_choices(selected))
        with gr.Accordion("Generation parameters", open=False):
            # Built with the values a generation would use now; each page load and model change sets them
            # again from the loaded model's effective settings (`refresh_model`).
            param_widgets = widgets_for(GenerationParams, state.generation_params(), elem_prefix="gen-")
    params_in = list(param_widgets.values())

    # ---- helpers --------------------------------------------------------------------------------------
    def choice_of(name: str | None) -> str | None:
        return None if not name or name == AUTO else name

    def params_of(values) -> GenerationParams:
        return state.generation_params(**values_from(GenerationParams, list(values)))

    def describe_template(name: str | None) -> str:
        if state.model is None:
            loading = state.startup.line() if state.startup is not None else ""
            return loading or "No model loaded: pick one on the Model tab."
        try:
            info = state.template_info(choice_of(name))
        except USER_ERRORS as exc:
            return f"⚠️ template: {exc}"
        saved = state.saved_model_settings()
        preset_note = f" · preset **{saved['preset']}** (saved)" if saved.get("preset") else ""
        warning = f" · ⚠️ {info['warning']}" if info["warning"] else ""
        return (f"Model **{state.model.name}** · template **{info['name']}** ({info['source']}){preset_note}"
                f"{warning}")

    def describe_file_problems() -> str:
        problems = state.file_problems()
        return "".join(f"⚠️ skipped or partly ignored: {p}  \n" for p in problems)

    def conversation_choices(selected: str | None = None):
        """The saved conversations; `selected` (the one on screen) becomes the dropdown's value."""
        listed = conversations.list()
        if selected is None:
            return gr.update(choices=[(c.title, c.id) for c in listed])
        return gr.update(choices=[(c.title, c.id) for c in listed], value=selected or None)

    def trash_choices():
        return gr.update(choices=[(c.title, c.id) for c in conversations.trashed()], value=None)

    def save(conv_id: str, history, mode_name: str, system: str, template_name: str | None, versions=None):
        """Store the chat on screen under `conv_id` (a new conversation when empty); returns its id.
        `versions`: its replies' versions (None: those saved stay)."""
        history = chat_session.normalize(history)
        extra = {} if versions is None else {"versions": chat_session.prune(versions, history)}
        return conversations.save_messages(conv_id, history, system_message=system or "", mode=mode_name,
                                           character=characters.recorded(conv_id, mode_name),
                                           template=choice_of(template_name) or "",
                                           model=state.model.name if state.model else "", **extra).id

    def prompt_outputs(reply):
        if reply.prompt is None:
            return gr.skip(), gr.skip()
        return reply.prompt.text, f"**{reply.prompt.n_tokens} tokens** · {reply.prompt.template_name} " \
                                  f"({reply.prompt.template_source})"

    def refresh():
        """What changes when a model is loaded: the template line, the effective system message, preset."""
        saved = state.saved_model_settings() if state.model is not None else {}
        system = ""
        if state.model is not None:
            try:
                system = state.template_info()["system_message"]
            except USER_ERRORS:
                system = ""
        return (describe_template(None), system, saved.get("preset"), AUTO, conversation_choices(),
                describe_file_problems(), chat_render.switch_update(state))

    refresh_outputs = [template_info, system_message, preset, template, conversation_list, file_problems, thinking]

    def refresh_model():
        """`refresh`, plus the sliders set to what the next generation uses unless changed: the loaded model's
        effective sampler values (saved > preset > model metadata > settings.yaml), the Model tab's table.
        Only on page loads and model changes: a visit to another tab must not undo the user's slider moves."""
        params = state.generation_params()
        values = [getattr(params, key) for key in param_widgets]
        return (*refresh(), *["\n".join(v) if isinstance(v, list) else v for v in values])

    # ---- generation -----------------------------------------------------------------------------------
    def stream_chat(action, history, conv_id, mode_name, system, template_name, request, versions=None):
        """Stream a reply into the chat and save it. `versions` (regenerate, continue): the reply's versions,
        which then keep the new text too; None (send): the new reply has none yet."""
        key = request.session_hash if request is not None else "default"
        last = history
        finished = False
        try:
            for new_history, reply in action(key):
                last = new_history
                shown, tokens = prompt_outputs(reply)
                text = reply.text if not reply.error else f"⚠️ {reply.text}"
                yield reasoning.shown(new_history), text, shown, tokens, gr.skip(), gr.skip(), gr.skip(), gr.skip()
            finished = True
        except USER_ERRORS as exc:
            yield history, f"⚠️ {exc}", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        finally:
            if not finished:   # the page went away mid-reply: the reply so far is kept all the same
                save(conv_id, last, mode_name, system, template_name, versions)
        if versions is not None:
            versions = chat_session.remember(versions, last, new=True)
        saved = save(conv_id, last, mode_name, system, template_name, versions)
        yield (gr.skip(), gr.skip(), gr.skip(), gr.skip(), saved, conversation_choices(saved),
               gr.skip() if versions is None else versions, chat_session.version_label(versions, last))

    chat_outputs = [chatbot, status, prompt_view, prompt_tokens, conversation_id, conversation_list, versions_state,
                    version_label]

    # gr.Request comes first: Gradio injects it by position (a keyword-only one after *values is never filled).
    def on_send(request: gr.Request, text, history, conv_id, mode_name, system, template_name, versions, *values):
        unchanged = [gr.skip()] * 6
        if not text or not text.strip():
            yield history, "", "Type a message first.", *unchanged
            return
        try:
            params = params_of(values)
        except OptionError as exc:
            yield history, text, f"⚠️ {exc}", *unchanged
            return
        startup = state.startup
        if state.model is None and (startup is None or startup.finished.is_set()):
            # Nothing can answer (and no load is coming): the text stays in the box instead of vanishing.
            yield history, text, "⚠️ no model is loaded: pick one on the Model tab and press Load", *unchanged
            return
        choice = choice_of(template_name)
        # conv_id is read when the reply starts: the conversation saved below, whose character it records.
        action = lambda key: chat_session.send(state, history, text, params, key, system or None, choice,
                                               characters.setup(mode_name, conv_id),
                                               chat_render.enable_thinking(state))
        shown = chat_session.normalize(history) + [{"role": "user", "content": text}]
        # Saved before any reply, so the message survives a reload, a restart or a failed load.
        conv_id = save(conv_id, shown, mode_name, system, template_name)
        # The input box is cleared once, here: clearing it on every streamed update would wipe what the user
        # types for the next turn while this reply is still coming.
        yield (reasoning.shown(shown), "", "queued…", gr.skip(), gr.skip(), conv_id, conversation_choices(conv_id),
               gr.skip(), "")
        while startup is not None and not startup.finished.wait(1.0):   # Send waits for the start-up load
            yield gr.skip(), gr.skip(), startup.line(), *unchanged
        for out in stream_chat(action, history, conv_id, mode_name, system, template_name, request):
            yield out[0], gr.skip(), *out[1:]

    def on_regenerate(request: gr.Request, history, conv_id, mode_name, system, template_name, versions, *values):
        params = params_of(values)
        action = lambda key: chat_session.regenerate(state, history, params, key, system or None,
                                                     choice_of(template_name), characters.setup(mode_name, conv_id),
                                                     chat_render.enable_thinking(state))
        # The reply being replaced stays a version (the arrows bring it back).
        versions = chat_session.remember(versions, chat_session.normalize(history))
        yield from stream_chat(action, history, conv_id, mode_name, system, template_name, request, versions)

    def on_continue(request: gr.Request, history, conv_id, mode_name, system, template_name, versions, *values):
        params = params_of(values)
        action = lambda key: chat_session.continue_reply(state, history, params, key, system or None,
                                                         choice_of(template_name),
                                                         characters.setup(mode_name, conv_id),
                                                         chat_render.enable_thinking(state))
        yield from stream_chat(action, history, conv_id, mode_name, system, template_name, request, versions)

    def on_reply_to_edit(request: gr.Request, needed, history, conv_id, mode_name, system, template_name, versions,
                         *values):
        if not needed:   # an edited reply: nothing to generate
            yield tuple(gr.skip() for _ in chat_outputs)
            return
        yield from on_regenerate(request, history, conv_id, mode_name, system, template_name, versions, *values)

    def on_version(history, conv_id, mode_name, system, template_name, versions, step: int):
        """The last reply's previous (step -1) or next (+1) version, shown and saved as the chat's text."""
        history, versions = chat_session.browse(versions, history, step)
        if conv_id:
            save(conv_id, history, mode_name, system, template_name, versions)
        return reasoning.shown(history), versions, chat_session.version_label(versions, history)

    def on_notebook(request: gr.Request, text, *values):
        try:
            params = params_of(values)
            for new_text, reply in chat_session.notebook(state, text or "", params, request.session_hash):
                shown, tokens = prompt_outputs(reply)
                yield new_text, reply.text if not reply.error else f"⚠️ {reply.text}", shown, tokens
        except USER_ERRORS as exc:
            yield text, f"⚠️ {exc}", gr.skip(), gr.skip()

    def on_stop(request: gr.Request):
        # A stopped reply ends within one token and its own last status says "stopped"; writing "stopping…"
        # here could land after that and stay on screen, so the status is left to the reply.
        return gr.skip() if state.stop(request.session_hash) else "nothing is generating"

    def on_mode(mode_name):
        chat_like = mode_name != "Notebook"
        return gr.update(visible=chat_like), gr.update(visible=not chat_like)

    # ---- presets ----------------------------------------------------------------------------------------
    def on_preset(name):
        values = load_presets().presets.get(name or "")
        if values is None:
            return [gr.skip()] * len(params_in)
        saved = state.saved_model_settings()
        if name == saved.get("preset"):   # the model's own preset: values saved one by one still win over it
            values = {**values, **(saved.get("sampler") or {})}
        return [values.get(key, gr.skip()) for key in param_widgets]

    def on_save_preset(name, *values):
        try:
            path = save_preset(PRESETS_DIR, name or "", values_from(GenerationParams, list(values)))
        except (ValueError, OptionError, OSError) as exc:
            return gr.skip(), f"⚠️ {exc}"
        return gr.update(choices=load_presets().names(), value=path.stem), f"saved preset {path.stem}"

    # ---- conversations ------------------------------------------------------------------------------------
    def on_new(mode_name, system, template_name):
        """A new, empty conversation, saved at once so the list shows it selected (Delete then means it)."""
        conv_id = save("", [], mode_name, system, template_name)
        return [], conv_id, conversation_choices(conv_id), "new conversation"

    def on_open(conv_id):
        if not conv_id:
            return gr.skip(), gr.skip(), gr.skip(), "pick a conversation first"
        try:
            conv = conversations.open(conv_id)
        except ValueError as exc:
            return gr.skip(), gr.skip(), gr.skip(), f"⚠️ {exc}"
        return reasoning.shown(conv.messages), conv.id, conv.system_message, f"opened “{conv.title}”"

    def on_page_load():
        """A reload or a restart reopens the conversation saved last, with its list and trash."""
        listed = conversations.list()
        if not listed:
            return [], "", gr.skip(), conversation_choices(""), trash_choices()
        conv = listed[0]
        return (reasoning.shown(conv.messages), conv.id, conv.system_message or gr.skip(),
                conversation_choices(conv.id), trash_choices())

    def on_rename(conv_id, title):
        try:
            conv = conversations.rename(conv_id, title or "")
        except ValueError as exc:
            return gr.skip(), f"⚠️ {exc}"
        return conversation_choices(conv.id), f"renamed to “{conv.title}”"

    def on_delete(current_id):
        """Delete asks first, and names the conversation on screen: that is the one it acts on."""
        if not current_id:
            return gr.update(visible=False), "", "nothing to delete: this chat is not saved"
        try:
            title = conversations.open(current_id).title
        except ValueError as exc:
            return gr.update(visible=False), "", f"⚠️ {exc}"
        return gr.update(visible=True), f"Move “{title}” to the trash?", ""

    def on_delete_confirmed(current_id):
        if not current_id:
            return gr.update(visible=False), gr.skip(), gr.skip(), gr.skip(), gr.skip(), "nothing to delete"
        conversations.delete(current_id)
        return (gr.update(visible=False), [], "", conversation_choices(""), trash_choices(),
                "moved the conversation to the trash (Restore brings it back)")

    def on_restore(trash_id):
        if not trash_id:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), "pick a conversation in the trash first"
        try:
            conv = conversations.restore(trash_id)
        except ValueError as exc:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"⚠️ {exc}"
        return (reasoning.shown(conv.messages), conv.id, conversation_choices(conv.id), trash_choices(),
                f"restored “{conv.title}”")

    def on_empty_trash():
        removed = conversations.empty_trash()
        return trash_choices(), f"deleted {removed} conversation(s) for good"

    def saved_versions(conv_id, history):
        """The reply versions of the conversation now on screen (after an open, a reload, New, a restore)."""
        try:
            versions = conversations.open(conv_id).versions if conv_id else {}
        except ValueError:
            versions = {}
        return versions, chat_session.version_label(versions, history)

    # ---- editing the chat on screen (each change is saved at once) -----------------------------------------
    def on_remove_last(history, conv_id, mode_name, system, template_name, versions):
        history, text = chat_session.remove_last(history)
        versions = chat_session.prune(versions, history)
        if conv_id:
            save(conv_id, history, mode_name, system, template_name, versions)
        return reasoning.shown(history), text, versions, chat_session.version_label(versions, history)

    def on_edit(history, conv_id, mode_name, system, template_name, versions, edit: gr.EditData):
        """An edited message is saved; an edited user message drops the turns after it, and `regenerate`
        (chained after this) answers it anew; an edited reply with versions keeps its edit as one more."""
        history = chat_session.normalize(history)
        # The Chatbot counts a reply's thinking part as a message of its own.
        index, part = reasoning.message_index(history, edit.index if isinstance(edit.index, int) else edit.index[0])
        try:
            history, reply_needed = chat_session.edit(history, index, chat_session.message_text(edit.value), part)
        except IndexError as exc:
            return reasoning.shown(history), conv_id, gr.skip(), False, gr.skip(), gr.skip(), f"⚠️ {exc}"
        versions = chat_session.prune(versions, history)
        if str(index) in versions:
            versions = chat_session.remember(versions, history[:index + 1])
        conv_id = save(conv_id, history, mode_name, system, template_name, versions)
        return (reasoning.shown(history), conv_id, conversation_choices(conv_id), reply_needed, versions,
                chat_session.version_label(versions, history), "edited the message")

    # ---- wiring ---------------------------------------------------------------------------------------------
    common_in = [conversation_id, mode, system_message, template, versions_state, *params_in]
    chat_in = [chatbot, conversation_id, mode, system_message, template, versions_state]
    # always_last: a Send pressed while the previous reply is still finishing (its status already says done,
    # the conversation is being saved) runs right after it; Gradio's default for clicks drops it silently.
    send_args = dict(inputs=[message, chatbot, *common_in], outputs=[chatbot, message, *chat_outputs[1:]],
                     concurrency_id="generate", concurrency_limit=None, trigger_mode="always_last")
    message.submit(on_send, **send_args, api_name=False)
    send_btn.click(on_send, **send_args, api_name="send")
    regen_btn.click(on_regenerate, [chatbot, *common_in], chat_outputs, concurrency_id="generate",
                    api_name="regenerate")
    continue_btn.click(on_continue, [chatbot, *common_in], chat_outputs, concurrency_id="generate",
                       api_name="continue")
    notebook_btn.click(on_notebook, [notebook, *params_in], [notebook, status, prompt_view, prompt_tokens],
                       concurrency_id="generate", api_name="notebook")
    stop_btn.click(on_stop, None, [status], queue=False, api_name="stop")
    notebook_stop.click(on_stop, None, [status], queue=False, api_name=False)
    remove_btn.click(on_remove_last, chat_in, [chatbot, message, versions_state, version_label], queue=False)
    version_prev.click(functools.partial(on_version, step=-1), chat_in, [chatbot, versions_state, version_label],
                       queue=False)
    version_next.click(functools.partial(on_version, step=1), chat_in, [chatbot, versions_state, version_label],
                       queue=False)
    # Clear starts a new chat: the saved one stays in the list.
    cleared = clear_btn.click(lambda: ([], "", "", conversation_choices("")), None,
                              [chatbot, status, conversation_id, conversation_list], queue=False)
    reply_needed = gr.State(False)
    chatbot.edit(on_edit, chat_in,
                 [chatbot, conversation_id, conversation_list, reply_needed, versions_state, version_label, status],
                 queue=False).then(
        on_reply_to_edit, [reply_needed, chatbot, *common_in], chat_outputs, concurrency_id="generate")
    mode.change(on_mode, [mode], [chat_area, notebook_area], queue=False)
    template.change(describe_template, [template], [template_info], queue=False)
    preset.change(on_preset, [preset], params_in, queue=False)
    save_preset_btn.click(on_save_preset, [preset_name, *params_in], [preset, status], queue=False)
    thinking.input(lambda value: chat_render.save_switch(state, value), [thinking], [status], queue=False)
    created = new_btn.click(on_new, [mode, system_message, template], [chatbot, conversation_id, conversation_list,
                                                                      conversation_status], queue=False)
    opened = open_btn.click(on_open, [conversation_list], [chatbot, conversation_id, system_message,
                                                             conversation_status], queue=False)
    rename_btn.click(on_rename, [conversation_id, rename_text], [conversation_list, conversation_status], queue=False)
    delete_btn.click(on_delete, [conversation_id], [confirm_row, confirm_text, conversation_status], queue=False)
    deleted = confirm_yes.click(on_delete_confirmed, [conversation_id],
                                [confirm_row, chatbot, conversation_id, conversation_list, trash_list,
                                 conversation_status],
                                queue=False)
    confirm_no.click(lambda: (gr.update(visible=False), "kept the conversation"), None,
                     [confirm_row, conversation_status], queue=False)
    restored = restore_btn.click(on_restore, [trash_list],
                                 [chatbot, conversation_id, conversation_list, trash_list, conversation_status],
                                 queue=False)
    empty_trash_btn.click(on_empty_trash, None, [trash_list, conversation_status], queue=False)
    # A mode or character picked shows its own chat; a chat opened brings its mode and character.
    character_switches = characters.wire(
        mode=mode, chatbot=chatbot, conversation_id=conversation_id, conversation_list=conversation_list,
        choices=conversation_choices, new_chats=(cleared, created, deleted),
        opened_chats=(opened, restored, *panel_switches))
    # Whichever conversation comes on screen brings its reply versions.
    for switched in (cleared, created, opened, deleted, restored, *panel_switches, *character_switches):
        switched.then(saved_versions, [conversation_id, chatbot], [versions_state, version_label], queue=False)
    tab.select(refresh, None, refresh_outputs, queue=False)
    # What the page shows before its load events: the template line (or the start-up load's), saved choices.
    initial = refresh()
    template_info.value, system_message.value, preset.value = initial[0], initial[1], initial[2]
    file_problems.value = initial[5]
    conversation_list.choices = [(c.title, c.id) for c in conversations.list()]

    def page_load(demo: gr.Blocks) -> None:
        reopened = demo.load(on_page_load, None, [chatbot, conversation_id, system_message, conversation_list,
                                                  trash_list], queue=False)
        reopened.then(saved_versions, [conversation_id, chatbot], [versions_state, version_label], queue=False)
        characters.follow_after(reopened, conversation_id, mode)
        demo.load(None, js=KEYBOARD_JS)

    return {"chatbot": chatbot, "header": template_info, "refresh": refresh_model,
            "refresh_outputs": [*refresh_outputs, *params_in], "page_load": page_load}
