"""Serving a model: the OpenAI-compatible API (`api.py`) and the web page (`page.py`)."""
