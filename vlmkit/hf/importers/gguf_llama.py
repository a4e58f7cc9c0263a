"""A llama.cpp GGUF file of a Llama-architecture model -> a Hugging Face-format directory.

Writes `config.json` (a `LlamaConfig`), `model.safetensors` (fp32), `tokenizer.json` (byte-level
BPE rebuilt from the GGUF vocabulary and merges), `tokenizer_config.json` (special tokens and the
chat template) and `generation_config.json`. Reads with the `gguf` package; quantized tensors are
dequantized to fp32, which restores the stored values exactly (the quantization loss itself stays).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

GGUF_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp token types (llama_token_type): control tokens are the special ones.
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


class GGUFImportError(ValueError):
    """The GGUF file is not something this converter understands; the message says what and where."""


# --- weights -------------------------------------------------------------------------------------


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name):
        layer, part, kind = m.groups()
        if part in GGUF_LAYER_TENSORS:
            return f"model.layers.{layer}.{GGUF_LAYER_TENSORS[part]}.{kind}"
    elif (m := re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)) and m.group(1) in GGUF_GLOBAL_TENSORS:
        return f"{GGUF_GLOBAL_TENSORS[m.group(1)]}.{m.group(2)}"
    raise GGUFImportError(f"unknown GGUF tensor {gguf_name!r} (not part of a plain Llama model)")


def permute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to a HF q/k projection.

    HF rotates pairs (i, i + head_dim/2) of each head ("rotate_half"); llama.cpp rotates adjacent
    pairs (2i, 2i+1). The converter reorders each head's rows so adjacent rows form the pairs.
    """
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The inverse of `permute_rope_rows`: llama.cpp's row order back to HF's."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_state_dict(reader: Any, num_heads: int, num_kv_heads: int) -> dict[str, np.ndarray]:
    """All tensors of a `gguf.GGUFReader`, dequantized to fp32, under HF Llama names and row order."""
    from gguf.quants import dequantize

    state = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        # GGUF lists dimensions innermost first; numpy (and torch) want them outermost first.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        value = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        if name.endswith("q_proj.weight"):
            value = unpermute_rope_rows(value, num_heads)
        elif name.endswith("k_proj.weight"):
            value = unpermute_rope_rows(value, num_kv_heads)
        state[name] = np.ascontiguousarray(value)
    return state


# --- metadata -------------------------------------------------------------------------------------


def read_metadata(reader: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """GGUF key-value metadata as plain Python values (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items() if key not in skip}


def _float(value: float) -> float:
    # GGUF stores float32: 1e-5 comes back as 9.999999747378752e-06. Keep the digits float32 holds.
    return float(f"{value:.7g}")


def llama_config(meta: dict[str, Any], tied_embeddings: bool) -> dict[str, Any]:
    """A `LlamaConfig`-compatible dict from GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFImportError(f"general.architecture is {arch!r}; only 'llama' GGUF files are supported")

    def get(key: str, default: Any = None) -> Any:
        if f"llama.{key}" not in meta and default is None:
            raise GGUFImportError(f"GGUF metadata has no 'llama.{key}'")
        return meta.get(f"llama.{key}", default)

    heads, hidden = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length", hidden // heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise GGUFImportError("llama.rope.dimension_count differs from the head size: partial RoPE is not supported")
    if get("rope.scaling.type", "none") not in ("none", ""):
        raise GGUFImportError(f"RoPE scaling {get('rope.scaling.type')!r} is not supported (only plain RoPE)")
    vocab_size = get("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": _float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float(get("rope.freq_base", 10000.0)),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied_embeddings,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


# --- tokenizer --------------------------------------------------------------------------------------


def _pre_tokenizer(name: str):
    """llama.cpp's pre-tokenizer (`tokenizer.ggml.pre`) as a `tokenizers` pre-tokenizer."""
    from tokenizers import pre_tokenizers

    gpt2_split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in ("gpt-2", "default"):
        return gpt2_split
    if name in ("smollm", "starcoder", "refact", "codeshell"):
        # llama.cpp splits these with "\p{N}" (every digit alone) before GPT-2's regex.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2_split])
    raise GGUFImportError(f"tokenizer.ggml.pre {name!r} is not supported (known: gpt-2, smollm, starcoder)")


def build_tokenizer(meta: dict[str, Any]):
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF vocabulary, merges and token types."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(f"tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
    pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    # Checked here: the BPE model itself aborts on a merge outside the vocabulary.
    bad = next((m for m in merges if len(m) != 2 or "".join(m) not in vocab or m[0] not in vocab or m[1] not in vocab),
               None)
    if bad is not None:
        raise GGUFImportError(f"tokenizer.ggml.merges: merge {' '.join(bad)!r} does not fit the vocabulary")

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (<|im_start|>, ...) are special: never split, skipped when decoding.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, ttype in zip(tokens, types) if ttype == TOKEN_CONTROL])
    tokenizer.add_tokens([AddedToken(t, normalized=False)
                          for t, ttype in zip(tokens, types) if ttype == TOKEN_USER_DEFINED])
    return tokenizer


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """`tokenizer_config.json`: special tokens by name, the chat template, BOS/EOS behaviour."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [])

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get("llama.context_length", 2048),
        "additional_special_tokens": [t for t, k in zip(tokens, types) if k == TOKEN_CONTROL],
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


# --- the whole conversion -------------------------------------------------------------------------------


def convert_gguf_llama(gguf_path: str | Path, out_dir: str | Path, log=print) -> dict[str, Any]:
    """Write the HF directory for `gguf_path` into `out_dir` (which must exist); returns the config."""
    import gguf
    from safetensors.numpy import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    log(f"reading {gguf_path}")
    reader = gguf.GGUFReader(str(gguf_path))
    meta = read_metadata(reader)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    config = llama_config(meta, tied)
    state = hf_state_dict(reader, config["num_attention_heads"], config["num_key_value_heads"])
    embed_rows = state["model.embed_tokens.weight"].shape[0]
    if embed_rows != config["vocab_size"]:
        raise GGUFImportError(f"{gguf_path.name}: token_embd has {embed_rows} rows but the vocabulary "
                              f"has {config['vocab_size']} tokens")

    log(f"writing {len(state)} tensors ({sum(v.size for v in state.values()) / 1e6:.1f}M parameters, fp32)")
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta), indent=2))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return config
