"""Does the model look at the image while it answers? Attention diagnostics and the modality gap.

`attention_diagnostics` regenerates answers with attention recording on and measures, for every
generated token and every LM layer (averaged over heads): the **image share**, the attention mass
on image-token positions, and the **entropy** (nats) of the attention distribution over all
visible keys. Answers are grouped by the caller's correctness flags; a model that hallucinates
typically puts less mass on the image when it is wrong.

`modality_gap` measures, for a CLIP-stage dual encoder, the distance between the centroids of the
L2-normalised image and text embeddings (Liang et al., 2022, "Mind the Gap").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmkit.data.collate import collate_image_text
from vlmkit.data.datasets import ImageTextDataset
from vlmkit.data.images import ImageProcessor, load_image
from vlmkit.data.processor import VLMProcessor
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.device import autocast
from vlmkit.eval.figures import new_figure, to_png
from vlmkit.eval.generation import left_pad
from vlmkit.models.clip import DualEncoder
from vlmkit.models.language import recording_attention
from vlmkit.models.vlm import VisionLanguageModel, resolve_model_dir

__all__ = ["attention_diagnostics", "gap_statistics", "modality_gap", "plot_attention", "token_statistics"]


def token_statistics(probs: torch.Tensor, image_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image share and entropy of one query's attention, averaged over heads.

    ``probs`` is ``[B, H, K]`` (each row sums to 1 over the K keys); ``image_keys`` is a boolean
    ``[B, K]`` marking image-token positions. Returns two ``[B]`` tensors: the summed probability on
    image keys, and ``-sum p log p`` (nats; masked keys have p = 0 and add nothing).
    """
    probs = probs.float()
    share = (probs * image_keys[:, None, :]).sum(-1).mean(-1)
    entropy = torch.special.entr(probs).sum(-1).mean(-1)
    return share, entropy


def _summary(per_answer: list[np.ndarray]) -> dict[str, Any]:
    """Mean over answers of per-answer [layers] means (each answer counts once, whatever its length)."""
    if not per_answer:
        return {"per_layer": None, "mean": None}
    per_layer = np.mean(per_answer, axis=0)
    return {"per_layer": [float(v) for v in per_layer], "mean": float(per_layer.mean())}


@torch.no_grad()
def attention_diagnostics(model: VisionLanguageModel, tokenizer: Tokenizer, records: list[dict], image_root: Path,
                          correct: list[bool], *, max_new_tokens: int = 16, batch_size: int = 32,
                          precision: str = "bf16") -> dict:
    """Per-layer image share and attention entropy of generated tokens, for correct vs incorrect answers.

    ``records`` are ``{"image", "question"}`` dicts (image paths relative to ``image_root``) and
    ``correct[i]`` says whether the caller judged record i's answer correct. Answers are regenerated
    greedily (``precision`` as in `Answerer`, so they match what was scored); every generated token
    counts, the end-of-turn token included. Returns, per group (``"correct"``, ``"incorrect"``):
    ``n_answers``, ``n_tokens``, ``image_share`` and ``entropy`` (each ``{"per_layer": [...],
    "mean": x}``, None for an empty group) and ``uniform_image_share``, the share that uniform
    attention over the visible keys would give (image tokens / keys), for scale.
    """
    if len(records) != len(correct):
        raise ValueError(f"got {len(records)} records but {len(correct)} correctness flags; lengths must match")
    model.eval()
    device = next(model.parameters()).device
    processor = VLMProcessor.for_model(model, tokenizer)
    images = [processor.preprocess(load_image(Path(image_root) / r["image"])) for r in records]
    prompts = [processor.prompt(r["question"], image_size=processor.size_of(image)).input_ids
               for r, image in zip(records, images)]
    stats: list[dict[str, Any]] = [{} for _ in records]
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in chunk], tokenizer.pad_id)
        if processor.tiling:  # AnyRes: every image's tiles, and the sizes that say which are whose
            pixels = torch.cat([images[i].pixels for i in chunk])
            extra = {"image_sizes": [images[i].size for i in chunk]}
        else:
            pixels, extra = torch.stack([images[i] for i in chunk]), {}
        image_keys = (ids == tokenizer.image_id).to(device)
        n_images, n_real = image_keys.sum(-1), mask.to(device).sum(-1)
        steps: list[list[tuple[torch.Tensor, ...]]] = []  # [forward][layer] -> (share, entropy, uniform) [B]

        def on_probs(layer: int, probs: torch.Tensor, image_keys=image_keys, n_images=n_images, n_real=n_real,
                     steps=steps) -> None:
            if layer == 0:
                steps.append([])
            # Keys are the prompt plus the tokens generated so far, which are text.
            generated = probs.shape[-1] - image_keys.shape[1]
            is_image = torch.nn.functional.pad(image_keys, (0, generated))
            share, entropy = token_statistics(probs[:, :, -1], is_image)  # the last query chooses the next token
            steps[-1].append((share, entropy, n_images / (n_real + generated)))

        with recording_attention(model.lm, on_probs), autocast(device, precision):
            out = model.generate(ids.to(device), mask.to(device), pixels.to(device), max_new_tokens=max_new_tokens,
                                 eos_token_id=processor.end_of_turn_id, **extra)
        picks = min(len(steps), max_new_tokens)  # steps[t] is the forward pass that chose token t
        for row, i in enumerate(chunk):
            n = min(len(out[row]) + 1, picks)  # the answer's tokens plus the end-of-turn token
            per_token = [[tuple(float(x[row]) for x in layer) for layer in steps[t]] for t in range(n)]
            arr = np.asarray(per_token)  # [tokens, layers, (share, entropy, uniform)]
            stats[i] = {"mean": arr.mean(axis=0), "tokens": n}
    groups = {}
    for name, flag in (("correct", True), ("incorrect", False)):
        members = [s for s, ok in zip(stats, correct) if bool(ok) == flag]
        groups[name] = {
            "n_answers": len(members),
            "n_tokens": int(sum(s["tokens"] for s in members)),
            "image_share": _summary([s["mean"][:, 0] for s in members]),
            "entropy": _summary([s["mean"][:, 1] for s in members]),
            "uniform_image_share": _summary([s["mean"][:, 2] for s in members])["mean"],
        }
    return {"num_layers": len(model.lm.layers), "image_tokens": model.tokens_per_image, **groups}


