"""The whole path (pixels -> ViT -> connector -> splice -> LM -> loss -> optimizer) learns from images."""

import json
import random

from PIL import Image

from vlmkit.data.tokenizer import train_tokenizer
from vlmkit.eval.generation import Answerer
from vlmkit.train.recipe import stage_config
from vlmkit.train.trainer import Trainer

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def test_tiny_vlm_learns_an_image_dependent_answer(tmp_path):
    # The answer (a square's colour) is only in the pixels: text priors alone score ~25%.
    rng = random.Random(0)
    (tmp_path / "images").mkdir()
    records = []
    for i in range(48):
        color = rng.choice(sorted(COLORS))
        image = Image.new("RGB", (32, 32), (235, 235, 235))
        x, y = rng.randrange(0, 20), rng.randrange(0, 20)
        image.paste(COLORS[color], (x, y, x + 12, y + 12))
        image.save(tmp_path / "images" / f"{i}.png")
        records.append({"image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": color}]})
    (tmp_path / "train.json").write_text(json.dumps(records))
    tokenizer = train_tokenizer(["What color is the square? " + " ".join(COLORS)] * 5, vocab_size=300)
    tokenizer.save(tmp_path / "tok")
    recipe = {
        "precision": "bf16", "device": "cpu", "log_every": 50, "save_every": 1000,
        "model": {"vision": {"image_size": 32, "patch_size": 8, "hidden_size": 64, "num_layers": 2, "num_heads": 2,
                             "intermediate_size": 128},
                  "lm": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                         "intermediate_size": 128}},
        "stages": {"instruct": {"data": {"train": "train.json", "max_length": 64},
                                "optim": {"steps": 150, "batch_size": 16, "lr": 2e-3, "warmup_steps": 10,
                                          "train_vision": True}}},
    }
    cfg = stage_config(recipe, "instruct", [f"out={tmp_path / 'run'}", f"tokenizer={tmp_path / 'tok'}",
                                            f"data.root={tmp_path}"])
    trainer = Trainer(cfg)
    trainer.fit()
    answers = Answerer(trainer.model, tokenizer).answer_records(
        [{"image": r["image"], "question": "What color is the square?"} for r in records], tmp_path)
    accuracy = sum(a == r["conversations"][1]["value"] for a, r in zip(answers, records)) / len(records)
    assert accuracy >= 0.9, answers
