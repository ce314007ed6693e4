"""Hearth's OpenAI-compatible HTTP API (FastAPI), served beside the UI by `python app.py serve --api`."""
