"""Answerer: images shared by several questions go through the vision tower once, same answers."""

import torch

from vlmkit.eval.generation import Answerer


def test_shared_images_are_encoded_once_with_unchanged_answers(tiny_model, tokenizer):
    torch.manual_seed(0)
    images = [torch.randn(3, 32, 32) for _ in range(3)]
    questions = ["what color is the square?", "is there a red star?", "how many objects are there?"] * 3
    shared = [images[i % 3] for i in range(9)]
    copies = [img.clone() for img in shared]  # equal pixels, distinct tensors: encoded one by one
    answerer = Answerer(tiny_model, tokenizer, batch_size=4, max_new_tokens=5, precision="fp32")
    encoded_rows = []
    encode = tiny_model.encode_images

    def counting(pixels):
        encoded_rows.append(pixels.shape[0])
        return encode(pixels)

    tiny_model.encode_images = counting
    try:
        with_sharing = answerer.answer(questions, shared)
        assert sum(encoded_rows) == 3  # across three batches of up to four questions
        encoded_rows.clear()
        without = answerer.answer(questions, copies)
        assert sum(encoded_rows) == 9
    finally:
        del tiny_model.encode_images
    assert with_sharing == without
    assert answerer.answer(["is there a red star?"], [None]) == answerer.answer(["is there a red star?"], [None])
