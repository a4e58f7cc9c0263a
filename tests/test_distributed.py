"""Training on several processes (torchrun; gloo on CPU, nccl on CUDA): the numbers of one process,
checkpoints that resume on another number of processes, kill -9 and --resume, a plain final model.

The CPU runs split the global batch of 4 across 2 processes (2 samples each) and compare with one
process on batches of 4. The training set has 93 samples, so every epoch ends with a batch of 1: one
process gets an empty share there and must still take part in the step.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import TINY_RECIPE
from vlmkit.commands.demo import tokenizer_texts
from vlmkit.config import ConfigError
from vlmkit.data.shapes_world import write_dataset
from vlmkit.data.tokenizer import train_tokenizer
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.train.distributed import check_split, is_sharded_checkpoint, resolve_strategy, shard_units
from vlmkit.train.recipe import stage_config
from vlmkit.train.stages import STAGES
from vlmkit.train.trainer import Trainer, list_checkpoints, resume

# Two processes sum their shares' gradients in another order than one process sums the whole batch:
# float rounding only (observed: ~1e-7 relative on the losses, ~1e-6 on the weights after 13 steps).
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5
STEPS = 13  # with 2 micro-batches a step: more than the 24 batches of an epoch, so the batch of 1 is met
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_dataset(root, seed=3, n=30, image_size=48)
    train_tokenizer(tokenizer_texts(root), vocab_size=300).save(root / "tokenizer")
    records = json.loads((root / "train.json").read_text())
    assert len(records) == 96
    (root / "train_93.json").write_text(json.dumps(records[:93]))
    return root


def overrides(data_dir, out, *extra):
    return [f"out={out}", f"tokenizer={data_dir / 'tokenizer'}", f"data.root={data_dir}", "data.train=train_93.json",
            f"optim.steps={STEPS}", "save_every=6", "data.num_workers=0", *extra]


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300, **popen):
    """`torchrun --standalone --nproc_per_node N -m vlmkit train ARGS` (a free port for each run)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "vlmkit", "train", *args]
    if popen:
        return subprocess.Popen(cmd, env=ENV, **popen)
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def train_on_two(data_dir, out, *extra, nproc: int = 2) -> str:
    sets = [x for item in overrides(data_dir, out, *extra) for x in ("--set", item)]
    return torchrun(["--config", str(data_dir / "recipe.yaml"), "--stage", "instruct", *sets], nproc).stdout


def metrics(run_dir, key="loss"):
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir):
    return load_file(run_dir / "model" / "model.safetensors")


def assert_same_training(run, reference, loss_rtol=LOSS_RTOL, weight_atol=WEIGHT_ATOL):
    assert metrics(run, "step") == metrics(reference, "step")
    assert metrics(run, "samples_seen") == metrics(reference, "samples_seen")  # global counts
    assert metrics(run) == pytest.approx(metrics(reference), rel=loss_rtol)
    a, b = weights(run), weights(reference)
    assert a.keys() == b.keys()  # a plain checkpoint: tied weights stored once, as one process does
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < weight_atol, worst


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    import yaml

    (data_dir / "recipe.yaml").write_text(yaml.safe_dump(TINY_RECIPE))
    out = tmp_path_factory.mktemp("one")
    Trainer(stage_config(TINY_RECIPE, "instruct", overrides(data_dir, out))).fit()
    return out


@pytest.fixture(scope="module")
def two_processes(data_dir, one_process, tmp_path_factory):
    """Runs on two processes by strategy, made once for the module."""
    runs = {}

    def run(strategy: str):
        if strategy not in runs:
            out = tmp_path_factory.mktemp(strategy)
            # DDP reads its shares through a DataLoader worker (the empty share crosses the process boundary).
            workers = ["data.num_workers=1"] if strategy == "ddp" else []
            runs[strategy] = out, train_on_two(data_dir, out, f"strategy={strategy}", *workers)
        return runs[strategy]

    return run


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_like_one(strategy, two_processes, one_process):
    run, stdout = two_processes(strategy)
    assert_same_training(run, one_process)
    steps = metrics(run, "samples_seen")
    assert any((b - a) % 4 for a, b in zip([0] + steps, steps)), "no step met the epoch's batch of 1"
    # The main process alone printed, logged and evaluated; the evaluation is the one process's.
    assert stdout.count('"val_loss"') == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == STEPS
    evals = [json.loads((r / "stage_eval.json").read_text()) for r in (run, one_process)]
    assert evals[0]["val_loss"] == pytest.approx(evals[1]["val_loss"], rel=LOSS_RTOL)
    # Checkpoints are torch.distributed.checkpoint directories (one file per process); the final model
    # is a plain vlmkit model directory.
    checkpoints = list_checkpoints(run)
    assert [c.name for c in checkpoints] == ["step-000006", "step-000012"]
    assert all(is_sharded_checkpoint(c) and not (c / "model.safetensors").exists() for c in checkpoints)
    assert len(list(checkpoints[-1].glob("*.distcp"))) == 2
    assert (run / "model" / "config.json").is_file()
    VisionLanguageModel.from_pretrained(run)


