"""VLMProcessor: each image expands to its own token count; images of several sizes share a batch."""

import pytest
import torch
from PIL import Image

from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.chat import ChatFormat, ConversationError
from vlmkit.data.collate import collate
from vlmkit.data.processor import VLMProcessor
from vlmkit.eval.generation import Answerer
from vlmkit.models.language import LanguageModel
from vlmkit.models.vlm import ImagePlaceholderError, VisionLanguageModel

ONE_IMAGE = {"conversations": [{"from": "human", "value": "<image>\nwhat color is the square?"},
                               {"from": "gpt", "value": "green"}]}
TWO_IMAGES = {"conversations": [{"from": "human", "value": "<image> and <image>: same?"},
                                {"from": "gpt", "value": "no"}]}

# Tokens of a 32 px and a 48 px image (patch 8: 4x4 and 6x6 grids) for each tower/connector variant.
VARIANTS = {
    "mlp2x_gelu": ({}, 16, 36),
    "pixel_shuffle": ({"connector": {"name": "pixel_shuffle"}}, 4, 9),
    "conv_stem": ({"vision": {"stem": "conv"}}, 16, 36),
    "keep_cls": ({"vision": {"keep_cls": True}}, 17, 37),
}


def picture(seed: int, size: int = 40) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())


def sample(processor: VLMProcessor, conversation: dict, images: list[torch.Tensor]) -> dict:
    """A `ConversationDataset`-like sample whose images may differ in size."""
    enc = processor.encode(conversation, image_sizes=[tuple(x.shape[-2:]) for x in images])
    return {"input_ids": torch.tensor(enc.input_ids), "labels": torch.tensor(enc.labels), "pixel_values": images,
            "num_images": len(images)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_image_sizes_in_one_batch_match_each_sample_alone(make_config, tokenizer, variant):
    overrides, small, large = VARIANTS[variant]
    torch.manual_seed(0)
    model = VisionLanguageModel(make_config(**overrides)).eval()
    processor = VLMProcessor.for_model(model, tokenizer)
    assert (processor.image_tokens(32, 32), processor.image_tokens(48, 48)) == (small, large)
    assert processor.image_tokens(32, 32) == model.tokens_per_image  # the configured size

    a32, b48, c32 = (processor.preprocess(picture(1)), processor.preprocess(picture(2), size=48),
                     processor.preprocess(picture(3)))
    assert (a32.shape, b48.shape) == ((3, 32, 32), (3, 48, 48))
    samples = [sample(processor, ONE_IMAGE, [a32]), sample(processor, TWO_IMAGES, [b48, c32])]
    enc = processor.encode(TWO_IMAGES, image_sizes=[(48, 48), (32, 32)])
    assert enc.image_tokens == [large, small] and enc.num_images == 2
    assert enc.input_ids.count(tokenizer.image_id) == large + small
    assert samples[0]["input_ids"].eq(tokenizer.image_id).sum() == small

    batch = collate(samples, tokenizer.pad_id)
    assert isinstance(batch["pixel_values"], list)
    assert [tuple(x.shape) for x in batch["pixel_values"]] == [(3, 32, 32), (3, 48, 48), (3, 32, 32)]

    with torch.no_grad():
        together = model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"],
                         image_counts=batch["image_counts"])
        alone = [model(s["input_ids"][None], s["pixel_values"], labels=s["labels"][None]) for s in samples]
        # Reading order inside a row: the 48 px image's tokens first, then the 32 px image's.
        row = model.embed(samples[1]["input_ids"][None], samples[1]["pixel_values"])[0]
        expected = torch.cat([model.encode_images(b48[None])[0], model.encode_images(c32[None])[0]])
    assert torch.allclose(row[samples[1]["input_ids"] == tokenizer.image_id], expected, atol=1e-6)
    for i, (s, out) in enumerate(zip(samples, alone)):
        n = len(s["input_ids"])
        assert torch.allclose(together.logits[i, :n], out.logits[0], atol=1e-5)
    supervised = [int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in samples]
    mean = sum(out.loss * k for out, k in zip(alone, supervised)) / sum(supervised)
    assert torch.allclose(together.loss, mean, atol=1e-5)


def test_answerer_takes_images_of_several_sizes(tiny_model, tokenizer):
    processor = VLMProcessor.for_model(tiny_model, tokenizer)
    images = [processor.preprocess(picture(4)), processor.preprocess(picture(5), size=48)]
    questions = ["what color is the square?", "how many?"]
    answerer = Answerer(tiny_model, tokenizer, batch_size=4, max_new_tokens=5, precision="fp32")
    together = answerer.answer(questions, images)
    assert together == [answerer.answer([q], [img])[0] for q, img in zip(questions, images)]


