import pytest

from vlmkit.data.chat import ChatFormat, ConversationError
from vlmkit.data.tokenizer import IMAGE_TOKEN, Tokenizer, train_tokenizer
from vlmkit.models.language import IGNORE_INDEX

LLAVA_RECORD = {
    "image": "x.png",
    "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the square?"},
        {"from": "gpt", "value": "green"},
        {"from": "human", "value": "how many objects?"},
        {"from": "gpt", "value": "three"},
    ],
}

MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nwhat color is the square?"}]},
    {"role": "assistant", "content": "green"},
    {"role": "user", "content": "how many objects?"},
    {"role": "assistant", "content": [{"type": "text", "text": "three"}]},
]


def test_tokenizer_special_tokens_are_single_ids(tokenizer):
    for tok in ("<|im_start|>", "<|im_end|>", IMAGE_TOKEN, "<|endoftext|>"):
        assert len(tokenizer.encode(tok)) == 1
    assert tokenizer.pad_id == 0
    text = "where is the purple triangle? <box>120,40,300,210</box>"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_save_load_roundtrip(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode("a red star é✓") == tokenizer.encode("a red star é✓")  # byte-level: no unknowns
    assert (loaded.image_id, loaded.eos_id, loaded.pad_id) == (tokenizer.image_id, tokenizer.eos_id, tokenizer.pad_id)


def test_two_turn_label_mask_token_by_token(tokenizer):
    chat = ChatFormat(tokenizer, image_tokens=3)
    enc = chat.encode(LLAVA_RECORD)
    t = tokenizer
    header = lambda role: [t.im_start_id] + t.encode(f"{role}\n")  # noqa: E731
    nl = t.encode("\n")
    user1 = header("user") + [t.image_id] * 3 + t.encode("\nwhat color is the square?") + [t.eos_id] + nl
    asst1_body = t.encode("green") + [t.eos_id]
    user2 = header("user") + t.encode("how many objects?") + [t.eos_id] + nl
    asst2_body = t.encode("three") + [t.eos_id]
    h = header("assistant")
    expected_ids = user1 + h + asst1_body + nl + user2 + h + asst2_body + nl
    expected_labels = (
        [IGNORE_INDEX] * len(user1) + [IGNORE_INDEX] * len(h) + asst1_body + [IGNORE_INDEX] * len(nl)
        + [IGNORE_INDEX] * len(user2) + [IGNORE_INDEX] * len(h) + asst2_body + [IGNORE_INDEX] * len(nl)
    )
    assert enc.input_ids == expected_ids
    assert enc.labels == expected_labels
    assert enc.num_images == 1
    # Supervised tokens decode to exactly the assistant answers plus their end-of-turn markers.
    supervised = [x for x in enc.labels if x != IGNORE_INDEX]
    assert tokenizer.decode(supervised, skip_special_tokens=False) == "green<|im_end|>three<|im_end|>"


def test_llava_record_and_messages_encode_identically(tokenizer):
    chat = ChatFormat(tokenizer, image_tokens=4)
    a, b = chat.encode(LLAVA_RECORD), chat.encode(MESSAGES)
    assert a.input_ids == b.input_ids and a.labels == b.labels


def test_image_expands_to_connector_token_count(tokenizer):
    chat = ChatFormat(tokenizer, image_tokens=7)
    enc = chat.encode([{"role": "user", "content": "<image> and <image>: same?"}], add_generation_prompt=True)
    assert enc.input_ids.count(tokenizer.image_id) == 14 and enc.num_images == 2
    assert all(x == IGNORE_INDEX for x in enc.labels)
    header = [tokenizer.im_start_id] + tokenizer.encode("assistant\n")
    assert enc.input_ids[-len(header):] == header


def test_system_prompt_is_prepended_and_masked(tokenizer):
    chat = ChatFormat(tokenizer, image_tokens=1, system_prompt="be brief")
    enc = chat.encode(MESSAGES)
    assert enc.input_ids[: len(tokenizer.encode("system\n")) + 1] == [tokenizer.im_start_id] + tokenizer.encode(
        "system\n")
    assert tokenizer.decode([x for x in enc.labels if x != IGNORE_INDEX]) == "greenthree"


@pytest.mark.parametrize("bad,match", [
    ({"conversations": [{"from": "robot", "value": "hi"}]}, "unknown role 'robot'"),
    ({"image": "x.png"}, "no 'conversations'"),
    ([{"role": "user"}], "needs 'role' and 'content'"),
    ([{"role": "user", "content": [{"type": "video"}]}], "neither image nor text"),
    ([{"role": "assistant", "content": "<image>"}], "assistant message cannot contain an image"),
])
def test_malformed_conversations_raise_clear_errors(tokenizer, bad, match):
    with pytest.raises(ConversationError, match=match):
        ChatFormat(tokenizer, image_tokens=2).encode(bad)


def test_train_tokenizer_respects_vocab_size():
    tok = train_tokenizer(["hello world"] * 10 + ["abc def ghi"] * 10, vocab_size=280)
    assert tok.vocab_size <= 280
    assert tok.decode(tok.encode("hello abc")) == "hello abc"
