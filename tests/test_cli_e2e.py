"""The commands a user runs, end to end on a tiny dataset: synth, train, eval, chat, info."""

import json

import yaml

from vlmkit.cli import main

from .test_train import TINY_RECIPE


def test_synth_train_eval_chat(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--n", "24", "--image-size", "48", "--seed", "1"]) == 0
    from vlmkit.commands.demo import tokenizer_texts
    from vlmkit.data.tokenizer import train_tokenizer

    train_tokenizer(tokenizer_texts(data), vocab_size=300).save(data / "tokenizer")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    run = tmp_path / "run"
    common = ["--set", f"tokenizer={data / 'tokenizer'}", "--set", f"data.root={data}"]
    assert main(["train", "--config", str(recipe), "--stage", "instruct", "--set", f"out={run}", *common]) == 0
    assert (run / "model" / "model.safetensors").is_file() and (run / "metrics.jsonl").is_file()
    capsys.readouterr()

    assert main(["eval", str(run), "--limit", "30", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "| VQA accuracy |" in table and "compositional" in table
    results = json.loads((run / "eval.json").read_text())
    for key in ("vqa_accuracy", "vqa_accuracy_by_type", "pope", "grounding", "compositional", "n_samples"):
        assert key in results, key
    available = len((data / "test_qa.jsonl").read_text().splitlines())
    assert results["n_samples"] == min(30, available) > 0
    assert {"accuracy", "precision", "recall", "f1", "yes_ratio"} <= set(results["pope"])
    assert {"acc50", "miou"} <= set(results["grounding"])

    image = data / "images" / "000000.png"
    assert main(["chat", str(run), "--image", str(image), "--device", "cpu", "--max-new-tokens", "5",
                 "What color is the star?"]) == 0
    capsys.readouterr()  # an untrained model's answer: any text, possibly empty
    assert main(["info", str(run)]) == 0
    assert "tokens per image" in capsys.readouterr().out


def test_train_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: instruct\noptim: {lr: fast}\n")
    assert main(["train", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "optim.lr: expected a number, got 'fast'" in err and "Traceback" not in err
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 1
    assert "not a training run directory" in capsys.readouterr().err
