"""Training: stage freezing, exact resume (in-process and after kill -9), recipes, batching."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from vlmkit.commands.demo import tokenizer_texts
from vlmkit.data.shapes_world import write_dataset
from vlmkit.data.tokenizer import train_tokenizer
from vlmkit.train.config import ConfigError, default_num_workers
from vlmkit.train.recipe import load_run_config, stage_config
from vlmkit.train.sampler import ResumableBatchSampler
from vlmkit.train.trainer import Trainer, list_checkpoints, resume

QFORMER = {"name": "qformer", "num_queries": 4, "num_layers": 2, "num_heads": 2, "cross_attention_frequency": 1}

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
        "qformer": {"model": {"connector": QFORMER}, "qformer": {"embed_dim": 16},
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


XATTN = "model.fusion=cross_attention"


@pytest.mark.parametrize("stage,overrides,expected_trainable", [
    ("clip", [], {"vision", "text", "image_proj", "text_proj", "logit_scale"}),
    ("qformer", [], {"qformer", "word_embeddings", "position_embeddings", "vision_proj", "text_proj", "itm_head",
                     "logit_scale"}),
    ("align", [], {"connector"}),
    ("align", [XATTN], {"connector", "fusion"}),
    ("instruct", [], {"connector", "lm"}),
    ("instruct", ["optim.train_vision=true"], {"connector", "lm", "vision"}),
    ("instruct", [XATTN, "optim.train_lm=false"], {"connector", "fusion"}),  # Flamingo: the LM stays frozen
])
def test_stage_freezing(stage, overrides, expected_trainable, data_dir, tmp_path):
    cfg = config_for(stage, data_dir, tmp_path / stage, *overrides)
    trainer = Trainer(cfg)
    before = snapshot(trainer.model)
    trainer.fit(stop_after=2)
    after = snapshot(trainer.model)
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


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    """The reference: the instruct stage trained without interruption (no workers)."""
    out = tmp_path_factory.mktemp("straight")
    trainer = Trainer(config_for("instruct", data_dir, out, "data.num_workers=0"))
    trainer.fit()
    return trainer.model.state_dict(), metrics(out, "loss")


def metrics(run_dir, key):
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_identical(workers, straight_run, data_dir, tmp_path):
    """Interrupted and resumed, with or without data workers: the same weights and losses as straight."""
    interrupted = Trainer(config_for("instruct", data_dir, tmp_path, "save_every=2", f"data.num_workers={workers}"))
    interrupted.fit(stop_after=2)
    assert not multiprocessing.active_children()  # the workers stop with fit()
    del interrupted
    resumed = resume(tmp_path)
    assert resumed.state.step == 2 and resumed.num_workers == workers
    resumed.fit()
    assert not multiprocessing.active_children()
    a, b = straight_run[0], resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(tmp_path, "step") == [1, 2, 3, 4]
    assert metrics(tmp_path, "loss") == straight_run[1]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "stage_eval.json").read_text())["val_loss"] > 0


def test_checkpoints_hold_the_sampler_state_and_old_ones_still_resume(straight_run, data_dir, tmp_path):
    interrupted = Trainer(config_for("instruct", data_dir, tmp_path, "save_every=3"))
    interrupted.fit(stop_after=3)
    checkpoint = list_checkpoints(tmp_path)[-1]
    meta = json.loads((checkpoint / "trainer_state.json").read_text())
    per_epoch = interrupted.sampler.per_epoch
    assert meta["batches_seen"] == 6  # 3 steps of 2 micro-batches
    assert (meta["sampler"]["epoch"], meta["sampler"]["position"]) == divmod(6, per_epoch)
    assert {k: meta["sampler"][k] for k in ("seed", "batch_size", "num_samples")} == {
        "seed": 0, "batch_size": 4, "num_samples": len(interrupted.train_set)}

    # A checkpoint written before the sampler state existed: the position is the batch count.
    (checkpoint / "trainer_state.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "sampler"}))
    resumed = resume(tmp_path)
    assert resumed.sampler.batches_done == 6
    resumed.fit()
    assert all(torch.equal(straight_run[0][k], v) for k, v in resumed.model.state_dict().items())


def test_resuming_another_batch_order_is_refused(data_dir, tmp_path):
    Trainer(config_for("instruct", data_dir, tmp_path, "save_every=1")).fit(stop_after=1)
    with pytest.raises(ValueError, match="another batch order \\(batch_size 4 -> 2\\)"):
        resume(tmp_path, ["optim.batch_size=2"])
    checkpoint = list_checkpoints(tmp_path)[-1]
    meta = json.loads((checkpoint / "trainer_state.json").read_text())
    (checkpoint / "trainer_state.json").write_text(json.dumps({**meta, "sampler": {**meta["sampler"], "version": 9}}))
    with pytest.raises(ValueError, match="step-000001: cannot resume the data order: unknown batch sampler state"):
        resume(tmp_path)


def test_workers_serve_the_same_batches_with_frozen_tower_features(data_dir, tmp_path):
    """Batches read by 2 worker processes equal those collated in the training process, features included."""
    batches = {}
    for workers in (0, 2):
        trainer = Trainer(config_for("instruct", data_dir, tmp_path / str(workers), f"data.num_workers={workers}"))
        assert trainer.train_set._features is not None  # the frozen tower's features, computed up front
        batches[workers] = [trainer.next_batch()[0] for _ in range(2 * trainer.sampler.per_epoch + 1)]
        assert len(multiprocessing.active_children()) == workers  # persistent: the same 2 across epochs
        assert trainer.state.batches_seen == 2 * trainer.sampler.per_epoch + 1
        trainer.close_data()
    assert not multiprocessing.active_children()
    for a, b in zip(*batches.values(), strict=True):
        assert a.keys() == b.keys() and "image_features" in a
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_num_workers_config():
    assert [default_num_workers(n) for n in (1, 2, 3, 4, 8, 64)] == [0, 0, 2, 3, 4, 4]
    cfg = stage_config(TINY_RECIPE, "align")
    assert cfg.data.num_workers is None and cfg.data.resolved_num_workers() == default_num_workers()
    assert stage_config(TINY_RECIPE, "align", ["data.num_workers=3"]).data.resolved_num_workers() == 3
    for bad in ("-1", "true", "1.5"):
        with pytest.raises(ConfigError, match="data.num_workers"):
            stage_config(TINY_RECIPE, "align", [f"data.num_workers={bad}"])


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


def test_qformer_stage_learns_and_starts_a_vlm_qformer_connector(data_dir, tmp_path):
    from vlmkit.models.qformer_pretraining import QFormerPretrainer

    run = tmp_path / "qformer"
    results = Trainer(config_for("qformer", data_dir, run, "optim.steps=30", "optim.lr=3e-3")).fit()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all({"itc", "itm", "itg", "itm_accuracy"} <= set(record) for record in logged)
    loss = [record["loss"] for record in logged]
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.5, loss
    assert 0.0 <= results["retrieval_top1"] <= results["retrieval_top5"] <= 1.0 and results["retrieval_candidates"] > 1
    assert {"val_itc", "val_itm", "val_itg", "val_itm_accuracy"} <= set(results)

    # A VLM stage starts its connector's queries and layers (and, by vision_from, its tower) from the run.
    connector = "model.connector=" + json.dumps(QFORMER)
    trainer = Trainer(config_for("align", data_dir, tmp_path / "align", connector, f"vision_from={run}",
                                 f"connector_from={run}"))
    pretrained = QFormerPretrainer.from_pretrained(run)
    loaded = trainer.model.connector.qformer.state_dict()
    assert loaded.keys() == pretrained.qformer.query_state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in pretrained.qformer.query_state_dict().items())
    assert trainer.model.tokens_per_image == QFORMER["num_queries"]
    trainer.fit(stop_after=1)

    # (Without vision_from the tower is random: the same as the run's frozen one with the same seed.)
    with pytest.raises(ConfigError, match="learnt to read another vision tower's features"):
        Trainer(config_for("align", data_dir, tmp_path / "a2", connector, f"connector_from={run}", "seed=1"))
    other = "model.connector=" + json.dumps({**QFORMER, "num_queries": 6})
    with pytest.raises(ConfigError, match="differs from model.connector .*: num_queries 4 vs 6"):
        Trainer(config_for("align", data_dir, tmp_path / "a3", other, f"vision_from={run}", f"connector_from={run}"))
    with pytest.raises(ConfigError, match="model.connector.name is 'mlp2x_gelu'; set it to qformer"):
        Trainer(config_for("align", data_dir, tmp_path / "a4", f"vision_from={run}", f"connector_from={run}"))
    with pytest.raises(ConfigError, match="connector_from: the clip stage does not start from"):
        config_for("clip", data_dir, tmp_path / "a5", f"connector_from={run}")


def test_batch_sampler_is_deterministic_and_length_grouped():
    lengths = [(i * 37) % 100 for i in range(1000)]
    a, b = ResumableBatchSampler(lengths, 10, seed=1), ResumableBatchSampler(lengths, 10, seed=1)
    assert [a.batch(k) for k in range(250)] == [b.batch(k) for k in reversed(range(250))][::-1]
    epoch = [i for k in range(100) for i in a.batch(k)]
    assert sorted(epoch) == list(range(1000))  # each sample exactly once per epoch
    spread = sum(max(lengths[i] for i in a.batch(k)) - min(lengths[i] for i in a.batch(k)) for k in range(100))
    assert spread / 100 < 15  # random batches of 10 would spread ~80
    assert a.batch(100) != a.batch(0)  # the next epoch is shuffled anew
    assert list(a) == [a.batch(k) for k in range(100)] and len(a) == 100  # one pass is one epoch


def test_batch_sampler_keeps_the_order_of_earlier_releases():
    """The order computed by the trainer's former BatchStream, recorded from it: changing it would change
    every run's numbers (the demo's included)."""
    lengths = [(i * 37) % 100 for i in range(50)]
    sampler = ResumableBatchSampler(lengths, 4, seed=0)
    assert sampler.per_epoch == 13
    assert [sampler.batch(k) for k in (0, 1, 2)] == [[15, 34, 7, 26], [47, 20, 39, 12], [29, 2, 48, 21]]
    assert [sampler.batch(k) for k in (13, 14, 15)] == [[8, 27], [11, 30, 3, 49], [22, 41, 14, 33]]
    windows = ResumableBatchSampler(lengths, 4, seed=0, window=2)
    assert [windows.batch(k) for k in range(4)] == [[7, 37, 29, 21], [6, 44, 17, 39], [22, 33, 31, 34],
                                                      [26, 10, 2, 24]]
    equal = ResumableBatchSampler([1] * 10, 3, seed=0)
    assert [equal.batch(k) for k in range(8)] == [[2], [4, 1, 7], [0, 8, 6], [5, 3, 9], [5, 6, 1], [4], [2, 0, 8],
                                                  [9, 3, 7]]


def test_batch_sampler_resumes_mid_epoch():
    lengths = [(i * 37) % 100 for i in range(50)]
    sampler = ResumableBatchSampler(lengths, 4, seed=0)
    stream = [sampler.batch(k) for k in range(3 * 13)]
    sampler.seek(13 + 5)
    assert (sampler.epoch, sampler.position, len(sampler)) == (1, 5, 8)
    passes = list(sampler)
    sampler.seek(26)
    passes += list(sampler)
    assert passes == stream[18:]
    state = sampler.state_dict()
    fresh = ResumableBatchSampler(lengths, 4, seed=0)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert list(fresh) == stream[26:]
    with pytest.raises(ValueError, match="another batch order \\(seed 0 -> 1\\)"):
        ResumableBatchSampler(lengths, 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="another batch order \\(num_samples 50 -> 49\\)"):
        ResumableBatchSampler(lengths[:49], 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="bad batch sampler state"):
        fresh.load_state_dict({**state, "position": 13})


def test_batch_sampler_splits_every_global_batch_across_ranks():
    lengths = [(i * 37) % 100 for i in range(50)]
    single = ResumableBatchSampler(lengths, 4, seed=0)
    ranks = [ResumableBatchSampler(lengths, 4, seed=0, rank=r, world_size=2) for r in (0, 1)]
    for k in range(3 * single.per_epoch):
        shares = [r.batch(k) for r in ranks]
        assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == sorted(single.batch(k))
    for r in ranks:
        r.seek(single.per_epoch + 2)
    single.seek(single.per_epoch + 2)
    for whole, first, second in zip(single, *ranks, strict=True):
        assert sorted(first + second) == sorted(whole)
    with pytest.raises(ValueError, match="rank must be in"):
        ResumableBatchSampler(lengths, 4, seed=0, rank=2, world_size=2)


def test_batch_sampler_can_key_samples_by_epoch():
    sampler = ResumableBatchSampler([1] * 10, 3, seed=0, with_epoch=True)
    sampler.seek(sampler.per_epoch)
    assert next(iter(sampler)) == [(i, 1) for i in sampler.batch(sampler.per_epoch)]


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



def test_recipes_resolve_by_name_and_paths_win(tmp_path, monkeypatch):
    from vlmkit.train.recipe import built_in_recipes, resolve_recipe

    assert {"demo", "flamingo", "smol-dino"} <= set(built_in_recipes())
    assert resolve_recipe("demo").name == "demo.yaml" and resolve_recipe("demo.yaml") == resolve_recipe("demo")
    cfg = load_run_config("demo", stage="dense")
    assert cfg.stage == "dense" and cfg.model["vision"]["stem"] == "conv"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(TINY_RECIPE))  # a file of that name wins over the built-in
    assert resolve_recipe("demo.yaml").resolve() == tmp_path / "demo.yaml"
    with pytest.raises(FileNotFoundError, match="no built-in recipe of that name \\(built-in: demo, "):
        resolve_recipe("nonesuch")
    with pytest.raises(FileNotFoundError, match="no such config file"):
        resolve_recipe("sub/demo.yaml")  # a path is never looked up among the built-ins


def test_stage_registry_is_what_configs_and_the_cli_read(capsys):
    from vlmkit.cli import main
    from vlmkit.train.stages import STAGES, Stage, register

    assert list(STAGES) == ["clip", "dense", "qformer", "align", "instruct"]
    assert all(stage.trains and stage.reads for stage in STAGES.values())
    assert main(["train", "--list-stages"]) == 0
    table = capsys.readouterr().out
    assert all(f"| `{name}` |" in table for name in STAGES)

    class Clash(Stage):
        name = "dense"

    with pytest.raises(ValueError, match="already registered"):
        register(Clash)
    with pytest.raises(ConfigError, match="vision_from: the clip stage does not start from"):
        stage_config({**TINY_RECIPE, "stages": {"clip": {}}}, "clip", ["vision_from=runs/x"])
