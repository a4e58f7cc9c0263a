"""Tokenizers: our byte-level BPE (trained here) or a pretrained model's, in Hugging Face format.

A tokenizer directory holds `tokenizer.json` (the `tokenizers` backend) and `tokenizer_config.json`
(special tokens and the chat template, HF's format; transformers >= 4.43 may keep the template in
`chat_template.jinja` instead). Ours are written in that format too, so transformers can read them.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN]
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"

# ChatML, the template of our own tokenizers (and of SmolLM2, Qwen2 and others).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its special tokens and chat template.

    `eos_token` ends a turn in generation; `pad_token` defaults to it. The `<image>` placeholder may
    be missing from a pretrained tokenizer (`image_id` is then None); `add_image_token` adds it.
    """

    def __init__(self, backend: Backend, pad_token: str | None = PAD_TOKEN, eos_token: str = IM_END,
                 image_token: str = IMAGE_TOKEN, bos_token: str | None = None, chat_template: str | None = None,
                 extra_config: dict[str, Any] | None = None):
        self.backend = backend
        self.eos_token, self.bos_token, self.image_token = eos_token, bos_token, image_token
        self.pad_token = pad_token or eos_token
        self.chat_template = chat_template or CHATML_TEMPLATE
        self.extra_config = dict(extra_config or {})  # other tokenizer_config.json keys, written back on save
        named = (self.pad_token, eos_token, bos_token)
        missing = [t for t in named if t is not None and backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special token(s) {missing}")
        self.pad_id = backend.token_to_id(self.pad_token)
        self.eos_id = backend.token_to_id(eos_token)

    @property
    def image_id(self) -> int | None:
        return self.backend.token_to_id(self.image_token)

    @property
    def im_start_id(self) -> int | None:
        """ChatML's turn-start token, where the vocabulary has it."""
        return self.backend.token_to_id(IM_START)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def special_ids(self) -> set[int]:
        return {i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special}

    def add_image_token(self) -> bool:
        """Add the `<image>` placeholder as a special token (at the end of the vocabulary) when missing."""
        if self.image_id is not None:
            return False
        self.backend.add_special_tokens([AddedToken(self.image_token, special=True, normalized=False)])
        return True

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (HF format, chat template included)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.extra_config,
                  "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                  "image_token": self.image_token, "chat_template": self.chat_template}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        config_path = directory / CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_path = directory / TEMPLATE_FILE
        template = template_path.read_text() if template_path.is_file() else _default_template(config, config_path)
        eos = _token(config.get("eos_token")) or IM_END
        # Keys the HF tokenizer class reads that we neither use nor must keep in step with the vocabulary.
        extra = {k: v for k, v in config.items() if k not in (
            "bos_token", "eos_token", "pad_token", "image_token", "chat_template", "im_start_token",
            "added_tokens_decoder", "extra_special_tokens")}
        try:
            return cls(Backend.from_file(str(path)), pad_token=_token(config.get("pad_token")), eos_token=eos,
                       image_token=_image_token(config), bos_token=_token(config.get("bos_token")),
                       chat_template=template, extra_config=extra)
        except ValueError as err:
            raise ValueError(f"{directory}: {err}") from None


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _image_token(config: dict[str, Any]) -> str:
    extra = config.get("extra_special_tokens")
    named = extra.get("image_token") if isinstance(extra, dict) else None
    return _token(config.get("image_token")) or _token(named) or IMAGE_TOKEN


def _default_template(config: dict[str, Any], source: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(f"{source}: chat_template has no 'default' entry (has {sorted(named)})")
        template = named["default"]
    return template


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2,
                    split_digits: bool = True) -> Tokenizer:
    """Train a byte-level BPE on `texts` (any iterator of strings) for a from-scratch model.

    Byte-level means every string is encodable (no unknown token); the special tokens get the
    first ids, so `<|endoftext|>` = 0 is the pad id.

    `split_digits` (as Llama does) gives every digit its own token: box coordinates then share ten
    digit embeddings. Without it a run of digits is one word to BPE, so numbers that are frequent in
    `texts` become single tokens (as location tokens in PaliGemma or Florence-2): a coordinate is then
    one choice among ordered classes, which a small model learns to read and write far more easily.
    """
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=split_digits),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The chat template's role headers are always in the corpus, so each is one or two tokens.
    chat_roles = ["system\n", "user\n", "assistant\n"] * 100
    backend.train_from_iterator(itertools.chain(chat_roles, texts), trainer=trainer)
    return Tokenizer(backend)
