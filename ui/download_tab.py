"""Download tab: type a repo, list its branches and files, download with live progress, cancel, resume.

Everything that talks to the Hub or touches disk lives in hub/; this module turns it into widgets.
"""
from __future__ import annotations

import html
import threading
from typing import Any, Callable, Iterator

import gradio as gr

from hub.download import DownloadProgress, DownloadResult, describe, download_model, format_eta, plan_download
from hub.errors import ChoiceNeeded, DownloadCancelled, HubError
from hub.gguf_files import group_by_quant
from hub.listing import human_size, list_branches, list_files
from hub.model_card import summarize_model_folder
from hub.repo_id import RepoRef, parse_repo_spec

POLL_S = 0.5
# After Cancel the downloader stops at its next chunk; on a stalled or slow connection that can take long, and
# the user asked now: the run ends after this grace, the downloader finishing its stop on its own.
CANCEL_GRACE_S = 1.0
IDLE_PROGRESS = "<div id='download-progress-idle'>No download running.</div>"


def _ref_from_inputs(repo_text: str, branch: str | None, file: str | None) -> RepoRef:
    """The repo box wins when it names a branch itself (owner/name:branch or a URL); else the dropdown."""
    ref = parse_repo_spec(repo_text, file=(file or "").strip() or None)
    text = (repo_text or "").strip()
    if text.lower().startswith(("http://", "https://")):
        explicit = any(marker in text for marker in ("/tree/", "/resolve/", "/blob/"))
    else:
        explicit = ":" in text
    return ref if explicit else ref.with_branch(branch)


def _bar(fraction: float) -> str:
    pct = max(0.0, min(fraction, 1.0)) * 100
    return (f"<div style='background:#e5e7eb;border-radius:4px;height:10px;width:100%'>"
            f"<div style='background:#f97316;border-radius:4px;height:10px;width:{pct:.1f}%'></div></div>")


def progress_html(p: DownloadProgress) -> str:
    """Overall bar + one line per file in flight: bytes done/total, speed, ETA."""
    rows = [f"<div id='download-progress-overall'><b>Overall</b>: {html.escape(describe(p))}</div>", _bar(p.fraction)]
    files_done = sum(1 for f in p.files if f.state == "done")
    rows.append(f"<div>{files_done} of {len(p.files)} files verified</div>")
    for f in sorted(p.active, key=lambda f: f.path):
        rows.append(
            f"<div class='download-file'><code>{html.escape(f.path)}</code> {f.state}: "
            f"{human_size(f.done)} / {human_size(f.total)} at {human_size(f.speed)}/s, ETA {format_eta(f.eta)}</div>"
            + _bar(f.done / f.total if f.total else 1.0))
    if p.message:
        rows.append(f"<div>{html.escape(p.message)}</div>")
    return "<div id='download-progress-live'>" + "".join(rows) + "</div>"


def _file_table(plan) -> str:
    lines = ["| File | Size | On disk |", "| --- | ---: | ---: |"]
    for f in plan.selection.files:
        have = plan.partial_files.get(f.path, 0)
        lines.append(f"| `{f.path}` | {human_size(f.size)} | {human_size(have) if have else ''} |")
    lines.append(f"| **Total ({len(plan.selection.files)} files)** | **{human_size(plan.selection.total_size)}** | "
                 f"{human_size(plan.bytes_needed)} left |")
    if plan.selection.skipped:
        lines.append("\nSkipped: " + "; ".join(f"`{p}` ({why})" for p, why in sorted(plan.selection.skipped.items())))
    heading = f"**{plan.ref}** at commit `{plan.listing.commit[:12]}` → `models/{plan.folder}`"
    if plan.note:
        heading += f"\n\nℹ️ {plan.note}"
    return heading + "\n\n" + "\n".join(lines)


def _choice_message(exc: ChoiceNeeded) -> str:
    return f"⚠️ {exc}\n\n" + "\n".join(f"- `{c}`" for c in exc.choices)


def _gguf_table(ref: RepoRef, groups) -> str:
    """The repo's GGUF files by quant type, each type's bits and the cards' note in its first row."""
    lines = [f"**{ref}**: {sum(len(g.models) for g in groups)} GGUF models. Type one file name into *Specific "
             f"file* and press Download.", "", "| Quant type | Bits | Use case | File | Size |",
             "| --- | ---: | --- | --- | ---: |"]
    for group in groups:
        for i, model in enumerate(group.models):
            parts = f" ({model.parts} parts)" if model.parts > 1 else ""
            head = f"**{group.quant}** | {group.bits} | {group.note}" if i == 0 else " | | "
            lines.append(f"| {head} | `{model.path}`{parts} | {human_size(model.size)} |")
    return "\n".join(lines)


