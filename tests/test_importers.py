"""Conversions of packaged pretrained models (GGUF Llama, ONNX DINOv2) into HF directories, on tiny inputs."""

import io
import json

import gguf
import numpy as np
import onnx
import pytest
import torch
import transformers

from vlmkit.cli import main
from vlmkit.data.tokenizer import train_tokenizer
from vlmkit.hf.importers import import_model
from vlmkit.hf.importers.gguf_llama import (
    build_tokenizer,
    convert_gguf_llama,
    hf_tensor_name,
    permute_rope_rows,
    unpermute_rope_rows,
)
from vlmkit.hf.importers.onnx_dinov2 import ONNXImportError, backbone_weights, canonical_name, convert_onnx_dinov2
from vlmkit.hf.importers.packages import MissingPackageError, Requirement, ensure_installed

# --- RoPE row order ----------------------------------------------------------------------------------


def _rope_hf(x, angles):  # pairs (i, i + d/2), as transformers' rotate_half
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = np.cos(angles), np.sin(angles)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rope_interleaved(x, angles):  # pairs (2i, 2i + 1), as llama.cpp's "normal" RoPE
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = np.cos(angles), np.sin(angles)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return out


def test_unpermute_inverts_permute():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5))
    assert not np.allclose(permute_rope_rows(w, 3), w)
    np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(w, 3), 3), w)


def test_permuted_rows_with_interleaved_rope_equal_hf_rope():
    """The reason for the permutation: llama.cpp's adjacent-pair RoPE on permuted rows gives HF's
    rotate-half RoPE on the original rows, up to the same row reordering."""
    rng = np.random.default_rng(1)
    heads, head_dim, hidden = 2, 8, 6
    w, x = rng.standard_normal((heads * head_dim, hidden)), rng.standard_normal(hidden)
    angles = 0.7 * np.arange(1, head_dim // 2 + 1)
    hf = _rope_hf((w @ x).reshape(heads, head_dim), angles).reshape(-1)
    cpp = _rope_interleaved((permute_rope_rows(w, heads) @ x).reshape(heads, head_dim), angles).reshape(-1)
    np.testing.assert_allclose(unpermute_rope_rows(cpp[:, None], heads)[:, 0], hf, atol=1e-12)


def test_tensor_names():
    assert hf_tensor_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="blk.0.attn_qkv.weight"):
        hf_tensor_name("blk.0.attn_qkv.weight")


# --- a tiny Llama written to GGUF as llama.cpp's converter would ----------------------------------------

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXTS = ["the red star is above 12 blue circles", "How many? 2024 apples!", "héllo wörld"] * 30


# llama.cpp's names, written out independently of the converter's table.
GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf_name: str) -> str:
    if hf_name in ("model.embed_tokens.weight", "model.norm.weight"):
        return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[hf_name]
    _, _, layer, *module, kind = hf_name.split(".")
    return f"blk.{layer}.{GGUF_NAMES['.'.join(module)]}.{kind}"


