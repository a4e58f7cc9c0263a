"""Continuous batching in the LM: sequences prefilled into slots of a `SlotCache` and decoded together,
joining and leaving between steps, give exactly the tokens each gives when generated alone."""

import pytest
import torch

from vlmkit.config import LanguageConfig
from vlmkit.eval.generation import left_pad
from vlmkit.models.language import LanguageModel
from vlmkit.models.vlm import VisionLanguageModel


def tiny_lm(seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    cfg = LanguageConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=64)
    return LanguageModel(cfg).eval()


def run_continuous(lm: LanguageModel, inputs, new_tokens: list[int], num_slots: int, arrivals: list[int],
                   initial_length: int = 4) -> list[list[int]]:
    """Greedy continuous batching: request i is admitted at the first step >= arrivals[i] with a free slot,
    runs `new_tokens[i]` tokens, then frees its slot. ``inputs(requests)`` gives the left-padded prefill
    of the requests admitted together: (embeds [n, L, D], mask [n, L], layer context or None)."""
    cache = lm.new_slot_cache(num_slots, 512, initial_length=initial_length)  # small: growth is exercised
    out: list[list[int]] = [[] for _ in new_tokens]
    active: dict[int, int] = {}  # slot -> request
    waiting = list(range(len(new_tokens)))
    step = 0
    while waiting or active:
        free = [s for s in range(num_slots) if s not in active]
        admit = [i for i in waiting if arrivals[i] <= step][: len(free)]
        if admit:  # one batched, left-padded prefill for everything admitted at this step
            slots = free[: len(admit)]
            hidden = lm.prefill_slots(cache, slots, *inputs(admit))
            for slot, i, h in zip(slots, admit, hidden):
                out[i].append(int(lm.lm_head(h).argmax()))
                active[slot] = i
                waiting.remove(i)
        for slot, i in list(active.items()):
            if len(out[i]) >= new_tokens[i]:
                del active[slot]
                cache.release(slot)
        if active:
            slots = sorted(active)
            tokens = torch.tensor([out[active[s]][-1] for s in slots])
            hidden = lm.decode_slots(cache, slots, tokens)
            for slot, h in zip(slots, hidden):
                out[active[slot]].append(int(lm.lm_head(h).argmax()))
        step += 1
    return [o[:n] for o, n in zip(out, new_tokens)]


def test_continuous_batching_equals_generating_each_sequence_alone():
    lm = tiny_lm()
    torch.manual_seed(1)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 9, 1, 14, 6, 5, 11)]
    new_tokens = [7, 3, 12, 5, 9, 1, 6]
    alone = [lm.generate(torch.tensor([p]), max_new_tokens=n)[0] for p, n in zip(prompts, new_tokens)]

    def inputs(admitted):
        ids, mask = left_pad([prompts[i] for i in admitted], pad_id=0)
        return lm.embed_tokens(ids), mask, None

    # Three slots for seven sequences: slots are reused, sequences join mid-flight at different positions.
    got = run_continuous(lm, inputs, new_tokens, num_slots=3, arrivals=[0, 0, 2, 2, 3, 9, 9])
    assert got == alone
    assert all(len(g) == n for g, n in zip(got, new_tokens))


def test_a_batched_left_padded_prefill_fills_slots_as_single_prefills_do():
    lm = tiny_lm(3)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    ids, mask = left_pad(prompts, pad_id=0)
    cache = lm.new_slot_cache(4, 64)
    lm.prefill_slots(cache, [3, 0, 2], lm.embed_tokens(ids), mask)
    assert cache.lengths == [2, 0, 3, 6]
    for slot, prompt in zip([3, 0, 2], prompts):
        alone = lm.new_slot_cache(1, 64)
        lm.prefill_slots(alone, [0], lm.embed_tokens(torch.tensor([prompt])))
        for layer in range(2):
            n = len(prompt)
            torch.testing.assert_close(cache.keys[layer][slot, :, :n], alone.keys[layer][0, :, :n])
            torch.testing.assert_close(cache.values[layer][slot, :, :n], alone.values[layer][0, :, :n])


@pytest.mark.parametrize("fusion", ["splice", "cross_attention"])
def test_vlm_requests_with_images_batch_like_single_generation(make_config, tokenizer, fusion):
    from vlmkit.data.processor import VLMProcessor

    torch.manual_seed(0)
    model = VisionLanguageModel(make_config(fusion=fusion)).eval()
    if fusion == "cross_attention":  # open the gates, so the images change the answers
        for name, param in model.fusion.named_parameters():
            if name.endswith("gate"):
                param.data.fill_(1.0)
    processor = VLMProcessor.for_model(model, tokenizer)
    torch.manual_seed(2)
    images = [torch.randn(3, 32, 32) for _ in range(3)]
    requests = [("what color is the square?", [images[0]]), ("how many objects are there?", []),
                ("is there a red star?", [images[1], images[2]]), ("where is it?", [images[2]])]
    prompts = [processor.prompt(q, image_sizes=[(32, 32)] * len(imgs)).input_ids for q, imgs in requests]
    alone = []
    for prompt, (_, imgs) in zip(prompts, requests):
        pixels = torch.stack(imgs) if imgs else None
        alone.append(model.generate(torch.tensor([prompt]), pixel_values=pixels, image_counts=[len(imgs)],
                                    max_new_tokens=8)[0])

    def inputs(admitted):  # requests admitted together are fused as one batch, images in reading order
        ids, mask = left_pad([prompts[i] for i in admitted], tokenizer.pad_id)
        pixels = [img for i in admitted for img in requests[i][1]]
        fused = model.fuse(ids, pixels, [len(requests[i][1]) for i in admitted])
        return fused.inputs_embeds, mask, fused.context

    # Requests 1 (no image) and 2 (two images) are prefilled together and join request 0; 3 waits for a slot.
    got = run_continuous(model.lm, inputs, [8] * 4, num_slots=3, arrivals=[0, 1, 1, 4])
    assert got == alone
    if fusion == "cross_attention":  # the images matter: without them the answers differ
        blind = [model.lm.generate(torch.tensor([processor.prompt(q, image_sizes=[(32, 32)] * len(i)).input_ids]),
                                   max_new_tokens=8)[0] for q, i in requests]
        assert blind != alone


def test_slot_cache_errors_and_growth():
    lm = tiny_lm()
    cache = lm.new_slot_cache(2, 10)
    assert cache.capacity == 10
    with pytest.raises(ValueError, match="hold no sequence"):
        lm.decode_slots(cache, [0], torch.tensor([1]))
    lm.prefill_slots(cache, [1], lm.embed_tokens(torch.tensor([[1, 2, 3]])))
    with pytest.raises(ValueError, match=r"slots \[1\] are in use"):
        lm.prefill_slots(cache, [1], lm.embed_tokens(torch.tensor([[1]])))
    for _ in range(7):
        lm.decode_slots(cache, [1], torch.tensor([4]))
    assert cache.lengths == [0, 10]
    with pytest.raises(ValueError, match="KV cache overflow: 11 positions > max_length 10"):
        lm.decode_slots(cache, [1], torch.tensor([4]))
    cache.release(1)
    assert cache.lengths == [0, 0]
    big = lm.new_slot_cache(1, 1000)
    assert big.capacity == 64  # grows on demand, doubling
    big.reserve(65)
    assert big.capacity == 128