def test_fixed_size_path_gives_todays_ids_labels_and_batches(tiny_model, tokenizer):
    processor = VLMProcessor.for_model(tiny_model, tokenizer, system_prompt="be brief")
    chat = ChatFormat(tokenizer, tiny_model.tokens_per_image, system_prompt="be brief")
    for conversation, n in ((ONE_IMAGE, 1), (TWO_IMAGES, 2)):
        old = chat.encode(conversation)
        for new in (processor.encode(conversation), processor.encode(conversation, image_sizes=[(32, 32)] * n)):
            assert (new.input_ids, new.labels, new.num_images) == (old.input_ids, old.labels, old.num_images)
            assert new.image_tokens == [tiny_model.tokens_per_image] * new.num_images
    assert processor.prompt("how many?").input_ids == chat.prompt("how many?").input_ids
    assert processor.prompt("how many?", image_size=(32, 32)).input_ids == chat.prompt("how many?").input_ids
    assert processor.end_of_turn_id == chat.end_of_turn_id

    pixels = [torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    samples = [{"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, 2]), "pixel_values": p,
                "num_images": len(p)} for p in pixels]
    stacked = collate(samples, tokenizer.pad_id)["pixel_values"]
    assert torch.is_tensor(stacked) and torch.equal(stacked, torch.cat(pixels))  # the fast path, unchanged


def test_text_only_processor_rejects_images(make_config, tokenizer):
    lm = LanguageModel(make_config().lm)
    for processor in (VLMProcessor.for_model(lm, tokenizer), VLMProcessor.text_only(tokenizer)):
        assert not processor.has_vision
        text = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]
        assert processor.encode(text).input_ids == ChatFormat(tokenizer).encode(text).input_ids
        assert processor.prompt("hi", with_image=False).input_ids == ChatFormat(tokenizer).prompt(
            "hi", with_image=False).input_ids
        with pytest.raises(ConversationError, match="no vision tower: a conversation with an image cannot be encoded"):
            processor.encode(ONE_IMAGE)
        with pytest.raises(ValueError, match="no vision tower: it takes no images"):
            processor.preprocess(picture(6))
        with pytest.raises(ValueError, match="no vision tower: it takes no images"):
            processor.encode(ONE_IMAGE, image_sizes=[(32, 32)])
        with pytest.raises(ValueError, match="no vision tower"):
            processor.image_tokens(32, 32)


def test_mismatched_placeholders_name_the_numbers(tiny_model, tokenizer):
    processor = VLMProcessor.for_model(tiny_model, tokenizer)
    small, large = torch.randn(3, 32, 32), torch.randn(3, 48, 48)
    rows = [processor.encode(ONE_IMAGE, image_sizes=[(48, 48)]).input_ids, processor.encode(ONE_IMAGE).input_ids]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_id] * (width - len(r)) for r in rows])  # 36 + 16 placeholders
    tiny_model.embed(ids, [large, small], image_counts=[1, 1])  # right
    with pytest.raises(ImagePlaceholderError,
                       match=r"sample 0 has 36 image placeholder tokens but 1 image\(s\) of 16 tokens = 16 were"):
        tiny_model.embed(ids, [small, large], image_counts=[1, 1])
    with pytest.raises(ImagePlaceholderError,
                       match=r"the batch has 52 image placeholder tokens but 3 image\(s\) of 36 \+ 16 \+ 16 tokens "
                             r"= 68; each <image> must expand to its own image's token count"):
        tiny_model.embed(ids, [large, small, small])
    with pytest.raises(ImagePlaceholderError, match=r"but 2 image\(s\) x 16 tokens per image = 32"):
        tiny_model.embed(ids, torch.stack([small, small]))
    with pytest.raises(ImagePlaceholderError, match=r"image_counts add up to 1 image\(s\) but 2 were given"):
        tiny_model.embed(ids, [large, small], image_counts=[1, 0])
    with pytest.raises(ConversationError, match=r"has 1 image\(s\) but 2 image token count\(s\)"):
        processor.encode(ONE_IMAGE, image_sizes=[(32, 32), (48, 48)])


def test_sizes_the_tower_cannot_take_are_clear_errors(make_config, tokenizer):
    processor = VLMProcessor.for_model(VisionLanguageModel(make_config()), tokenizer)
    with pytest.raises(ValueError, match="image size 30x32 is not a multiple of the patch size 8"):
        processor.image_tokens(30, 32)
    shuffle = VLMProcessor.for_model(VisionLanguageModel(make_config(connector={"name": "pixel_shuffle"})), tokenizer)
    assert shuffle.image_tokens(32, 48) == 6  # non-square: 4x6 patches, 2x3 tokens
    with pytest.raises(ValueError, match="patch grid 5x5 is not divisible by downsample 2"):
        shuffle.image_tokens(40, 40)
