"""The OpenAI-compatible HTTP server (`ember serve`).

Its modules import fastapi, uvicorn, pydantic and prometheus-client, which are optional
(`pip install ember[server]`); nothing outside this package imports them, so the engine
core runs without them. Only `ember.server.cli` is imported by `ember`'s command line,
and it defers those imports until `serve` actually runs.
"""