def test_a_two_process_checkpoint_resumes_in_one_process(two_processes, one_process, tmp_path):
    """FSDP shards written by 2 processes, read by one process without a process group."""
    source, _ = two_processes("fsdp")
    run = tmp_path / "run"
    shutil.copytree(source, run)
    shutil.rmtree(run / "model")
    shutil.rmtree(run / "checkpoints" / "step-000012")
    trainer = resume(run, ["strategy=none"])
    assert trainer.state.step == 6 and not trainer.dist.enabled
    trainer.fit()
    assert_same_training(run, one_process)


def test_strategy_is_checked_against_the_launch_and_the_stage(data_dir, tmp_path, monkeypatch):
    base = stage_config(TINY_RECIPE, "instruct")
    with pytest.raises(ConfigError, match="strategy: 'zero' is not one of \\['auto', 'none', 'ddp', 'fsdp'\\]"):
        stage_config(TINY_RECIPE, "instruct", ["strategy=zero"])
    auto, none, ddp = (stage_config(TINY_RECIPE, "instruct", [f"strategy={s}"]) for s in ("auto", "none", "ddp"))
    assert [resolve_strategy(auto, n) for n in (None, 1, 2)] == ["none", "none", "ddp"]
    assert resolve_strategy(ddp, 1) == "ddp" and resolve_strategy(none, 1) == "none"
    with pytest.raises(ConfigError, match="strategy: none trains in one process, but torchrun started 2"):
        resolve_strategy(none, 2)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node N -m vlmkit train"):
        resolve_strategy(ddp, None)
    check_split(base, STAGES["instruct"], 4)
    with pytest.raises(ConfigError, match="optim.batch_size: 4 is the global batch.*multiple of 3"):
        check_split(base, STAGES["instruct"], 3)
    for stage in ("clip", "qformer"):  # contrastive losses need the whole batch in one process
        with pytest.raises(ConfigError, match=f"the {stage} stage's loss compares each sample"):
            check_split(base, STAGES[stage], 2)
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="strategy: fsdp runs one process per device, started by torchrun"):
        Trainer(stage_config(TINY_RECIPE, "instruct", overrides(data_dir, tmp_path, "strategy=fsdp")))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="strategy: fsdp does not train optim.lora adapters; use strategy: ddp"):
        Trainer(stage_config(TINY_RECIPE, "instruct", overrides(data_dir, tmp_path, "strategy=fsdp", "optim.lora={}")))


def test_which_runs_leave_weights_without_a_gradient(data_dir, tmp_path):
    """DDP looks for unused weights (and FSDP keeps the tower's running blocks in the root unit) only when
    a batch can leave a trained weight without a gradient; a frozen tower is not such a case."""
    def trainer(*extra):
        return Trainer(stage_config(TINY_RECIPE, "instruct", overrides(data_dir, tmp_path, *extra)))

    def skips(t):
        return t.stage.may_skip_weights(t.model, t.train_set)

    frozen = trainer()
    assert not skips(frozen)
    assert shard_units(frozen.model, False) == [*frozen.model.lm.layers, *frozen.model.vision.blocks]
    assert not skips(trainer("optim.train_vision=true"))  # every sample has an image, every block runs
    tail = trainer("optim.train_vision=true", "model.vision.select_layer=-2")
    assert skips(tail)
    # The trained blocks that run join the root unit; the last one, never run, keeps a unit of its own.
    assert shard_units(tail.model, True) == [*tail.model.lm.layers, tail.model.vision.blocks[1]]
    (data_dir / "no_image.json").write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "What is two and two?"}, {"from": "gpt", "value": "four"}]}]))
    assert skips(trainer("data.text_only=no_image.json"))


