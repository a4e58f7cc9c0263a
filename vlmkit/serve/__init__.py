"""An OpenAI-compatible HTTP server for vlmkit models (`vlmkit serve`), with continuous batching.

- `protocol`: Chat Completions requests parsed and checked field by field; response bodies.
- `errors`: `APIError`, the OpenAI error body.
- `images`: images from data URLs (or, when allowed, http(s) URLs) with size, pixel and time limits.
- `text`: incremental detokenization with stop strings.
- `scheduler`: the thread that owns the model and runs the continuous decode batch.
- `engine`: a loaded model + tokenizer: requests -> prompts -> scheduler jobs.
- `app`: the FastAPI application (needs the `[serve]` extra) and the web page in `static/`.
"""
