"""Questions about several images, end to end: batched generation, eval of shapes-world's two-image task, chat."""

import json

import pytest
import torch

from vlmkit.cli import main
from vlmkit.commands.demo import tokenizer_texts
from vlmkit.data.processor import VLMProcessor
from vlmkit.data.shapes_world import write_dataset
from vlmkit.data.tokenizer import train_tokenizer
from vlmkit.eval.generation import Answerer
from vlmkit.eval.run_eval import evaluate, print_report
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.train.recipe import stage_config
from vlmkit.train.trainer import Trainer

from .test_train import TINY_RECIPE


@pytest.fixture
def answerer(tiny_model, tokenizer):
    # Larger random weights than at initialisation, so that greedy answers depend on the images (a
    # freshly initialised tiny model answers every prompt with the same token).
    with torch.no_grad():
        for weight in tiny_model.parameters():
            if weight.dim() > 1:
                weight.normal_(0, 0.8 / weight.shape[-1] ** 0.5)
    return Answerer(tiny_model, tokenizer, batch_size=8, max_new_tokens=6, precision="fp32")


def _record_generate_calls(monkeypatch) -> list[dict]:
    calls = []
    generate = VisionLanguageModel.generate

    def spy(self, input_ids, attention_mask=None, **kwargs):
        calls.append({"ids": input_ids, "image_counts": kwargs.get("image_counts"),
                      "images": len(kwargs.get("image_embeds") or [])})
        return generate(self, input_ids, attention_mask, **kwargs)

    monkeypatch.setattr(VisionLanguageModel, "generate", spy)
    return calls


def test_batched_multi_image_answers_equal_one_by_one(answerer, tokenizer, monkeypatch):
    torch.manual_seed(0)
    a, b, c = torch.randn(3, 32, 32), torch.randn(3, 48, 48), torch.randn(3, 32, 32)
    questions = ["is the red star in both images?", "what color is the square?", "how many objects are there?",
                 "compare <image> with <image>", "which image has more objects?"]
    images = [[a, b], c, None, [c, a], (b, c, a)]
    calls = _record_generate_calls(monkeypatch)
    together = answerer.answer(questions, images)
    assert len(calls) == 1 and sorted(calls[0]["image_counts"]) == [0, 1, 2, 2, 3]
    assert calls[0]["images"] == 8  # flattened, every row's images in reading order
    alone = [answerer.answer([q], [img])[0] for q, img in zip(questions, images)]
    assert together == alone
    assert len(set(together)) >= 3  # the answers depend on the images and questions
    swapped = answerer.answer(questions[:1], [[b, a]])[0]
    assert swapped != together[0]  # the images' order matters
    # The same batch split over several generate calls (length-sorted chunks) answers the same.
    answerer.batch_size = 2
    assert answerer.answer(questions, images) == together


def test_two_images_are_spliced_in_reading_order(tiny_model, tokenizer):
    processor = VLMProcessor.for_model(tiny_model, tokenizer)
    torch.manual_seed(1)
    a, b = torch.randn(3, 32, 32), torch.randn(3, 48, 48)
    prompt = processor.prompt("same?", image_sizes=[(32, 32), (48, 48)])
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        row = tiny_model.embed(ids, [a, b], image_counts=[2])[0]
        expected = torch.cat([tiny_model.encode_images(a[None])[0], tiny_model.encode_images(b[None])[0]])
    assert prompt.image_tokens == [16, 36]
    assert torch.allclose(row[ids[0] == tokenizer.image_id], expected, atol=1e-6)


def test_answer_checks_its_arguments(answerer):
    with pytest.raises(ValueError, match="2 questions but 1 image entries"):
        answerer.answer(["a?", "b?"], [None])
    with pytest.raises(ValueError, match=r"expected a preprocessed image \[3, H, W\], got shape \(2, 3, 32, 32\)"):
        answerer.answer(["a?"], [torch.zeros(2, 3, 32, 32)])


@pytest.fixture(scope="module")
def multi_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi")
    write_dataset(out, seed=4, n=12, multi_image=12)
    return out


@pytest.fixture
def model_dir(tiny_model, tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path / "model", tokenizer)
    return tmp_path / "model"