def plot_attention(section: dict) -> bytes:
    """One PNG: image share and attention entropy per LM layer, correct vs incorrect answers."""
    figure = new_figure(9, 3.2)
    axes = figure.subplots(1, 2)
    layers = np.arange(section["num_layers"])
    width = 0.38
    for offset, (group, color) in zip((-width / 2, width / 2), (("correct", "tab:green"), ("incorrect", "tab:red"))):
        data = section.get(group) or {}
        for ax, key in zip(axes, ("image_share", "entropy")):
            values = (data.get(key) or {}).get("per_layer")
            if values is not None:
                ax.bar(layers + offset, values, width, color=color, label=f"{group} (n={data['n_answers']})")
        uniform = data.get("uniform_image_share")
        if uniform is not None:
            axes[0].axhline(uniform, color=color, linestyle=":", linewidth=1)
    axes[0].set_title("attention mass on image tokens (dotted: uniform)", fontsize=9)
    axes[1].set_title("attention entropy (nats)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("LM layer")
        ax.set_xticks(layers)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    return to_png(figure)


def gap_statistics(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> dict[str, float]:
    """Modality gap of matched pairs of embeddings ``[N, D]`` (L2-normalised here).

    ``gap``: norm of (mean image embedding - mean text embedding); ``mean_cosine_matched``: mean
    cosine of row i with row i; ``mean_cosine_unmatched``: mean cosine over pairs i != j (context:
    how close any image is to any caption).
    """
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2 or image_embeds.shape[0] < 2:
        raise ValueError(f"need two [N, D] embedding matrices of the same shape with N >= 2, "
                         f"got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}")
    img = torch.nn.functional.normalize(image_embeds.double(), dim=-1)
    txt = torch.nn.functional.normalize(text_embeds.double(), dim=-1)
    cos = img @ txt.t()
    n = cos.shape[0]
    return {
        "gap": float((img.mean(0) - txt.mean(0)).norm()),
        "mean_cosine_matched": float(cos.diagonal().mean()),
        "mean_cosine_unmatched": float((cos.sum() - cos.diagonal().sum()) / (n * n - n)),
        "n_pairs": n,
    }


def _spread_over_images(dataset: ImageTextDataset) -> list[int]:
    """Dataset indices ordered by (caption number within its image, file order)."""
    seen: dict[str, int] = {}
    ranked = []
    for i in range(len(dataset)):
        key = dataset.image_key(i)
        seen[key] = seen.get(key, -1) + 1
        ranked.append((seen[key], i))
    return [i for _, i in sorted(ranked)]


@torch.no_grad()
def modality_gap(clip_model_dir: Path, data_root: Path, *, split: str = "val", limit: int = 512,
                 batch_size: int = 128) -> dict:
    """`gap_statistics` of a CLIP-stage dual encoder on `limit` caption pairs of ``captions_{split}.jsonl``:
    the first caption of every image (file order), then the second ones, and so on, so that up to
    the number of images every pair shows a different image."""
    model_dir = resolve_model_dir(clip_model_dir)
    model = DualEncoder.from_pretrained(model_dir).eval()
    tokenizer = Tokenizer.load(model_dir)
    processor = ImageProcessor.from_vision_config(model.config.vision)
    path = Path(data_root) / f"captions_{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the modality gap needs caption pairs (vlmkit synth writes them)")
    dataset = ImageTextDataset(path, data_root, tokenizer, processor, model.config.text.max_position_embeddings)
    chosen = _spread_over_images(dataset)[:limit]
    images, texts = [], []
    for start in range(0, len(chosen), batch_size):
        batch = collate_image_text([dataset[i] for i in chosen[start : start + batch_size]], tokenizer.pad_id)
        images.append(model.encode_image(batch["pixel_values"]))
        texts.append(model.encode_text(batch["text_ids"], batch["text_mask"]))
    return {**gap_statistics(torch.cat(images), torch.cat(texts)), "split": split}