def _download_work(ref: RepoRef, models_dir) -> Callable[[threading.Event], Iterator[object]]:
    """The work of a download's RunHandle: download_model in a thread of its own (it blocks), its latest
    progress yielded every POLL_S, then its DownloadResult; its error is raised to the reader. A cancelled
    run ends within CANCEL_GRACE_S (DownloadCancelled) even while the downloader waits for bytes."""
    def work(cancel: threading.Event) -> Iterator[object]:
        latest: dict[str, Any] = {}

        def fetch() -> None:
            try:
                latest["result"] = download_model(ref, models_dir, cancel=cancel,
                                                  progress=lambda p: latest.__setitem__("progress", p))
            except Exception as exc:  # raised again in the reader's thread, below
                latest["error"] = exc

        worker = threading.Thread(target=fetch, name="hearth-ui-download", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(POLL_S)
                if "progress" in latest:
                    yield latest["progress"]
                if cancel.is_set():
                    worker.join(CANCEL_GRACE_S)
                    break
        finally:
            if worker.is_alive():   # the run was closed before the download ended: stop it, keep the bytes
                cancel.set()
        if worker.is_alive():
            raise DownloadCancelled("Download cancelled; the bytes so far are kept: press Download again to "
                                    "resume where it stopped.")
        if "error" in latest:
            raise latest["error"]
        yield latest["result"]
    return work


def build_download_tab(state, on_models_changed: Any = None) -> dict:
    """The Download tab. `state` needs `.models_dir` and `.downloads` (a scheduler.Scheduler).

    `on_models_changed` refreshes the model list after a download: a model dropdown (or a list of them),
    whose choices become `state.list_models()`, or a `(fn, outputs)` pair chained after the download.
    Returns the tab's components and the download event, for further wiring.
    """
    with gr.Tab("Download", elem_id="tab-download"):
        with gr.Row():
            repo_box = gr.Textbox(label="Repo", placeholder="TheBloke/Llama-2-7b-Chat-GPTQ:gptq-4bit-32g-actorder_True",
                                  info="owner/name, owner/name:branch, or a huggingface.co link",
                                  elem_id="download-repo", scale=4)
            file_box = gr.Textbox(label="Specific file (optional)", placeholder="e.g. model.Q4_K_M.gguf",
                                  elem_id="download-file", scale=2)
        with gr.Row():
            branches_btn = gr.Button("List branches", elem_id="download-list-branches", scale=0, min_width=140)
            branch_dd = gr.Dropdown(label="Branch", choices=[], value=None, allow_custom_value=True,
                                    elem_id="download-branch", scale=3)
            files_btn = gr.Button("Get file list", elem_id="download-list-files", scale=0, min_width=140)
        with gr.Row():
            download_btn = gr.Button("Download", variant="primary", elem_id="download-start")
            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="download-cancel")
        progress_box = gr.HTML(IDLE_PROGRESS, elem_id="download-progress")
        status_md = gr.Markdown("", elem_id="download-status")
        files_md = gr.Markdown("", elem_id="download-files")
        card_md = gr.Markdown("", elem_id="download-card")

    def on_list_branches(repo_text: str):
        try:
            ref = parse_repo_spec(repo_text)
            names = list_branches(ref)
        except HubError as exc:
            return gr.update(), f"⚠️ {exc}"
        chosen = ref.branch if ref.branch in names else names[0] if names else None
        return gr.update(choices=names, value=chosen), f"{ref.repo_id}: {len(names)} branches"

    def on_list_files(repo_text: str, branch: str | None, file: str | None):
        try:
            ref = _ref_from_inputs(repo_text, branch, file)
            plan = plan_download(ref, state.models_dir)
        except ChoiceNeeded as exc:   # several GGUF models in the branch: show them by quant type to pick from
            try:
                return _gguf_table(ref, group_by_quant(list_files(ref).files)), f"⚠️ {exc}"
            except HubError:
                return "", _choice_message(exc)
        except HubError as exc:
            return "", f"⚠️ {exc}"
        return _file_table(plan), ""

    def on_download(repo_text: str, branch: str | None, file: str | None,
                    request: gr.Request) -> Iterator[tuple[str, str, str]]:
        try:
            ref = _ref_from_inputs(repo_text, branch, file)
        except HubError as exc:
            yield IDLE_PROGRESS, f"⚠️ {exc}", ""
            return
        # The session names the handle's owner, so Cancel reaches this session's oldest download.
        run = state.downloads.submit(_download_work(ref, state.models_dir),
                                     getattr(request, "session_hash", None) or "default")
        latest: DownloadProgress | None = None
        result: DownloadResult | None = None
        error: Exception | None = None
        try:   # closing the run (page left, event cancelled) cancels the download; its bytes stay
            yield IDLE_PROGRESS, f"Downloading **{ref}**…", ""
            for event in run:
                if isinstance(event, DownloadProgress):
                    latest = event
                    yield progress_html(latest), f"Downloading **{ref}**…", ""
                elif isinstance(event, DownloadResult):
                    result = event
        except Exception as exc:  # shown to the user below; HubError carries a readable sentence
            error = exc
        finally:
            run.close()
        final_progress = progress_html(latest) if latest is not None else IDLE_PROGRESS
        if isinstance(error, ChoiceNeeded):
            yield final_progress, _choice_message(error), ""
        elif isinstance(error, HubError):
            yield final_progress, f"⚠️ {error}", ""
        elif error is not None:
            yield final_progress, f"⚠️ Unexpected error: {type(error).__name__}: {error}", ""
        elif result is None:   # cancelled before the download started
            yield final_progress, "Cancelled before the download started.", ""
        else:
            what = "was already downloaded" if result.already_present else "downloaded and verified"
            summary = summarize_model_folder(result.path, result.ref.branch)
            note = f"\n\nℹ️ {result.note}" if result.note else ""
            yield (final_progress,
                   f"✅ **{result.ref}** {what}: {len(result.files)} files, "
                   f"{human_size(sum(f.size for f in result.files))}, commit `{result.commit[:12]}` → "
                   f"`{result.path.name}`{note}",
                   f"### Model card\n{summary.as_markdown(result.ref.branch)}")

    def on_cancel(request: gr.Request) -> str:
        if not state.downloads.stop(getattr(request, "session_hash", None) or "default"):
            return "No download is running."
        return "Cancelling… the bytes so far are kept; press Download again to resume."

    branches_btn.click(on_list_branches, [repo_box], [branch_dd, status_md], api_name="download_list_branches")
    files_btn.click(on_list_files, [repo_box, branch_dd, file_box], [files_md, status_md],
                    api_name="download_list_files")
    download_event = download_btn.click(on_download, [repo_box, branch_dd, file_box],
                                        [progress_box, status_md, card_md], api_name="download_start")
    cancel_btn.click(on_cancel, None, [status_md], api_name="download_cancel", queue=False)

    def on_files_on_disk(repo_text: str, branch: str | None, file: str | None, shown: str):
        """After a download ends (a Cancel included), a file table on screen shows what is on disk now."""
        return on_list_files(repo_text, branch, file)[0] if shown else gr.skip()

    download_event.then(on_files_on_disk, [repo_box, branch_dd, file_box, files_md], [files_md],
                        api_visibility="private", queue=False)   # quick: skips the queue (ui/model_tab.py says why)
    _chain_model_refresh(state, download_event, on_models_changed)
    return {"repo": repo_box, "branch": branch_dd, "file": file_box, "status": status_md, "card": card_md,
            "progress": progress_box, "download_event": download_event}


def _chain_model_refresh(state, event, on_models_changed: Any) -> None:
    if on_models_changed is None:
        return
    if isinstance(on_models_changed, tuple) and len(on_models_changed) == 2 and callable(on_models_changed[0]):
        fn, outputs = on_models_changed
        event.then(fn, None, outputs, api_visibility="private", queue=False)
        return
    dropdowns = on_models_changed if isinstance(on_models_changed, (list, tuple)) else [on_models_changed]

    def refreshed():
        names = state.list_models()
        updates = [gr.update(choices=names) for _ in dropdowns]
        return updates[0] if len(updates) == 1 else updates

    event.then(refreshed, None, list(dropdowns), api_visibility="private", queue=False)