def test_eval_scores_the_two_image_split(model_dir, multi_data, tmp_path, capsys, monkeypatch):
    calls = _record_generate_calls(monkeypatch)
    results = evaluate(model_dir, data_root=multi_data, batch_size=4, out=tmp_path / "eval.json")
    multi_qa = [json.loads(line) for line in (multi_data / "multi_test_qa.jsonl").read_text().splitlines()]
    assert results["multi_test"]["n_samples"] == len(multi_qa) > 0
    assert set(results["multi_test"]["n_by_type"]) <= {"multi_count", "multi_both", "multi_added"}
    assert "multi_both" in results["multi_test"]["vqa_accuracy_by_type"]
    assert any(c["image_counts"] and max(c["image_counts"]) == 2 for c in calls)  # two images per prompt
    assert json.loads((tmp_path / "eval.json").read_text())["multi_test"] == results["multi_test"]
    print_report(results)
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| metric | test | compositional | multi_test |"
    assert any(line.startswith("| VQA accuracy: multi_both | – | – | ") for line in table)

    # With the true answers every two-image type scores 1; asking for the split by name works too.
    monkeypatch.setattr(Answerer, "answer_records", lambda self, records, root: [r["answer"] for r in records])
    perfect = evaluate(model_dir, split="multi_test", data_root=multi_data, out=tmp_path / "perfect.json")
    assert perfect["split"] == "multi_test" and perfect["vqa_accuracy"] == 1.0
    assert set(perfect["vqa_accuracy_by_type"].values()) == {1.0}


def test_chat_with_two_images(model_dir, multi_data, capsys, monkeypatch):
    calls = _record_generate_calls(monkeypatch)
    first, second = (str(multi_data / "images" / f"multi_000000_{k}.png") for k in (1, 2))
    common = ["--device", "cpu", "--max-new-tokens", "3"]
    assert main(["chat", str(model_dir), "--image", first, "--image", second, *common,
                 "Is the red square in both images?"]) == 0
    assert main(["chat", str(model_dir), "--image", first, "--image", second, *common,
                 "Compare <image> with <image>."]) == 0
    assert [c["image_counts"] for c in calls] == [[2], [2]] and [c["images"] for c in calls] == [2, 2]
    assert calls[0]["ids"][0].tolist() != calls[1]["ids"][0].tolist()  # the typed tags moved the images
    capsys.readouterr()
    assert main(["chat", str(model_dir), "--image", first, "--image", second, *common, "Is <image> red?"]) == 1
    err = capsys.readouterr().err
    assert "the question has 1 <image> tag(s) but 2 image(s) were given" in err and "Traceback" not in err


def test_synth_command_writes_the_two_image_task(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["synth", "--out", str(out), "--n", "10", "--multi-image", "10", "--seed", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["multi_image"] == 10
    for split in ("train", "val", "test"):
        assert (out / f"multi_{split}.json").is_file() and (out / f"multi_{split}_qa.jsonl").is_file()
    assert sum(c["pairs"] for c in summary["multi_counts"].values()) == 10
    assert main(["synth", "--out", str(tmp_path / "bad"), "--n", "10", "--multi-image", "-1"]) == 1
    assert "multi_image must be an int >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("train_vision", [False, True])  # frozen tower: cached features; else pixels
def test_instruct_stage_trains_on_two_image_records(tmp_path, train_vision):
    data = tmp_path / "data"
    write_dataset(data, seed=1, n=10, image_size=48, multi_image=16)
    train_tokenizer(tokenizer_texts(data), vocab_size=300).save(data / "tokenizer")
    assert "first" in "".join(tokenizer_texts(data))  # the two-image questions are in the tokenizer's texts
    cfg = stage_config(TINY_RECIPE, "instruct", [
        f"out={tmp_path / 'run'}", f"tokenizer={data / 'tokenizer'}", f"data.root={data}",
        "data.train=multi_train.json", "data.val=multi_val.json", f"optim.train_vision={str(train_vision).lower()}"])
    trainer = Trainer(cfg)
    batches = []
    loss = trainer.stage.loss
    trainer.stage.loss = lambda model, batch: batches.append(batch["image_counts"].tolist()) or loss(model, batch)
    results = trainer.fit()
    assert batches and all(counts == [2] * len(counts) for counts in batches)
    assert results["val_samples"] > 0 and torch.isfinite(torch.tensor(results["val_loss"]))
