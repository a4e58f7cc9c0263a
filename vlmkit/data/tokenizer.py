"""Byte-level BPE tokenizer (HF `tokenizers`) with the special tokens the chat format needs."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN]
CONFIG_FILE = "tokenizer_config.json"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of the pad, end-of-turn and image tokens."""

    def __init__(self, backend: Backend, pad_token: str = PAD_TOKEN, eos_token: str = IM_END,
                 image_token: str = IMAGE_TOKEN, im_start: str = IM_START):
        self.backend = backend
        self.pad_token, self.eos_token, self.image_token, self.im_start = pad_token, eos_token, image_token, im_start
        missing = [t for t in (pad_token, eos_token, image_token, im_start) if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special token(s) {missing}")
        self.pad_id = backend.token_to_id(pad_token)
        self.eos_id = backend.token_to_id(eos_token)
        self.image_id = backend.token_to_id(image_token)
        self.im_start_id = backend.token_to_id(im_start)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"pad_token": self.pad_token, "eos_token": self.eos_token,
                  "image_token": self.image_token, "im_start_token": self.im_start}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        config_path = directory / CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        return cls(Backend.from_file(str(path)),
                   pad_token=config.get("pad_token", PAD_TOKEN), eos_token=config.get("eos_token", IM_END),
                   image_token=config.get("image_token", IMAGE_TOKEN), im_start=config.get("im_start_token", IM_START))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on `texts` (any iterator of strings) for a from-scratch model.

    Byte-level means every string is encodable (no unknown token); the special tokens get the
    first ids, so `<|endoftext|>` = 0 is the pad id.
    """
    backend = Backend(models.BPE())
    # Digits are split one by one (as Llama does): box coordinates then share ten well-trained
    # digit embeddings instead of a thousand rarely seen number tokens.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
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
