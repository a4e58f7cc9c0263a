"""BLIP-2 stage-1 pieces: the contrastive targets, hard-negative mining and the generation mask."""

import torch

from vlmkit.config import ConnectorConfig, VisionConfig
from vlmkit.models.clip import symmetric_info_nce
from vlmkit.models.qformer_pretraining import (
    QFormerPretrainer,
    QFormerPretrainingConfig,
    _hard_negatives,
    _key_mask,
    _positives,
    generation_mask,
)


def tiny_pretrainer() -> QFormerPretrainer:
    torch.manual_seed(0)
    vision = VisionConfig(image_size=16, patch_size=8, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    connector = ConnectorConfig(name="qformer", num_queries=3, num_layers=2, num_heads=2, cross_attention_frequency=1)
    return QFormerPretrainer(QFormerPretrainingConfig(vision=vision, connector=connector, vocab_size=20,
                                                      max_text_length=8, embed_dim=8)).eval()


def test_several_positives_share_the_contrastive_target():
    logits = torch.randn(4, 4)
    assert torch.allclose(symmetric_info_nce(logits, torch.eye(4, dtype=torch.bool)), symmetric_info_nce(logits))
    # Texts 0 and 1 are captions of one image (rows 0 and 1 are that image twice): which of the two
    # scores higher makes no difference, unlike with one positive per row.
    same = torch.eye(4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    swapped = logits[:, [1, 0, 2, 3]]
    assert torch.allclose(symmetric_info_nce(logits, same), symmetric_info_nce(swapped, same))
    assert not torch.allclose(symmetric_info_nce(logits), symmetric_info_nce(swapped))


def test_hard_negatives_are_never_pairs_and_follow_the_similarities():
    ids = torch.tensor([[1, 2, 3], [4, 5, 0], [1, 2, 3], [6, 7, 8]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    positives = _positives(ids, mask, torch.tensor([0, 1, 2, 1]))  # captions 0 and 2 are equal; images 1 and 3 too
    assert positives.tolist() == [[True, False, True, False], [False, True, False, True],
                                  [True, False, True, False], [False, True, False, True]]
    torch.manual_seed(0)
    logits = 20 * torch.randn(4, 4)
    for _ in range(20):
        images, texts = _hard_negatives(logits, positives)
        assert images[:4].tolist() == texts[:4].tolist() == [0, 1, 2, 3]
        assert len(images) == len(texts) == 12 and not positives[images[4:], texts[4:]].any()
    only_one_image = torch.ones(3, 3, dtype=torch.bool)  # no negative anywhere: the true pairs only
    assert [t.tolist() for t in _hard_negatives(torch.randn(3, 3), only_one_image)] == [[0, 1, 2], [0, 1, 2]]


def test_generation_mask_hides_the_text_from_the_queries_and_the_future_from_the_text():
    model = tiny_pretrainer()
    features = torch.randn(1, 4, 16)
    ids, mask = torch.tensor([[3, 4, 5, 6]]), torch.ones(1, 4, dtype=torch.long)

    def hidden(ids):
        return model.qformer(features, model.embed_text(ids, "dec"), generation_mask(3, _key_mask(mask)))

    a, b = hidden(ids), hidden(torch.tensor([[3, 4, 9, 9]]))
    assert torch.equal(a[:, :3], b[:, :3])  # the queries never see the text
    assert torch.allclose(a[:, 3:6], b[:, 3:6]) and not torch.allclose(a[:, 6:], b[:, 6:])  # [DEC], 3, 4 unchanged
    assert torch.allclose(a[:, :3], model.qformer(features), atol=1e-6)  # = the query-only pass


def test_pretrainer_losses_and_similarity():
    model = tiny_pretrainer()
    pixels, ids = torch.randn(4, 3, 16, 16), torch.randint(0, 20, (4, 5))
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[1, 3:] = 0
    out = model(pixels, ids, mask, torch.arange(4))
    assert set(out) == {"itc", "itm", "itg", "itm_accuracy", "loss"}
    assert torch.allclose(out["loss"], out["itc"] + out["itm"] + out["itg"])
    assert model.similarity(pixels, ids, mask).shape == (4, 4)
    model.config.itg = False
    assert "itg" not in model(pixels, ids, mask)