def _write_tiny_gguf(path, model, tokenizer, quantize: bool):
    """A GGUF like llama.cpp's convert_hf_to_gguf.py writes: q/k rows permuted, names renamed,
    byte-level vocabulary + merges + token types, a chat template."""
    cfg = model.config
    tok_json = json.loads(tokenizer.backend.to_str())
    vocab = sorted(tok_json["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    special = {t["content"] for t in tok_json["added_tokens"]}

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in special else 1 for t, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.im_start_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in model.state_dict().items():
        value = tensor.float().numpy()
        if name == "lm_head.weight":
            continue  # tied
        gguf_name = _gguf_name(name)
        if name.endswith("q_proj.weight"):
            value = permute_rope_rows(value, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            value = permute_rope_rows(value, cfg.num_key_value_heads)
        if quantize and value.ndim == 2 and "embed" not in name:
            writer.add_tensor(gguf_name, gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q4_1),
                              raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            writer.add_tensor(gguf_name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_llama_gguf(tmp_path_factory):
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                   rope_theta=10000.0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    paths = {}
    for quantize in (False, True):
        path = tmp_path_factory.mktemp("gguf") / f"tiny-{'q4_1' if quantize else 'f32'}.gguf"
        _write_tiny_gguf(path, model, tokenizer, quantize)
        paths[quantize] = path
    return model, tokenizer, paths


def test_gguf_f32_round_trip_gives_the_original_model(tiny_llama_gguf, tmp_path):
    model, _, paths = tiny_llama_gguf
    config = convert_gguf_llama(paths[False], tmp_path, log=lambda _: None)
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == 2
    converted = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_gguf_q4_1_matches_transformers_own_gguf_loader(tiny_llama_gguf, tmp_path):
    """transformers' GGUF reader is an independent implementation of dequantization and un-permuting."""
    _, _, paths = tiny_llama_gguf
    convert_gguf_llama(paths[True], tmp_path, log=lambda _: None)
    ours = transformers.LlamaForCausalLM.from_pretrained(tmp_path).state_dict()
    reference = transformers.LlamaForCausalLM.from_pretrained(paths[True].parent, gguf_file=paths[True].name,
                                                              dtype=torch.float32).state_dict()
    assert set(ours) == set(reference)
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=0, msg=name)


def test_gguf_tokenizer_encodes_like_the_original(tiny_llama_gguf, tmp_path):
    _, tokenizer, paths = tiny_llama_gguf
    convert_gguf_llama(paths[False], tmp_path, log=lambda _: None)
    from tokenizers import Tokenizer

    rebuilt = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ["the 2024 red stars", "How many?  123 héllo\n\nwörld", "<|im_start|>user\nhi<|im_end|>"]:
        assert rebuilt.encode(text).ids == tokenizer.backend.encode(text).ids, text
    assert rebuilt.decode(tokenizer.encode("<|im_end|> a 7"), skip_special_tokens=True) == " a 7"
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["add_bos_token"] is False
    assert config["chat_template"].startswith("{% for m in messages %}")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    rendered = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n"


def test_unknown_pre_tokenizer_and_bad_merges_are_errors():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(ValueError, match="mystery"):
        build_tokenizer(meta)
    with pytest.raises(ValueError, match="'a c' does not fit"):
        build_tokenizer({**meta, "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.merges": ["a b", "a c"]})
    assert build_tokenizer({**meta, "tokenizer.ggml.pre": "gpt-2"}).encode("ab").ids == [2]


# --- a tiny DINOv2 exported to ONNX inside a model with a task head ------------------------------------------


class _Saliency(torch.nn.Module):
    """The layout of the packaged model: a DINOv2 `backbone` plus a head that must be left out."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = transformers.Dinov2Model(cfg)
        self.head = torch.nn.Linear(cfg.hidden_size, 1)

    def forward(self, pixels):
        return self.head(self.backbone(pixels).last_hidden_state)


@pytest.fixture(scope="module")
def tiny_dinov2_onnx(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                                    patch_size=14, layerscale_value=0.5)
    model = _Saliency(cfg).eval()
    with torch.no_grad():  # like trained weights, no two tensors alike (the exporter shares equal ones)
        for name, param in model.named_parameters():
            if "mask_token" not in name:  # the packaged model has none; the converter writes zeros
                param.normal_(std=0.5)
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.randn(1, 3, 28, 28),), buffer, input_names=["input_image"],
                      output_names=["saliency"], dynamo=False, opset_version=14)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    path.write_bytes(buffer.getvalue())
    return model.backbone, path


def test_onnx_dinov2_weights_map_back_to_hf_names(tiny_dinov2_onnx, tmp_path):
    backbone, path = tiny_dinov2_onnx
    graph = onnx.load(str(path))
    assert any(i.name.startswith("onnx::MatMul_") for i in graph.graph.initializer)  # the layout under test
    weights = backbone_weights(graph)
    reference = {canonical_name(k): v for k, v in backbone.state_dict().items()}
    assert "encoder.layer.1.attention.attention.query.weight" in weights  # the names published checkpoints use
    assert set(weights) == set(reference)
    for name, value in weights.items():  # mask_token included: zeros in both
        np.testing.assert_array_equal(value, reference[name].numpy(), err_msg=name)


def test_onnx_dinov2_directory_loads_and_runs_like_the_original(tiny_dinov2_onnx, tmp_path):
    backbone, path = tiny_dinov2_onnx
    config = convert_onnx_dinov2(path, tmp_path, num_heads=2, log=lambda _: None)
    assert (config["image_size"], config["patch_size"], config["mlp_ratio"]) == (56, 14, 4)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["image_mean"] == [0.485, 0.456, 0.406]
    converted = transformers.Dinov2Model.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 42, 42)  # not the training size: exercises position interpolation too
    with torch.no_grad():
        torch.testing.assert_close(converted(pixels).last_hidden_state, backbone(pixels).last_hidden_state)


def test_onnx_without_backbone_is_a_clear_error(tiny_dinov2_onnx, tmp_path):
    _, path = tiny_dinov2_onnx
    with pytest.raises(ONNXImportError):
        convert_onnx_dinov2(path, tmp_path, num_heads=2, prefix="encoder", log=lambda _: None)


# --- the command -----------------------------------------------------------------------------------------------


def test_missing_package_without_install_names_the_pip_command():
    with pytest.raises(MissingPackageError, match="pip install --no-deps no-such-carrier"):
        ensure_installed([Requirement("no_such_carrier_module", "no-such-carrier", no_deps=True)], install=False)


def test_import_refuses_a_foreign_directory_and_skips_an_existing_import(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["import", "dinov2-small", "--out", str(foreign), "--no-install"]) == 1
    assert "is not a converted model" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"

    done = tmp_path / "done"
    done.mkdir()
    (done / "config.json").write_text("{}")
    assert main(["import", "smollm2", "--out", str(done), "--no-install"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(done) and "already exists" in captured.err
    assert import_model("smollm2", done, install=False) == (done, False)


def test_unknown_model_name_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["import", "gpt-5"])
    assert "invalid choice" in capsys.readouterr().err
