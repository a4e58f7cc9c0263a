"""Interop with the Hugging Face ecosystem, in one place.

- `hub`: the mapping between HF checkpoint formats (config.json fields, weight names) and vlmkit modules;
- `pretrained`: loading HF-format directories (vision towers, LMs, tokenizers) and building a VLM
  from pretrained parts named in a config;
- `llava`: exporting a trained VLM as a directory transformers' `LlavaForConditionalGeneration` loads;
- `importers`: converting weights that ship in pip packages (GGUF, ONNX) into HF-format directories.

The library never imports transformers; the parity tests compare against it.
"""
