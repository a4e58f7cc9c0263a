"""Training efficiency options: sample packing, activation checkpointing, LoRA adapters (and `vlmkit merge`)."""

import json

import pytest
import torch
import torch.nn.functional as F

from tests.test_train import config_for, data_dir, metrics  # noqa: F401  (data_dir is a fixture)
from vlmkit.config import ConfigError
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.collate import collate, pack_rows
from vlmkit.models.language import Varlen
from vlmkit.models.memory import set_activation_checkpointing
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.train.trainer import Trainer, resume

LORA_INSTALL = "LoRA needs peft: pip install 'vlmkit[lora]'"

# -- packing ------------------------------------------------------------------------------------------


def test_pack_rows_is_first_fit_decreasing():
    lengths = [5, 9, 3, 12, 4, 7, 7]
    rows = pack_rows(lengths, 16)
    assert rows == [[3, 4], [1, 5], [6, 0, 2]]  # longest first, each into the first row with room
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 16 for row in rows)
    assert pack_rows(lengths, 16) == rows and pack_rows([4, 4, 4], 4) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="a sample of 12 tokens does not fit a packed row of 10"):
        pack_rows(lengths, 10)


def test_varlen_layout_puts_each_sample_in_its_own_row():
    segments = torch.tensor([[3, 3, 3, 1, 1, 2, 0, 0], [4, 4, 4, 4, 4, 4, 4, 4]])
    varlen = Varlen.from_segments(segments)
    assert (varlen.samples, varlen.width) == (4, 8) and varlen.real.tolist() == [0, 1, 2, 3, 4, 5] + list(range(8, 16))
    assert varlen.positions.tolist() == [0, 1, 2, 0, 1, 0] + list(range(8))
    tokens = torch.arange(14.0)[None, :, None]  # the flat stream of real tokens, [1, T, 1]
    rows = varlen.pad(tokens)[..., 0]
    assert rows[:3].tolist() == [[0, 1, 2] + [2] * 5, [3, 4] + [4] * 6, [5] * 8]  # past the end: the last token
    assert rows[3].tolist() == list(range(6, 14))
    assert torch.equal(varlen.unpad(varlen.pad(tokens)), tokens)


def sample(ids: list[int], answer_from: int, images: int, size: int, image_token: int, tokens: int) -> dict:
    ids = torch.tensor(ids[:1] + [image_token] * (tokens * images) + ids[1:])
    labels = ids.clone()
    labels[: answer_from + tokens * images] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(images, 3, size, size),
            "num_images": images}


def per_sample_losses(model, batch, mask_segments: bool = True) -> dict[int, torch.Tensor]:
    """Each sample's mean next-token loss, by its index in the batch (rows may hold several samples)."""
    segments = batch.get("segment_ids")
    out = model(batch["input_ids"], batch["pixel_values"], image_counts=batch["image_counts"],
                segment_ids=segments if mask_segments else None)
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(out.logits[:, :-1].transpose(1, 2), targets, reduction="none", ignore_index=IGNORE_INDEX)
    owner = segments[:, 1:] - 1 if segments is not None else torch.arange(len(targets))[:, None].expand_as(targets)
    keep = targets != IGNORE_INDEX
    return {int(k): losses[keep & (owner == k)].mean() for k in owner[keep].unique()}


def test_packed_batch_gives_every_sample_its_unpacked_loss(make_config):
    """fp32: a packed batch's per-sample losses equal those of the same samples padded one per row (1e-5),
    with no, one and two images per sample: each row's images go in the order its samples sit."""
    torch.manual_seed(0)
    model = VisionLanguageModel(make_config()).eval()
    tokens, image_id = model.tokens_per_image, model.config.image_token_id
    g = torch.Generator().manual_seed(1)
    shapes = [(1, 5), (0, 9), (2, 3), (1, 12), (0, 4), (1, 2)]  # (images, text tokens)
    samples = [sample(torch.randint(10, 300, (n + 1,), generator=g).tolist(), 2, k, 32, image_id, tokens)
               for k, n in shapes]
    packed = collate(samples, pad_id=0, pack_length=3 * tokens + 4)
    assert len(packed["input_ids"]) < len(samples) and packed["image_counts"].sum() == 5
    assert (packed["attention_mask"].sum() == sum(len(s["input_ids"]) for s in samples))
    with torch.no_grad():
        ours = per_sample_losses(model, packed)
        alone = per_sample_losses(model, collate(samples, pad_id=0))
        batch_loss = [model(b["input_ids"], b["pixel_values"], labels=b["labels"], image_counts=b["image_counts"],
                            segment_ids=b.get("segment_ids")).loss for b in (packed, collate(samples, pad_id=0))]
    assert ours.keys() == alone.keys() == set(range(len(samples)))
    for k in ours:
        assert torch.allclose(ours[k], alone[k], rtol=0, atol=1e-5), (k, ours[k], alone[k])
    assert torch.allclose(*batch_loss, rtol=0, atol=1e-5)
    # Without the segments, a row's later samples read the earlier ones: the comparison can fail.
    with torch.no_grad():
        leaky = per_sample_losses(model, packed, mask_segments=False)
    assert abs(float(leaky[0] - ours[0])) + abs(float(leaky[1] - ours[1])) > 1e-4


