"""VLMs built from pretrained parts (tiny random HF checkpoints), trained with the usual stages and
commands, and a plain HF language model answering through `vlmkit chat`."""

import pytest
import torch
import yaml

import vlmkit
from vlmkit.cli import main
from vlmkit.commands.demo import tokenizer_texts
from vlmkit.data.processor import VLMProcessor
from vlmkit.data.shapes_world import write_dataset
from vlmkit.models.vlm import VisionLanguageModel

from .test_chat import SMOLLM2_TEMPLATE

transformers = pytest.importorskip("transformers")


def hf_tokenizer(texts, directory):
    """A byte-level BPE without an `<image>` token, saved by transformers with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                               eos_token="<|im_end|>", pad_token="<|im_end|>",
                                               chat_template=SMOLLM2_TEMPLATE)
    tok.save_pretrained(directory)
    return tok


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    data = root / "data"
    write_dataset(data, seed=3, n=24, image_size=48)
    lm_dir, vision_dir = root / "llama", root / "dinov2"
    tok = hf_tokenizer(list(tokenizer_texts(data)) + ["system user assistant You are a helpful"] * 10, lm_dir)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512))
    with torch.no_grad():  # larger weights than the default init, so greedy decoding varies from token to token
        for name, p in llama.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    llama.save_pretrained(lm_dir)
    transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=42, patch_size=14,
        layerscale_value=0.5)).save_pretrained(vision_dir)
    return {"data": data, "lm": lm_dir, "vision": vision_dir, "vocab": len(tok), "root": root}


RECIPE = {
    "precision": "fp32", "device": "cpu", "log_every": 1, "save_every": 100, "eval_samples": 4,
    "stages": {
        "align": {"data": {"train": "captions_train.jsonl", "val": "captions_val.jsonl", "max_length": 256},
                  "optim": {"steps": 2, "batch_size": 4, "warmup_steps": 1}},
        "instruct": {"data": {"train": "train.json", "val": "val.json", "max_length": 512},
                     "optim": {"steps": 2, "batch_size": 4, "warmup_steps": 1}},
    },
}


def test_vlm_from_pretrained_parts_trains_and_chats(parts, capsys):
    root, data = parts["root"], parts["data"]
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "model": {
        "vision": {"pretrained": str(parts["vision"]), "image_size": 28, "select_layer": -1},
        "lm": {"pretrained": str(parts["lm"])},
        "connector": {"name": "mlp2x_gelu"}}}))
    common = ["--config", str(recipe), "--set", f"data.root={data}"]
    assert main(["train", *common, "--stage", "align", "--set", f"out={root / 'align'}"]) == 0
    align = VisionLanguageModel.from_pretrained(root / "align")
    tok = vlmkit.load_tokenizer(root / "align" / "model")

    # The tokenizer gained <image> at the end of the vocabulary; the LM grew by that one row, still tied.
    vocab = parts["vocab"]
    assert tok.image_id == vocab and align.config.image_token_id == vocab
    assert tok.chat_template == SMOLLM2_TEMPLATE
    assert align.config.lm.vocab_size == vocab + 1 and align.lm.lm_head.weight is align.lm.embed_tokens.weight
    assert align.config.vision.native_image_size == 42 and align.tokens_per_image == 4
    # Align trains the connector only: the tower and the LM are still exactly the checkpoints' weights.
    lm, vit = vlmkit.load_language_model(parts["lm"]), vlmkit.load_vision_tower(parts["vision"])
    assert torch.equal(align.lm.embed_tokens.weight[:vocab], lm.embed_tokens.weight)
    assert torch.equal(align.lm.layers[1].mlp.up_proj.weight, lm.layers[1].mlp.up_proj.weight)
    assert torch.equal(align.vision.blocks[1].ls2.scale, vit.blocks[1].ls2.scale)

    assert main(["train", *common, "--stage", "instruct", "--set", f"out={root / 'instruct'}",
                 "--set", f"init_from={root / 'align'}"]) == 0
    instruct = VisionLanguageModel.from_pretrained(root / "instruct")
    assert not torch.equal(instruct.lm.layers[1].mlp.up_proj.weight, lm.layers[1].mlp.up_proj.weight)
    capsys.readouterr()
    image = data / "images" / "000000.png"
    assert main(["chat", str(root / "instruct"), "--image", str(image), "--device", "cpu", "--max-new-tokens", "4",
                 "What color is the star?"]) == 0
    assert capsys.readouterr().err == ""

    # The result exports to transformers' Llava, which computes the same logits.
    assert main(["export", "--format", "llava-hf", str(root / "instruct"), str(root / "llava")]) == 0
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(root / "llava").eval()
    processor = VLMProcessor.for_model(instruct, tok)
    ids = torch.tensor([processor.prompt("What color is the star?").input_ids])
    pixels = processor.preprocess(image)[None]
    with torch.no_grad():
        assert (instruct.eval()(ids, pixels).logits - ref(input_ids=ids, pixel_values=pixels).logits).abs().max() < 1e-4


def test_chat_with_a_plain_hf_language_model(parts, capsys):
    from vlmkit.eval.generation import Answerer

    lm_dir = parts["lm"]
    ref = transformers.LlamaForCausalLM.from_pretrained(lm_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(lm_dir)
    messages = [{"role": "user", "content": "what color is the square?"}]
    prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    expected = ref.generate(**prompt, max_new_tokens=6, do_sample=False, eos_token_id=hf_tok.eos_token_id)
    expected = expected[0, prompt["input_ids"].shape[1]:].tolist()
    assert len(set(expected)) > 2  # a varied answer, so matching it means something

    answerer = Answerer(vlmkit.load_language_model(lm_dir), vlmkit.load_tokenizer(lm_dir), batch_size=1,
                        max_new_tokens=6, precision="fp32")
    prompt_ids = answerer.processor.prompt(messages[0]["content"], with_image=False).input_ids
    assert prompt_ids == prompt["input_ids"][0].tolist()
    ours = answerer.tok.decode(expected[: expected.index(hf_tok.eos_token_id)] if hf_tok.eos_token_id in expected
                               else expected).strip()
    assert answerer.answer([messages[0]["content"]], [None]) == [ours]

    assert main(["chat", str(lm_dir), "--device", "cpu", "--max-new-tokens", "5", "what color is the square?"]) == 0
    assert main(["chat", str(lm_dir), "--image", "x.png", "hello"]) == 1
    assert "language model without a vision tower" in capsys.readouterr().err


def test_pretrained_tower_and_clip_stage_tower_conflict(parts, tmp_path):
    from vlmkit.config import ConfigError
    from vlmkit.train.recipe import stage_config
    from vlmkit.train.trainer import Trainer

    model = {"vision": {"pretrained": str(parts["vision"])}, "lm": {"pretrained": str(parts["lm"])}}
    recipe = {**RECIPE, "model": model}
    cfg = stage_config(recipe, "align", [f"out={tmp_path}", f"data.root={parts['data']}", "vision_from=runs/clip"])
    with pytest.raises(ConfigError, match="either vision_from .* or model.vision.pretrained"):
        Trainer(cfg)
