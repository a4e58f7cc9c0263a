"""`vlmkit chat MODEL_DIR [--image PATH ... | --video PATH] "question"`: one answer from a trained VLM or an LM.

MODEL_DIR is a vlmkit model or training run directory, or a Hugging Face language-model directory
(Llama / Qwen2 with its tokenizer), which answers text-only questions with its own chat template.

`--image` may be repeated: the question is then about several images, in the order given. They go
before the question, one line each (the layout shapes-world's two-image records are trained on),
unless the question holds `<image>` tags, one per image, which place them in the text instead:
``--image a.png --image b.png "Compare <image> with <image>."``.

`--video` (a directory of frames, or a video file) asks about a clip instead: the model's
`model.video` settings choose the frames, shown as "Frame 1: <image>" lines before the question (or
where the question's `<video>` tag is).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a model directory, a training run directory, or an HF language model directory")
    p.add_argument("question")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file the question is about; repeat for several (in order)")
    p.add_argument("--video", metavar="PATH", help="a clip the question is about: a directory of frames or a video "
                                                   "file (.gif; others need pip install 'vlmkit[video]')")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    import torch

    from vlmkit.cli import UserError
    from vlmkit.data.images import load_image
    from vlmkit.device import resolve_device
    from vlmkit.eval.generation import Answerer
    from vlmkit.hf.pretrained import load_for_inference
    from vlmkit.models.vlm import VisionLanguageModel

    if args.image and args.video:
        raise UserError("give --image or --video, not both")
    model, tokenizer, model_dir = load_for_inference(args.model_dir, resolve_device(args.device))
    if (args.image or args.video) and not isinstance(model, VisionLanguageModel):
        raise UserError(f"{model_dir} is a language model without a vision tower: --image and --video need a VLM")
    answerer = Answerer(model, tokenizer, batch_size=1, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p)
    torch.manual_seed(args.seed)
    if args.video:
        print(answerer.answer_records([{"video": args.video, "question": args.question}], ".")[0])
        return 0
    images = [answerer.processor.preprocess(load_image(path)) for path in args.image]
    print(answerer.answer([args.question], [images])[0])
    return 0