def test_packed_training_follows_the_unpacked_run(data_dir, tmp_path):  # noqa: F811
    """The same batches, packed: the logged losses and the trained weights agree with the padded run (fp32)."""
    runs = {}
    for packing in (False, True):
        out = tmp_path / str(packing)
        trainer = Trainer(config_for("instruct", data_dir, out, f"data.packing={str(packing).lower()}",
                                     "data.num_workers=0"))
        first = trainer.sampler.batch(0)
        batch = trainer.stage.collate([trainer.train_set[i] for i in first])
        assert ("segment_ids" in batch) == packing and (len(batch["input_ids"]) < len(first)) == packing
        trainer.fit()
        runs[packing] = (metrics(out, "loss"), trainer.model.state_dict())
    (plain, a), (packed, b) = runs[False], runs[True]
    assert plain == pytest.approx(packed, abs=1e-5)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_packing_is_refused_where_samples_would_mix(data_dir, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="data.packing: the clip stage does not pack samples"):
        Trainer(config_for("clip", data_dir, tmp_path / "c", "data.packing=true"))
    with pytest.raises(ConfigError, match="data.packing needs model.fusion: splice"):
        Trainer(config_for("instruct", data_dir, tmp_path / "x", "data.packing=true", "model.fusion=cross_attention"))


# -- activation checkpointing -------------------------------------------------------------------------


def test_activation_checkpointing_gives_the_same_gradients(make_config):
    """fp32, the ViT and the LM both checkpointed: every gradient equal to 1e-6 (in practice bit-equal),
    while each block runs its forward twice (once more in the backward pass)."""
    torch.manual_seed(0)
    model = VisionLanguageModel(make_config()).train()
    text = torch.randint(10, 300, (3, 12))
    ids = torch.cat([text[:, :1], torch.full((3, model.tokens_per_image), model.config.image_token_id), text[:, 1:]], 1)
    pixels = torch.randn(3, 3, 32, 32)
    calls = {"lm": 0, "vit": 0}

    def counted(key, block):
        forward = block.forward

        def run(*args):
            calls[key] += 1
            return forward(*args)
        block.forward = run  # the recomputation calls forward, not the module's hooks

    counted("lm", model.lm.layers[0])
    counted("vit", model.vision.blocks[0])

    def grads():
        model.zero_grad()
        model(ids, pixels, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    assert calls == {"lm": 1, "vit": 1}
    assert set(set_activation_checkpointing(model)) == {"lm", "vision"}
    checkpointed = grads()
    assert calls == {"lm": 3, "vit": 3}
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=0, atol=1e-6), name
    with torch.no_grad():  # nothing to recompute without gradients
        model(ids, pixels)
    assert calls == {"lm": 4, "vit": 4}


def test_activation_checkpointing_option_reaches_the_model(data_dir, tmp_path):  # noqa: F811
    trainer = Trainer(config_for("instruct", data_dir, tmp_path, "optim.activation_checkpointing=true",
                                 "optim.train_vision=true"))
    assert trainer.model.lm.activation_checkpointing and trainer.model.vision.activation_checkpointing
    trainer.fit(stop_after=1)


# -- LoRA -----------------------------------------------------------------------------------------------

LORA = "optim.lora={r: 4, alpha: 8, target_modules: [lm]}"


@pytest.fixture(scope="module")
def lora_run(data_dir, tmp_path_factory):  # noqa: F811
    """The instruct stage with LoRA on the LM, uninterrupted (the reference for resume and merge)."""
    pytest.importorskip("peft", reason=LORA_INSTALL)
    out = tmp_path_factory.mktemp("lora")
    trainer = Trainer(config_for("instruct", data_dir, out, LORA, "optim.lr=3e-2"))
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    return out, trainer, start


