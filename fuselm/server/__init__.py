"""fuselm's OpenAI-compatible HTTP server (`fuselm serve`); needs the `server` extra (FastAPI, uvicorn)."""
