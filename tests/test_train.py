"""Training: stage freezing, exact resume (in-process and after kill -9), recipes, batching."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from vlmkit.commands.demo import tokenizer_texts
from vlmkit.data.synthetic import write_dataset
from vlmkit.data.tokenizer import train_tokenizer
from vlmkit.train.config import ConfigError, load_run_config
from vlmkit.train.recipe import stage_config
from vlmkit.train.trainer import BatchStream, Trainer, resume

TINY_RECIPE = {
    "precision": "fp32",
    "device": "cpu",
    "log_every": 1,
    "save_every": 100,
    "eval_samples": 8,
    "model": {
        "vision": {"image_size": 48, "patch_size": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                   "intermediate_size": 64},
        "lm": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64},
        "connector": {"name": "mlp2x_gelu"},
    },
    "stages": {
        "clip": {"text": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2,
                          "intermediate_size": 64},
                 "clip_embed_dim": 16,
                 "data": {"train": "captions_train.jsonl", "val": "captions_val.jsonl", "max_length": 48},
                 "optim": {"steps": 3, "batch_size": 8, "warmup_steps": 1}},
        "align": {"data": {"train": "captions_train.jsonl", "val": "captions_val.jsonl", "max_length": 256},
                  "optim": {"steps": 3, "batch_size": 4, "warmup_steps": 1}},
        "instruct": {"data": {"train": "train.json", "val": "val.json", "max_length": 320},
                     "optim": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "grad_accum": 2}},
    },
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_dataset(root, seed=3, n=30, image_size=48)
    tok = train_tokenizer(tokenizer_texts(root), vocab_size=300)
    tok.save(root / "tokenizer")
    return root


def config_for(stage, data_dir, out, *extra):
    return stage_config(TINY_RECIPE, stage, [f"out={out}", f"tokenizer={data_dir / 'tokenizer'}",
                                             f"data.root={data_dir}", *extra])


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stage,train_vision", [("clip", False), ("align", False), ("instruct", False),
                                                ("instruct", True)])
def test_stage_freezing(stage, train_vision, data_dir, tmp_path):
    cfg = config_for(stage, data_dir, tmp_path / stage, f"optim.train_vision={str(train_vision).lower()}")
    trainer = Trainer(cfg)
    before = snapshot(trainer.model)
    trainer.fit(stop_after=2)
    after = snapshot(trainer.model)
    expected_trainable = {"clip": {"vision", "text", "image_proj", "text_proj", "logit_scale"},
                          "align": {"connector"},
                          "instruct": {"connector", "lm"} | ({"vision"} if train_vision else set())}[stage]
    params = dict(trainer.model.named_parameters())
    for name, p in params.items():
        module = name.split(".")[0]
        if module in expected_trainable:
            assert p.requires_grad, name
        else:
            assert not p.requires_grad, name
            assert torch.equal(before[name], after[name]), f"frozen {name} changed"
    # Trainable weights moved (at least in every trainable module) ...
    for module in expected_trainable:
        assert any(not torch.equal(before[n], after[n]) for n in params if n.split(".")[0] == module), module
    # ... and only they have optimizer state (a trainable weight the forward pass never uses, like
    # the ViT's final norm under a VLM, gets no gradient and hence no state either).
    with_state = {id(p) for p in trainer.optimizer.state}
    assert with_state and with_state <= {id(p) for p in params.values() if p.requires_grad}
    assert not with_state & {id(p) for p in params.values() if not p.requires_grad}


def test_resume_is_bit_identical(data_dir, tmp_path):
    straight = Trainer(config_for("instruct", data_dir, tmp_path / "straight"))
    straight.fit()
    interrupted = Trainer(config_for("instruct", data_dir, tmp_path / "resumed", "save_every=2"))
    interrupted.fit(stop_after=2)
    del interrupted
    resumed = resume(tmp_path / "resumed")
    assert resumed.state.step == 2
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    losses = lambda run: [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses("straight") == losses("resumed")
    assert (tmp_path / "resumed" / "model" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "resumed" / "stage_eval.json").read_text())["val_loss"] > 0


def test_resume_after_kill_9(data_dir, tmp_path):
    """A separate process is SIGKILLed after its first checkpoint; --resume finishes it exactly."""
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["stages"]["instruct"]["optim"]["steps"] = 40
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    args = [sys.executable, "-m", "vlmkit.cli", "train", "--config", str(recipe_path), "--stage", "instruct",
            "--set", f"tokenizer={data_dir / 'tokenizer'}", "--set", f"data.root={data_dir}", "--set", "save_every=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--set", f"out={run_dir}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((run_dir / "checkpoints").glob("step-*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert checkpoints and not (run_dir / "model").exists(), "the run finished before it could be killed"
    subprocess.run([sys.executable, "-m", "vlmkit.cli", "train", "--resume", str(run_dir)], env=env, check=True,
                   capture_output=True)
    subprocess.run(args + ["--set", f"out={tmp_path / 'straight'}"], env=env, check=True, capture_output=True)
    from safetensors.torch import load_file

    a = load_file(run_dir / "model" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_clip_stage_reports_retrieval(data_dir, tmp_path):
    results = Trainer(config_for("clip", data_dir, tmp_path / "clip")).fit()
    assert 0.0 <= results["retrieval_top1"] <= results["retrieval_top5"] <= 1.0
    assert results["retrieval_candidates"] > 1
    assert (tmp_path / "clip" / "model" / "config.json").is_file()


def test_batch_stream_is_deterministic_and_length_grouped():
    lengths = [(i * 37) % 100 for i in range(1000)]
    a, b = BatchStream(lengths, 10, seed=1), BatchStream(lengths, 10, seed=1)
    assert [a.batch(k) for k in range(250)] == [b.batch(k) for k in reversed(range(250))][::-1]
    epoch = [i for k in range(100) for i in a.batch(k)]
    assert sorted(epoch) == list(range(1000))  # each sample exactly once per epoch
    spread = sum(max(lengths[i] for i in a.batch(k)) - min(lengths[i] for i in a.batch(k)) for k in range(100))
    assert spread / 100 < 15  # random batches of 10 would spread ~80
    assert a.batch(100) != a.batch(0)  # the next epoch is shuffled anew


def test_recipe_errors_name_the_problem(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(TINY_RECIPE))
    with pytest.raises(ConfigError, match="multi-stage recipe: choose a stage"):
        load_run_config(path)
    with pytest.raises(ConfigError, match="unknown key\\(s\\) \\['lrr'\\]"):
        load_run_config(path, ["optim.lrr=1"], stage="align")
    with pytest.raises(ConfigError, match="stage: 'pretrain' is not one of"):
        stage_config({**TINY_RECIPE, "stages": {"pretrain": {}}}, "pretrain")
    cfg = load_run_config(path, ["optim.lr=3e-4", "optim.module_lr={lm: 1e-4}"], stage="instruct")
    assert cfg.optim.lr == 3e-4 and cfg.optim.module_lr == {"lm": 1e-4} and cfg.optim.grad_accum == 2


@pytest.mark.parametrize("n,batch_size,seed,window", [(1000, 10, 1, 32), (50, 4, 0, 2), (37, 5, 3, 32), (7, 8, 0, 1)])
def test_sampler_order_equals_the_batch_stream_order(n, batch_size, seed, window):
    from vlmkit.train.sampler import ResumableBatchSampler

    lengths = [(i * 37) % 100 for i in range(n)]
    old = BatchStream(lengths, batch_size, seed, window=window)
    new = ResumableBatchSampler(lengths, batch_size, seed, window=window)
    expected = [old.batch(k) for k in range(4 * old.per_epoch)]
    got = []
    for epoch in range(4):
        new.seek(epoch * new.per_epoch)
        got += list(new)
    assert got == expected
    middle = old.per_epoch + old.per_epoch // 2  # mid-epoch 1
    new.seek(middle)
    assert list(new) == expected[middle : 2 * old.per_epoch]
