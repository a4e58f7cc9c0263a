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

`--quantize int8` runs the LM's linear layers in int8 (weights only); `--speculative ngram` drafts tokens
from the prompt and checks them in one forward (the same greedy answer, sooner). See README "Inference speed".
"""

from __future__ import annotations

import argparse

from vlmkit.commands.inference_options import add_inference_options


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
    add_inference_options(p)


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
    if args.speculative is not None and args.temperature > 0:
        raise UserError("--speculative decodes greedily: leave --temperature at 0")
    model, tokenizer, model_dir = load_for_inference(args.model_dir, resolve_device(args.device), args.quantize)
    if (args.image or args.video) and not isinstance(model, VisionLanguageModel):
        raise UserError(f"{model_dir} is a language model without a vision tower: --image and --video need a VLM")
    answerer = Answerer(model, tokenizer, batch_size=1, max_new_tokens=args.max_new_tokens,
                        precision=args.precision, temperature=args.temperature, top_p=args.top_p,
                        speculative=args.speculative)
    torch.manual_seed(args.seed)
    if args.video:
        print(answerer.answer_records([{"video": args.video, "question": args.question}], ".")[0])
        return 0
    images = [answerer.processor.preprocess(load_image(path)) for path in args.image]
    print(answerer.answer([args.question], [images])[0])
    return 0
