"""A served model: the loaded model and tokenizer, chat requests turned into prompts, and the scheduler.

A vlmkit VLM takes text and images; a Hugging Face language-model directory (as `vlmkit chat` loads it)
takes text only. Prompts use the tokenizer's chat template, with each image part written as the
`<image>` tag on a line of its own (the layout of the training records: ``"<image>\\nWhat ..."``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from vlmkit.data.chat import ConversationError
from vlmkit.data.processor import VLMProcessor
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.models.language import LanguageModel, LayerContext
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.serve.errors import APIError, invalid
from vlmkit.serve.protocol import ChatRequest, ImageRef
from vlmkit.serve.scheduler import Event, Job, Scheduler


class Engine:
    def __init__(self, model: VisionLanguageModel | LanguageModel, tokenizer: Tokenizer, *, model_id: str,
                 max_batch: int = 8, max_queue: int = 64, max_images: int = 4, precision: str = "bf16"):
        self.model, self.tokenizer, self.model_id = model.eval(), tokenizer, model_id
        self.processor = VLMProcessor.for_model(model, tokenizer)
        self.max_images = max_images if self.processor.has_vision else 0
        self.lm = model.lm if isinstance(model, VisionLanguageModel) else model
        self.context_length = self.lm.config.max_position_embeddings
        self.scheduler = Scheduler(self.lm, self._embedder(), eos_id=self.processor.end_of_turn_id,
                                   pad_id=tokenizer.pad_id, max_batch=max_batch, max_queue=max_queue,
                                   max_length=self.context_length, precision=precision)

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "auto", model_id: str | None = None, **kwargs) -> Engine:
        from vlmkit.device import resolve_device
        from vlmkit.hf.pretrained import load_for_inference

        model, tokenizer, path = load_for_inference(model_dir, resolve_device(device))
        name = path.parent.name if path.name == "model" else path.name  # a run directory's final model
        return cls(model, tokenizer, model_id=model_id or name, **kwargs)

    def _embedder(self) -> Callable[..., tuple[torch.Tensor, LayerContext | None]]:
        model = self.model
        if not isinstance(model, VisionLanguageModel):
            return lambda ids, mask, images, counts: (model.embed_tokens(ids), None)

        def embed(ids, mask, images, counts):
            fused = model.fuse(ids, images or None, counts)
            return fused.inputs_embeds, fused.context

        return embed

    def preprocess(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        return [self.processor.preprocess(image) for image in images]

    def check_image_count(self, refs: Sequence[ImageRef]) -> None:
        if refs and not self.processor.has_vision:
            raise invalid(f"'{refs[0].param}': {self.model_id} is a language model without a vision tower: it takes "
                          "no images", refs[0].param, "images_not_supported")
        if len(refs) > self.max_images:
            raise invalid(f"the request holds {len(refs)} images; this server takes at most {self.max_images} per "
                          "request (--max-images)", refs[self.max_images].param, "too_many_images")

    def job(self, request: ChatRequest, pixels: Sequence[torch.Tensor], notify: Callable[[Event], None]) -> Job:
        """The scheduler job for a checked request whose images are decoded and preprocessed (`pixels`, in
        reading order); a 400 if the prompt does not fit the context."""
        prompt = self.prompt_ids(request, pixels)
        room = self.context_length - len(prompt)
        if room < 1:
            raise invalid(f"This model's maximum context length is {self.context_length} tokens. However, your "
                          f"messages resulted in {len(prompt)} tokens{self._image_note(pixels)}. Please reduce the "
                          "length of the messages.", "messages", "context_length_exceeded")
        max_tokens = request.max_tokens if request.max_tokens is not None else room
        if max_tokens > room:
            raise invalid(f"This model's maximum context length is {self.context_length} tokens. However, you "
                          f"requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the messages"
                          f"{self._image_note(pixels)}, {max_tokens} in the completion). Please reduce the length of "
                          "the messages or completion.", "max_tokens", "context_length_exceeded")
        return Job(prompt, pixels, max_tokens, self.tokenizer.decode, notify, temperature=request.temperature,
                   top_p=request.top_p, seed=request.seed, stop=request.stop)

    def _image_note(self, pixels: Sequence[torch.Tensor]) -> str:
        if not pixels:
            return ""
        tokens = sum(self.processor.image_tokens(*p.shape[-2:]) for p in pixels)
        return f", of which {tokens} for {len(pixels)} image(s)"

    def prompt_ids(self, request: ChatRequest, pixels: Sequence[torch.Tensor]) -> list[int]:
        tag = self.tokenizer.image_token
        conversation = []
        for i, message in enumerate(request.messages):
            content: list[dict] = []
            for j, part in enumerate(message.parts):
                if isinstance(part, ImageRef):
                    content += [{"type": "image"}, {"type": "text", "text": "\n"}]
                elif tag in part:
                    param = message.param(i, j)
                    raise invalid(f"'{param}' contains {tag!r}, which this model reserves for images: send images as "
                                  "image_url content parts", param)
                else:
                    content.append({"type": "text", "text": part})
            conversation.append({"role": message.role, "content": content})
        sizes = [tuple(p.shape[-2:]) for p in pixels]
        try:
            encoded = self.processor.encode(conversation, add_generation_prompt=True,
                                            image_sizes=sizes if self.processor.has_vision else None)
        except ConversationError as err:
            raise invalid(f"the conversation cannot be encoded: {err}", "messages") from None
        return encoded.input_ids

    def health(self) -> dict:
        stats = self.scheduler.stats()
        return {"status": "ok" if self.scheduler.alive else "error", "model": self.model_id,
                "context_length": self.context_length, "max_images": self.max_images, **stats}


def api_error_for(event: Event) -> APIError:
    """The APIError of an `error` event."""
    return APIError(event.status, event.text, code="internal_error" if event.status == 500 else "unavailable")