def test_python_m_vlmkit_is_the_command_line():
    out = subprocess.run([sys.executable, "-m", "vlmkit", "--version"], env=ENV, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().startswith("vlmkit ")


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_fsdp_processes(one_process, data_dir, tmp_path):
    """model.safetensors + an optimizer state by parameter position, cut into FSDP shards."""
    run = tmp_path / "run"
    shutil.copytree(one_process, run)
    shutil.rmtree(run / "model")
    shutil.rmtree(run / "checkpoints" / "step-000012")
    torchrun(["--resume", str(run), "--set", "strategy=fsdp"])
    assert_same_training(run, one_process)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_kill_9_and_resume_on_two_processes(strategy, data_dir, tmp_path):
    """Both processes SIGKILLed after the first checkpoint; `--resume` on two continues bit-identically."""
    args = ["--config", str(data_dir / "recipe.yaml"), "--stage", "instruct"]
    for item in overrides(data_dir, tmp_path, f"strategy={strategy}", "optim.steps=30", "save_every=5"):
        args += ["--set", item]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    proc = torchrun([*args, "--set", f"out={killed}"], start_new_session=True, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list((killed / "checkpoints").glob("step-*")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
    proc.wait()
    assert list_checkpoints(killed) and not (killed / "model").exists(), "the run finished before it could be killed"
    torchrun(["--resume", str(killed)])
    torchrun([*args, "--set", f"out={straight}"])
    assert metrics(killed, "step") == list(range(1, 31))
    assert metrics(killed) == metrics(straight)
    a, b = weights(killed), weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_with_weights_some_batches_skip(strategy, data_dir, tmp_path):
    """Text-only conversations mixed in (no tower, no connector in those shares) and a trained tower (its
    last block unused): DDP looks for unused weights, FSDP reduces zeros; the numbers stay one process's."""
    records = json.loads((data_dir / "train.json").read_text())[:20]
    text_only = [{"conversations": [{**turn, "value": turn["value"].replace("<image>", "").strip()}
                                    for turn in r["conversations"]]} for r in records]
    (data_dir / "text_only.json").write_text(json.dumps(text_only))
    extra = ["data.text_only=text_only.json", "optim.train_vision=true", "model.vision.select_layer=-2"]
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    Trainer(stage_config(TINY_RECIPE, "instruct", overrides(data_dir, one, *extra))).fit()
    train_on_two(data_dir, two, f"strategy={strategy}", *extra)
    assert_same_training(two, one)
    # The unused block has no optimizer state in the checkpoint; one process resumes from it all the same.
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "model")
    shutil.rmtree(resumed / "checkpoints" / "step-000012")
    resume(resumed, ["strategy=none"]).fit()
    assert_same_training(resumed, one)


@pytest.mark.slow
def test_packing_and_lora_on_two_ddp_processes_train_like_one(data_dir, one_process, tmp_path):
    """Each process packs its own share; LoRA adapters train under DDP: the numbers stay one process's.
    (`one_process` writes the recipe file the two processes read.)"""
    pytest.importorskip("peft", reason="pip install 'vlmkit[lora]'")
    extra = ["data.packing=true", "optim.lora={r: 4, alpha: 8, target_modules: [lm]}"]
    one, two = tmp_path / "one", tmp_path / "two"
    Trainer(stage_config(TINY_RECIPE, "instruct", overrides(data_dir, one, *extra))).fit()
    train_on_two(data_dir, two, "strategy=ddp", *extra)
    assert_same_training(two, one)
    assert (two / "model" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_fsdp_in_bf16_keeps_close_to_one_process(data_dir, one_process, tmp_path):
    """bf16 parameters and fp32 gradient reduction (vs the fp32 one-process run): close, not equal."""
    train_on_two(data_dir, tmp_path, "strategy=fsdp", "precision=bf16")
    assert metrics(tmp_path) == pytest.approx(metrics(one_process), abs=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_cuda_training_on_every_device(strategy, data_dir, one_process, tmp_path):
    """nccl, one process per GPU (cuda:LOCAL_RANK), bf16: trains, and the model comes back as a plain one."""
    nproc = min(2, torch.cuda.device_count())
    train_on_two(data_dir, tmp_path, f"strategy={strategy}", "precision=bf16", "device=cuda", nproc=nproc)
    assert metrics(tmp_path) == pytest.approx(metrics(one_process), abs=5e-2)
    assert all(is_sharded_checkpoint(c) for c in list_checkpoints(tmp_path))
    VisionLanguageModel.from_pretrained(tmp_path, device="cuda")
