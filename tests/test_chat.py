import pytest

from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.chat import ChatFormat, ConversationError
from vlmkit.data.tokenizer import IMAGE_TOKEN, Tokenizer, train_tokenizer

from .conftest import CORPUS

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


# -- chat templates: token ids equal transformers' apply_chat_template -----------------------------

SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct's ChatML, with a default system prompt
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = (  # Meta-Llama-3-Instruct's: contents are trimmed, turns end with <|eot_id|>
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
ZEPHYR_TEMPLATE = (  # block tags on their own lines: exercises trim_blocks / lstrip_blocks
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
# name -> (template, special tokens, what the supervised tokens of CONVERSATION decode to)
TEMPLATES = {
    "chatml": (SMOLLM2_TEMPLATE, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
               " green <|im_end|>three<|im_end|>"),
    "llama3": (LLAMA3_TEMPLATE, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
               "green<|eot_id|>three<|eot_id|>"),
    "zephyr": (ZEPHYR_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"}, " green </s>three</s>"),
}
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "<image>\nwhat color is the square?"},
    {"role": "assistant", "content": " green "},  # surrounding spaces: Llama-3's template trims them
    {"role": "user", "content": "how many objects?"},
    {"role": "assistant", "content": "three"},
]


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def hf_tokenizer_dir(request, tmp_path_factory):
    """A transformers tokenizer (its own files, as save_pretrained writes them) with one chat template."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    template, specials, expected = TEMPLATES[request.param]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special_tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                      "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>",
                      "<image>"]
    backend.train_from_iterator(CORPUS + ["system user assistant answer briefly You are a helpful"] * 20,
                                trainers.BpeTrainer(vocab_size=400, special_tokens=special_tokens,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                    show_progress=False))
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **specials)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return path, ref, expected


def _hf_ids(ref, messages, **kwargs):
    out = ref.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_rendered_ids_equal_transformers_apply_chat_template(hf_tokenizer_dir):
    path, ref, _ = hf_tokenizer_dir
    chat = ChatFormat(Tokenizer.load(path), image_tokens=1)
    for n in range(1, len(CONVERSATION) + 1):
        messages = CONVERSATION[:n]
        assert chat.encode(messages).input_ids == _hf_ids(ref, messages), n
        assert chat.encode(messages, add_generation_prompt=True).input_ids == _hf_ids(
            ref, messages, add_generation_prompt=True), n
    no_system = CONVERSATION[1:]  # SmolLM2's template then adds its default system prompt
    assert chat.encode(no_system).input_ids == _hf_ids(ref, no_system)


def test_labels_cover_exactly_answers_and_end_of_turn(hf_tokenizer_dir):
    path, ref, expected = hf_tokenizer_dir
    tok = Tokenizer.load(path)
    enc = ChatFormat(tok, image_tokens=5).encode(CONVERSATION)
    supervised = [x for x in enc.labels if x != IGNORE_INDEX]
    assert tok.decode(supervised, skip_special_tokens=False) == expected
    # Supervised tokens form one contiguous run per answer, each ending with the end-of-turn token.
    runs = "".join("x" if x != IGNORE_INDEX else "." for x in enc.labels).split(".")
    assert len([r for r in runs if r]) == 2
    assert enc.num_images == 1 and enc.input_ids.count(tok.image_id) == 5
    assert ChatFormat(tok).end_of_turn_id == tok.backend.token_to_id(expected.rsplit("three")[1])


def test_builtin_chatml_equals_transformers_for_our_tokenizer(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path)
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "<image>\nwhat color is the square?"},
                {"role": "assistant", "content": "green"}]
    assert ChatFormat(tokenizer, image_tokens=1).encode(messages).input_ids == _hf_ids(ref, messages)


def test_text_only_format_refuses_images(tokenizer):
    chat = ChatFormat(tokenizer)
    assert chat.prompt("hi", with_image=False).input_ids[-1] != tokenizer.image_id
    with pytest.raises(ConversationError, match="no vision tower"):
        chat.prompt("what is this?")


def test_tokenizer_without_template_or_chatml_tokens_is_refused():
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                            show_progress=False))
    with pytest.raises(ValueError, match="no chat template"):
        ChatFormat(Tokenizer(backend, pad_token=None, eos_token="</s>"))


@pytest.mark.parametrize("template,match", [
    # The answer's position depends on the whole conversation: prefixes do not extend each other.
    ("{{ messages | length }}{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}",
     "does not render message 1 \\(assistant\\) as an extension"),
    ("{% if messages[0].role != 'system' %}{{ raise_exception('a system message is required') }}{% endif %}",
     "rejected the conversation: a system message is required"),
])
def test_template_problems_are_conversation_errors(tokenizer, template, match):
    chat = ChatFormat(Tokenizer(tokenizer.backend, chat_template=template))
    with pytest.raises(ConversationError, match=match):
        chat.encode([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])


def test_generation_blocks_and_tojson_render_as_transformers_does(tokenizer):
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
                "{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content | tojson }}<|im_end|>{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    chat = ChatFormat(Tokenizer(tokenizer.backend, chat_template=template))
    messages = [{"role": "user", "content": "<é>"}, {"role": "assistant", "content": "ok"}]
    assert chat.render(messages) == '<|im_start|>user\n"<é>"<|im_end|><|im_start|>assistant\nok<|im_end|>'
    enc = chat.encode(messages)
    assert tokenizer.decode([x for x in enc.labels if x != IGNORE_INDEX], skip_special_tokens=False) == "ok<|im_end|>"


def test_whole_number_tokens_when_digits_are_not_split():
    from vlmkit.data.tokenizer import train_tokenizer

    corpus = [f"<box>{a},{b},{a + 16},{b + 31}</box>" for a in range(0, 900, 16) for b in (47, 203)] * 3
    whole = train_tokenizer(corpus, vocab_size=400, split_digits=False)
    split = train_tokenizer(corpus, vocab_size=400)
    assert len(whole.encode("544")) == 1 and whole.decode(whole.encode("<box>544,203</box>")) == "<box>544,203</box>"
    assert len(split.encode("544")) == 3


# -- prompts about several images ------------------------------------------------------------------


def test_prompt_with_two_images_matches_the_training_layout(tokenizer):
    chat = ChatFormat(tokenizer, image_tokens=3)
    question = "Is the red star in both images?"
    record = {"image": ["a.png", "b.png"],
              "conversations": [{"from": "human", "value": f"<image>\n<image>\n{question}"}]}
    prompt = chat.prompt(question, num_images=2)
    assert prompt.input_ids == chat.encode(record, add_generation_prompt=True).input_ids
    assert prompt.num_images == 2 and prompt.image_tokens == [3, 3]
    # One image and none are what they were: the num_images default follows with_image.
    one = {"conversations": [{"from": "human", "value": f"<image>\n{question}"}]}
    assert chat.prompt(question).input_ids == chat.encode(one, add_generation_prompt=True).input_ids
    assert chat.prompt(question, with_image=False).input_ids == chat.prompt(question, num_images=0).input_ids
    assert tokenizer.image_id not in chat.prompt(question, with_image=False).input_ids
    # Per-image counts (images of different sizes) in reading order.
    mixed = chat.prompt(question, image_tokens=[2, 5], num_images=2)
    ids = mixed.input_ids
    first = ids.index(tokenizer.image_id)
    assert ids[first:first + 2] == [tokenizer.image_id] * 2 and ids[first + 2] != tokenizer.image_id
    assert ids.count(tokenizer.image_id) == 7 and mixed.image_tokens == [2, 5]


def test_prompt_places_images_at_typed_tags(tokenizer):
    chat = ChatFormat(tokenizer, image_tokens=2)
    typed = chat.prompt("compare <image> with <image>", num_images=2)
    expected = chat.encode([{"role": "user", "content": "compare <image> with <image>"}], add_generation_prompt=True)
    assert typed.input_ids == expected.input_ids and typed.num_images == 2
    with pytest.raises(ConversationError, match=r"the question has 1 <image> tag\(s\) but 2 image\(s\) were given"):
        chat.prompt("compare <image> with the other", num_images=2)
    with pytest.raises(ValueError, match=r"3 image token count\(s\) for 2 image\(s\)"):
        chat.prompt("same?", image_tokens=[1, 2, 3], num_images=2)
