"""`vlmkit serve MODEL_DIR`: an OpenAI-compatible HTTP server (Chat Completions, streaming) with continuous
batching, and a web page at `/` to ask a model about a picture. Needs the `[serve]` extra.

MODEL_DIR is what `vlmkit chat` takes: a vlmkit model or training run directory, or a Hugging Face
language-model directory (text only).
"""

from __future__ import annotations

import argparse

INSTALL = "pip install 'vlmkit[serve]'"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a model directory, a training run directory, or an HF language model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV-cache slots)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more are answered 429 with Retry-After")
    p.add_argument("--max-images", type=int, default=4, help="images per request")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (20 MB, 10 s per image); off: only data: URLs")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the directory's name)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    from vlmkit.cli import UserError

    try:
        import uvicorn

        from vlmkit.serve.app import create_app
    except ImportError as err:
        raise UserError(f"vlmkit serve needs the [serve] extra ({err.name} is missing): {INSTALL}") from None
    from vlmkit.serve.engine import Engine
    from vlmkit.serve.images import ImageLimits

    for name in ("max_batch", "max_images"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {args.max_queue}")
    engine = Engine.from_dir(args.model_dir, device=args.device, model_id=args.model_name, max_batch=args.max_batch,
                             max_queue=args.max_queue, max_images=args.max_images, precision=args.precision)
    app = create_app(engine, ImageLimits(allow_remote=args.allow_remote_images))
    print(f"serving {engine.model_id} on http://{args.host}:{args.port}/ (OpenAI API at /v1, web page at /)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