def test_lora_trains_only_the_adapters_and_the_connector(lora_run):
    out, trainer, start = lora_run
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("connector.") for n in trainable)
    assert any(n.startswith("connector.") for n in trainable)
    adapted = {n.split(".lora_")[0] for n in trainable if ".lora_" in n}
    assert "lm.layers.0.attn.q_proj" in adapted and "lm.layers.1.mlp.down_proj" in adapted
    assert not any("lm_head" in n for n in adapted)  # tied to the embeddings: never adapted
    end = trainer.model.state_dict()
    for name, value in end.items():
        moved = not torch.equal(start[name], value)
        if name.startswith("lm.") and ".lora_" not in name:
            assert not moved, f"frozen base weight {name} changed"
        if ".lora_B." in name:
            assert moved, f"adapter {name} did not train"
    files = {p.name for p in (out / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors", "config.json"} <= files
    config = json.loads((out / "model" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8


def logits_of(model, batch):
    model.eval()
    with torch.no_grad():
        return model(batch["input_ids"], image_features=batch["image_features"],
                     image_counts=batch["image_counts"]).logits


def test_merge_folds_the_adapters_into_a_plain_checkpoint(lora_run, tmp_path):
    """`vlmkit merge RUN OUT`: OUT is a plain vlmkit model whose logits equal the adapted model's (fp32, 1e-5);
    peft itself reads the run's adapters to the same logits."""
    from peft import PeftModel

    from vlmkit.cli import main

    out, trainer, _ = lora_run
    batch = trainer.stage.collate([trainer.train_set[i] for i in range(4)])
    adapted = logits_of(trainer.model, batch)
    assert main(["merge", str(out), str(tmp_path / "merged")]) == 0
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = VisionLanguageModel.from_pretrained(tmp_path / "merged")
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    assert torch.allclose(logits_of(merged, batch), adapted, rtol=0, atol=1e-5)
    assert not torch.allclose(logits_of(merged, batch), logits_of(base_model(out), batch), atol=1e-3)

    by_peft = PeftModel.from_pretrained(base_model(out), str(out / "model"))
    assert torch.allclose(logits_of(by_peft, batch), adapted, rtol=0, atol=1e-5)
    assert main(["merge", str(tmp_path / "merged"), str(tmp_path / "again")]) == 1  # no adapters to merge


def base_model(run):
    """The run's base weights alone, without its adapters."""
    from safetensors.torch import load_model

    from vlmkit.config import ModelConfig

    meta = json.loads((run / "model" / "config.json").read_text())
    model = VisionLanguageModel(ModelConfig.from_dict(meta["model"]))
    load_model(model, str(run / "model" / "model.safetensors"))
    return model


def test_resume_with_adapters_is_exact(lora_run, data_dir, tmp_path):  # noqa: F811
    """Interrupted after 2 of 4 steps and resumed from the checkpoint: the same weights and losses."""
    reference, straight, _ = lora_run
    interrupted = Trainer(config_for("instruct", data_dir, tmp_path, LORA, "optim.lr=3e-2", "save_every=2"))
    interrupted.fit(stop_after=2)
    checkpoint = tmp_path / "checkpoints" / "step-000002"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    del interrupted
    resumed = resume(tmp_path)
    assert resumed.state.step == 2
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(tmp_path, "loss") == metrics(reference, "loss")


def test_lora_on_the_tower_and_connector_too(data_dir, tmp_path):  # noqa: F811
    pytest.importorskip("peft", reason=LORA_INSTALL)
    everywhere = "optim.lora={target_modules: [lm, connector, vision]}"
    trainer = Trainer(config_for("instruct", data_dir, tmp_path, everywhere))
    trainable = {n.split(".")[0] for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {"lm", "connector", "vision"}
    assert all(".lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert trainer.train_set._features is None  # the tower trains adapters: no cached features
    trainer.fit(stop_after=1)
    from vlmkit.hf.pretrained import tower_weights

    trainer.save_checkpoint()
    with pytest.raises(ValueError, match="LoRA adapters on its vision tower.*vlmkit merge"):
        tower_weights(next((tmp_path / "checkpoints").iterdir()))


def test_lora_config_errors_name_the_field(data_dir, tmp_path):  # noqa: F811
    pytest.importorskip("peft", reason=LORA_INSTALL)
    with pytest.raises(ValueError, match="'lmm' matches no module of the VisionLanguageModel \\(its parts: "):
        Trainer(config_for("instruct", data_dir, tmp_path, "optim.lora={target_modules: [lmm]}"))
    with pytest.raises(ConfigError, match="optim.lora: r: expected an integer >= 1"):
        config_for("instruct", data_dir, tmp_path, "optim.lora={r: 0}")
    with pytest.raises(ConfigError, match="optim.lora: unknown key"):
        config_for("instruct", data_dir, tmp_path, "optim.lora={rank: 4}")


# -- faster kernels: the same numbers ---------------------------------------------------------------


def test_math_attention_matches_sdpa_with_shared_kv_heads():
    """fp32: the explicit path (grouped k/v heads, causal bias inside the matmul, masks, float biases) equals
    SDPA on k/v repeated per query head; the recorded probabilities come per query head."""
    from vlmkit.models.attention import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 16, generator=g) for h in (6, 2, 2))
    repeat = lambda t: t.repeat_interleave(3, dim=1)  # noqa: E731
    mask = torch.rand(2, 1, 7, 7, generator=g) > 0.4
    mask |= torch.eye(7, dtype=torch.bool)
    recorded = []
    bias = torch.randn(2, 1, 1, 7, generator=g)  # a float bias (token merging's log sizes): the general branch
    for kwargs in ({"causal": True}, {"mask": mask}, {"mask": bias}, {}):
        ours = attention(q, k, v, impl="math", **kwargs)
        reference = torch.nn.functional.scaled_dot_product_attention(
            q, repeat(k), repeat(v), attn_mask=kwargs.get("mask"), is_causal=kwargs.get("causal", False))
        assert torch.allclose(ours, reference, atol=1e-6), kwargs
    attention(q, k, v, causal=True, record=recorded.append)
    probs = recorded[0]
    assert probs.shape == (2, 6, 7, 7) and torch.allclose(probs.sum(-1), torch.ones(2, 6, 7))
    assert torch.equal(probs[:, :, 0, 1:], torch.zeros(2, 6, 6))  # causal: the first query sees itself only


def test_rms_norm_backward_matches_autograd():
    from vlmkit.models.language import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(24, 1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 24, requires_grad=True)
    grad = torch.randn(3, 5, 24)

    def reference(x):  # the forward RMSNorm runs without gradients, under autograd
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))

    ours = norm(x)
    with torch.no_grad():
        assert torch.equal(ours, norm(x))  # the same forward with and without gradients
    gx, gw = torch.autograd.grad(ours, (x, norm.weight), grad)
    rx, rw = torch.autograd.grad(reference(x), (x, norm.weight), grad)
    assert torch.allclose(gx, rx, atol=1e-6) and torch.allclose(gw, rw, atol=1e-5)


def test_joint_linear_runs_adapted_layers_on_their_own():
    from torch import nn

    from vlmkit.models.kernels import joint_linear

    torch.manual_seed(0)
    layers = [nn.Linear(8, n) for n in (4, 2, 2)]
    x = torch.randn(3, 8)
    assert all(torch.allclose(a, layer(x), atol=1e-6) for a, layer in zip(joint_linear(x, *layers), layers))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(a.dtype == torch.bfloat16 and torch.equal(a, layer(x))
                   for a, layer in zip(joint_linear(x, *layers), layers))

    class Adapted(nn.Linear):  # a layer with its own forward (as LoRA's) is never folded into the matmul
        def forward(self, x):
            return super().forward(x) + 1.0

    adapted = Adapted(8, 2)
    out = joint_linear(x, layers[0], adapted)
    assert torch.allclose(out[1], adapted(x)) and torch.allclose(out[0], layers[0](x), atol=1e-6)


@pytest.mark.slow
def test_compiled_training_follows_the_eager_run(data_dir, tmp_path):  # noqa: F811
    """optim.compile (inductor: needs a C++ compiler; minutes to compile on 2 CPU cores): the same losses
    as the eager run to 1e-4 (fp32), over batches of varying lengths."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler (g++)")
    losses = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        Trainer(config_for("instruct", data_dir, out, f"optim.compile={str(compiled).lower()}",
                           "optim.train_vision=true")).fit()
        losses[compiled] = metrics(out, "loss")
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
