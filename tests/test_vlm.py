import pytest
import torch

from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.processor import VLMProcessor
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.eval.generation import left_pad
from vlmkit.models.vlm import ImagePlaceholderError, VisionLanguageModel


def test_splice_puts_image_embeddings_exactly_at_placeholders(tiny_model, tokenizer):
    chat = VLMProcessor.for_model(tiny_model, tokenizer)
    rows = [
        chat.encode([{"role": "user", "content": "<image> what is this? <image>"}]).input_ids,
        chat.encode([{"role": "user", "content": "no picture here"}]).input_ids,
        chat.encode([{"role": "user", "content": "one <image>"}]).input_ids,
    ]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_id] * (width - len(r)) for r in rows])
    pixels = torch.randn(3, 3, 32, 32)
    embeds = tiny_model.embed(ids, pixels, image_counts=[2, 0, 1])
    image_embeds = tiny_model.encode_images(pixels)  # [3, T, D] in reading order
    text_embeds = tiny_model.lm.embed_tokens(ids)
    is_image = ids == tokenizer.image_id
    t = tiny_model.tokens_per_image
    assert torch.equal(embeds[0][is_image[0]], image_embeds[:2].reshape(2 * t, -1))
    assert torch.equal(embeds[2][is_image[2]], image_embeds[2])
    assert torch.equal(embeds[~is_image], text_embeds[~is_image])


def test_placeholder_mismatches_give_clear_errors(tiny_model, tokenizer):
    chat = VLMProcessor.for_model(tiny_model, tokenizer)
    ids = torch.tensor([chat.encode([{"role": "user", "content": "<image> hi"}]).input_ids])
    with pytest.raises(ImagePlaceholderError, match="but 2 image\\(s\\) x 16 tokens"):
        tiny_model.embed(ids, torch.randn(2, 3, 32, 32))
    with pytest.raises(ImagePlaceholderError, match="no images were given"):
        tiny_model.embed(ids)
    with pytest.raises(ImagePlaceholderError, match="sample 0 has 16 image placeholder tokens but 2 image"):
        tiny_model.embed(torch.cat([ids, ids]), torch.randn(2, 3, 32, 32), image_counts=[2, 0])


def test_loss_only_on_assistant_tokens(tiny_model, tokenizer):
    chat = VLMProcessor.for_model(tiny_model, tokenizer)
    enc = chat.encode({"conversations": [{"from": "human", "value": "<image>\nwhat color?"},
                                         {"from": "gpt", "value": "red"}]})
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    pixels = torch.randn(1, 3, 32, 32)
    out = tiny_model(ids, pixels, labels=labels)
    logits = tiny_model(ids, pixels).logits
    keep = labels[0, 1:] != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[0, :-1][keep], labels[0, 1:][keep])
    assert torch.allclose(out.loss, manual, atol=1e-6)
    assert int(keep.sum()) == len(tokenizer.encode("red")) + 1  # answer + <|im_end|>


def _prompts(tiny_model, tokenizer):
    chat = VLMProcessor.for_model(tiny_model, tokenizer)
    questions = ["what color is the square?", "how many?", "is there a yellow cross in the image? answer"]
    return [chat.prompt(q).input_ids for q in questions]


def test_cached_greedy_equals_uncached_for_batch_of_three(tiny_model, tokenizer):
    rows = _prompts(tiny_model, tokenizer)
    assert len({len(r) for r in rows}) == 3
    ids, mask = left_pad(rows, tokenizer.pad_id)
    pixels = torch.randn(3, 3, 32, 32)
    cached = tiny_model.generate(ids, mask, pixels, max_new_tokens=12)
    uncached = tiny_model.generate(ids, mask, pixels, max_new_tokens=12, use_cache=False)
    assert cached == uncached
    assert all(len(r) == 12 for r in cached)
    # Left padding must not change any row's result: each row alone gives the same tokens.
    for i, row in enumerate(rows):
        alone = tiny_model.generate(torch.tensor([row]), pixel_values=pixels[i : i + 1], max_new_tokens=12)
        assert alone[0] == cached[i]


def test_generation_stops_at_eos(tiny_model, tokenizer):
    rows = _prompts(tiny_model, tokenizer)
    ids, mask = left_pad(rows, tokenizer.pad_id)
    pixels = torch.randn(3, 3, 32, 32)
    free = tiny_model.generate(ids, mask, pixels, max_new_tokens=6)
    eos = free[1][2]  # pretend the third token of row 1 is the end-of-sequence token
    cut = tiny_model.generate(ids, mask, pixels, max_new_tokens=6, eos_token_id=eos)
    assert cut[1] == free[1][: free[1].index(eos)]


def test_sampling_is_seeded_and_top_p_narrows(tiny_model, tokenizer):
    rows = _prompts(tiny_model, tokenizer)
    ids, mask = left_pad(rows, tokenizer.pad_id)
    pixels = torch.randn(3, 3, 32, 32)
    gen = lambda seed, **kw: tiny_model.generate(  # noqa: E731
        ids, mask, pixels, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)
    assert gen(1) == gen(1)
    assert gen(1) != gen(2)
    greedy = tiny_model.generate(ids, mask, pixels, max_new_tokens=8)
    assert gen(3, top_p=1e-6) == greedy  # a vanishing nucleus keeps only the top token


def test_save_load_roundtrip_is_bit_exact(tiny_model, tokenizer, tmp_path):
    target = tmp_path / "ckpt"
    tiny_model.save_pretrained(target, tokenizer)
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    loaded = VisionLanguageModel.from_pretrained(target)
    a, b = tiny_model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.lm.lm_head.weight is loaded.lm.embed_tokens.weight  # tying survives the round trip
    assert Tokenizer.load(target).encode("red star") == tokenizer.encode("red star")
    ids = torch.tensor([_prompts(tiny_model, tokenizer)[0]])
    pixels = torch.randn(1, 3, 32, 32)
    assert torch.equal(tiny_model(ids, pixels).logits, loaded.eval()(ids, pixels).logits)


def test_save_replaces_atomically_and_failure_keeps_old(tiny_model, tokenizer, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    tiny_model.save_pretrained(target)
    before = (target / "model.safetensors").read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("vlmkit.models.checkpoint.save_model", explode)
    with pytest.raises(OSError, match="disk full"):
        tiny_model.save_pretrained(target)
    assert (target / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary leftovers


def test_load_errors_name_the_file(tmp_path, make_config):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        VisionLanguageModel.from_pretrained(tmp_path)
    model = VisionLanguageModel(make_config())
    model.save_pretrained(tmp_path / "m")
    cfg = (tmp_path / "m" / "config.json")
    cfg.write_text(cfg.read_text().replace('"num_heads": 2', '"num_headz": 2', 1))
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['num_headz'\\]"):
        VisionLanguageModel.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("connector", ["linear", "mlp2x_gelu", "pixel_shuffle"])
def test_tokens_per_image_follows_connector(make_config, connector):
    model = VisionLanguageModel(make_config(connector={"name": connector}))
    assert model.tokens_per_image == (4 if connector == "pixel_shuffle" else 16)
    assert model.encode_images(torch.randn(2, 3, 32, 32)).shape == (2, model.tokens_per_image, 32)
