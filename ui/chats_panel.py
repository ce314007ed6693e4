"""Search, export and import of chats, inside the Text Generation tab's Conversations panel. The logic lives in
prompts/ (chat_search, chat_export, conversations); this file only wires widgets to it."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

import gradio as gr

from core.atomic import write_atomic
from prompts import chat_session, reasoning
from prompts.chat_export import FORMATS, ChatImportError, export_name, export_text, read_chat_file
from prompts.chat_search import search
from prompts.conversations import ConversationStore, title_from

KEPT_EXPORTS = 20   # export files stay until Gradio has copied them out; older ones are removed
# Export is one click: once the file is ready its link is clicked, so the browser downloads it at once (the link
# stays for a second download).
DOWNLOAD_JS = "() => { const a = document.querySelector('#chat-export-file a[download]'); if (a) a.click(); }"


class _ExportFolder:
    """A private temp folder for the files Export hands to the browser, made at the first export."""

    def __init__(self):
        self.root: Path | None = None

    def path_for(self, name: str) -> Path:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="hearth-exports-"))
        for old in sorted(self.root.iterdir(), key=lambda p: p.stat().st_mtime)[:-KEPT_EXPORTS]:
            shutil.rmtree(old, ignore_errors=True)
        # One folder per export, so the file keeps its plain name and two exports never share a path.
        return Path(tempfile.mkdtemp(dir=self.root)) / name


def build_chats_panel(conversations: ConversationStore, *, chatbot, conversation_id, system_message, versions_state,
                      conversation_list, status, choices: Callable) -> list:
    """The widgets (built where this is called) and their events. `choices(selected_id)` is the conversation
    list's update. Returns the events that put another conversation on screen, for the caller to chain what
    follows a switch (its reply versions)."""
    with gr.Row():
        query = gr.Textbox(label="Search chats (titles and messages)", elem_id="chat-search", scale=4)
        search_btn = gr.Button("Search", elem_id="chat-search-button", scale=1)
    results = gr.Radio([], label="Found (click one to open it)", elem_id="chat-search-results")
    with gr.Row():
        fmt = gr.Radio([(label, key) for key, label in FORMATS.items()], value="tgw", label="Export format",
                       elem_id="chat-export-format", scale=3)
        export_btn = gr.Button("Export this chat", elem_id="chat-export", scale=1)
        import_btn = gr.UploadButton("Import a chat (.json)", file_types=[".json"], type="filepath",
                                     elem_id="chat-import", scale=1)
    export_file = gr.File(label="Exported chat", visible=False, interactive=False, elem_id="chat-export-file")
    exports = _ExportFolder()

    def on_search(text):
        hits = search(conversations.list(), text or "")
        # A hit only in the title has the title as its snippet: no need to say it twice.
        found = [(hit.title if hit.snippet == hit.title else f"{hit.title} — {hit.snippet}", hit.id) for hit in hits]
        if not (text or "").strip():
            line = "type a word to search for"
        elif not hits:
            line = f"no saved chat holds “{text.strip()}”"
        else:
            line = f"{len(hits)} chat(s) hold “{text.strip()}”"
        return gr.update(choices=found, value=None), line

    def on_pick(conv_id):
        """The hit clicked, opened; the pick is cleared so that the same hit can be clicked again later."""
        if not conv_id:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            conv = conversations.open(conv_id)
        except ValueError as exc:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"⚠️ {exc}", None
        return (reasoning.shown(conv.messages), conv.id, conv.system_message, choices(conv.id),
                f"opened “{conv.title}”", None)

    def on_export(fmt_key, history, conv_id, system, versions):
        """The chat on screen (its messages, system message and reply versions) as a file to download."""
        messages = chat_session.normalize(history)
        hidden = gr.update(value=None, visible=False)   # no stale link left for the download click to reach
        if not messages:
            return hidden, "nothing to export: the chat is empty"
        try:
            conv = conversations.open(conv_id) if conv_id else None
        except ValueError:
            conv = None
        title = conv.title if conv else title_from(messages)
        try:
            text = export_text(fmt_key, messages, system or "", chat_session.prune(versions, messages))
        except ValueError as exc:
            return hidden, f"⚠️ {exc}"
        path = exports.path_for(export_name(fmt_key, title, conv.created if conv else 0.0))
        write_atomic(path, text)
        note = " (the system message is not part of that format: OpenAI messages keep it)" \
            if fmt_key == "tgw" and system else ""
        return gr.update(value=str(path), visible=True), \
            f"exported “{title}” as {FORMATS[fmt_key]}, {len(messages)} messages{note}"

    def on_import(path):
        """A new conversation from the file, put on screen; a file that cannot be read changes nothing."""
        if not path:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), "no file was uploaded"
        try:
            chat = read_chat_file(Path(path))
        except ChatImportError as exc:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"⚠️ {exc}"
        conv = conversations.add(conversations.new(messages=chat.messages, system_message=chat.system_message,
                                                   versions=chat.versions))
        notes = "".join(f"; {note}" for note in chat.notes)
        return (reasoning.shown(conv.messages), conv.id, conv.system_message, choices(conv.id),
                f"imported “{conv.title}” from {Path(path).name} ({FORMATS[chat.format]}, "
                f"{len(conv.messages)} messages){notes}")

    opened_outputs = [chatbot, conversation_id, system_message, conversation_list, status]
    search_btn.click(on_search, [query], [results, status], queue=False)
    query.submit(on_search, [query], [results, status], queue=False)
    picked = results.input(on_pick, [results], [*opened_outputs, results], queue=False)
    export_btn.click(on_export, [fmt, chatbot, conversation_id, system_message, versions_state],
                     [export_file, status], queue=False).then(None, js=DOWNLOAD_JS)
    imported = import_btn.upload(on_import, [import_btn], opened_outputs, queue=False)
    return [picked, imported]
