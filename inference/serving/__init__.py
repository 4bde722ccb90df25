"""The OpenAI-compatible server, run as `python -m inference.serve` (inference/serve.py calls app.main).

    app.py          the HTTP server (FastAPI + uvicorn): endpoints, streaming, /metrics, shutdown, the CLI
    protocol.py     the body of POST /v1/completions (pydantic) and the error messages a bad one gets
    scheduler.py    step-level continuous batching: every request's rows stepped together in one thread
    playground.html the page at GET /
"""
