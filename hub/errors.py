"""Errors of hub/: each str() is one sentence a user can act on, so the UI and CLI print it as is."""
from __future__ import annotations


class HubError(RuntimeError):
    """Base of every error hub/ raises on purpose."""


class InvalidRepoSpec(HubError):
    """What the user typed is not a repo, branch or file name the Hub allows."""


class RepoNotFound(HubError):
    pass


class RevisionNotFound(HubError):
    pass


class EntryNotFound(HubError):
    pass


class GatedRepo(HubError):
    pass


class NetworkError(HubError):
    """The server could not be reached or kept failing after every retry."""


class DiskSpaceError(HubError):
    pass


class VerifyError(HubError):
    """A file's bytes did not match the hash the Hub reports for it, even after fetching it again."""


class UnsafePath(HubError):
    """A Hub-supplied file name would write outside the model folder."""


class UnstorableName(HubError):
    """A file name the repo lists cannot be stored here (too long, or a file that is also a folder)."""


class SizeMismatch(HubError):
    """The server sent (or announced) a different number of bytes than the repo listing gives for a file."""


class ChoiceNeeded(HubError):
    """The repo holds several candidates (e.g. GGUF files) and the user has to pick one."""

    def __init__(self, message: str, choices: list[str]):
        super().__init__(message)
        self.choices = choices


class DownloadCancelled(HubError):
    pass


TOKEN_HINT = ("set the environment variable HF_TOKEN to an access token from "
              "https://huggingface.co/settings/tokens (or run `hf auth login`) and accept the model's terms "
              "on its Hub page")
