"""A DINOv2 backbone inside an ONNX graph (a PyTorch export of a HF `Dinov2Model`) -> HF directory.

Writes `config.json` (a `Dinov2Config`), `model.safetensors` (fp32) and `preprocessor_config.json`
(ImageNet mean/std). Named initializers keep their PyTorch names (`backbone.encoder.layer.0.norm1
.weight`). The exporter turned each Linear weight into an unnamed `onnx::MatMul_N` initializer stored
[in, out], and the position embedding into two unnamed pieces (the CLS row, concatenated, and the
patch grid, reshaped for interpolation). Each is identified by the node that consumes it, whose
name is the module path: `/backbone/encoder/layer.0/mlp/fc1/MatMul` -> `encoder.layer.0.mlp.fc1`.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Recent transformers name the attention projections q/k/v/o_proj; published DINOv2 checkpoints
# (and every transformers version's loader) use the older names, which are written here.
CANONICAL_NAMES = [
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
]


class ONNXImportError(ValueError):
    """The ONNX graph does not hold a DINOv2 backbone laid out as expected; the message says where."""


def _consumers(graph: Any) -> dict[str, list[Any]]:
    """Initializer/value name -> the nodes that read it."""
    readers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    return readers


def _module_path(node_name: str, prefix: str) -> str | None:
    """`/backbone/encoder/layer.0/mlp/fc1/MatMul` -> `encoder.layer.0.mlp.fc1` (None outside `prefix`)."""
    parts = node_name.strip("/").split("/")
    if len(parts) < 2 or parts[0] != prefix:
        return None
    return ".".join(parts[1:-1])


def canonical_name(name: str) -> str:
    for pattern, replacement in CANONICAL_NAMES:
        name = re.sub(pattern, replacement, name)
    return name


def backbone_weights(model: Any, prefix: str = "backbone") -> dict[str, np.ndarray]:
    """The backbone's weights under HF `Dinov2Model` names, Linear weights as [out, in]."""
    from onnx import numpy_helper

    graph = model.graph
    readers = _consumers(graph)
    weights: dict[str, np.ndarray] = {}
    position_parts: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if init.name.startswith(prefix + "."):
            weights[init.name[len(prefix) + 1 :]] = array
            continue
        if not np.issubdtype(array.dtype, np.floating):
            continue  # shape constants
        nodes = readers.get(init.name, [])
        paths = {_module_path(n.name, prefix) for n in nodes}
        if paths == {None} or not nodes:
            continue  # another part of the graph (e.g. a task head)
        if len(nodes) != 1:
            raise ONNXImportError(f"initializer {init.name} is read by {len(nodes)} nodes; expected one")
        node, module = nodes[0], paths.pop()
        if node.op_type == "MatMul":
            weights[f"{module}.weight"] = array.T
        elif module == "embeddings" and node.op_type == "Concat":
            position_parts["cls"] = array
        elif module == "embeddings" and node.op_type == "Reshape":
            position_parts["patches"] = array
        else:
            raise ONNXImportError(f"initializer {init.name} (read by {node.op_type} {node.name}) has no known role")
    if set(position_parts) != {"cls", "patches"}:
        raise ONNXImportError(f"position embedding pieces found: {sorted(position_parts)}; expected cls and patches")
    dim = position_parts["cls"].shape[-1]
    weights["embeddings.position_embeddings"] = np.concatenate(
        [position_parts["cls"].reshape(1, 1, dim), position_parts["patches"].reshape(1, -1, dim)], axis=1
    )
    # Only used for masked-image pretraining; DINOv2 initialises it to zeros. HF's module has the slot.
    weights.setdefault("embeddings.mask_token", np.zeros((1, dim), dtype=np.float32))
    return {canonical_name(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}


def layer_norm_eps(model: Any, prefix: str = "backbone") -> float:
    """The final LayerNorm's epsilon: an attribute of a fused LayerNormalization node, or the
    constant added to the variance in the decomposed form older opsets export."""
    from onnx import numpy_helper

    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    for node in model.graph.node:
        if not node.name.startswith(f"/{prefix}/layernorm/"):
            continue
        if node.op_type == "LayerNormalization":
            return next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        if node.op_type == "Add" and node.input[0].endswith("ReduceMean_1_output_0") and node.input[1] in constants:
            value = numpy_helper.to_array(constants[node.input[1]].attribute[0].t)
            return float(f"{float(value):.7g}")
    raise ONNXImportError(f"no /{prefix}/layernorm/ epsilon found in the graph")


def check_gelu(model: Any, prefix: str = "backbone") -> None:
    """HF DINOv2-S/B/L use exact (erf) GELU; refuse a graph that computes something else."""
    if not any(n.op_type in ("Erf", "Gelu") and n.name.startswith(f"/{prefix}/encoder/layer.0/mlp/")
               for n in model.graph.node):
        raise ONNXImportError("the MLP activation is not an erf GELU (no Erf/Gelu node in layer 0's MLP)")


def dinov2_config(weights: dict[str, np.ndarray], num_heads: int, eps: float) -> dict[str, Any]:
    """A `Dinov2Config`-compatible dict; sizes come from the weights, the head count from the caller."""
    hidden = weights["embeddings.cls_token"].shape[-1]
    layers = 1 + max(int(m.group(1)) for k in weights if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    patch = weights["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = math.isqrt(weights["embeddings.position_embeddings"].shape[1] - 1)
    mlp = weights["encoder.layer.0.mlp.fc1.weight"].shape[0]
    if hidden % num_heads or mlp % hidden:
        raise ONNXImportError(f"hidden size {hidden} / MLP size {mlp} do not fit {num_heads} heads "
                              "and an integer mlp_ratio")
    return {
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": num_heads,
        "mlp_ratio": mlp // hidden,
        "hidden_act": "gelu",
        "layer_norm_eps": eps,
        "image_size": grid * patch,
        "patch_size": patch,
        "num_channels": weights["embeddings.patch_embeddings.projection.weight"].shape[1],
        "qkv_bias": "encoder.layer.0.attention.attention.query.bias" in weights,
        "layerscale_value": 1.0,  # only an init value; the learned scales are in the weights
        "use_swiglu_ffn": False,
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }


def expected_weights(config: dict[str, Any]) -> set[str]:
    """Every weight name a HF `Dinov2Model` with this config has."""
    names = {"embeddings.cls_token", "embeddings.mask_token", "embeddings.position_embeddings",
             "embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias",
             "layernorm.weight", "layernorm.bias"}
    linears = ["attention.attention.query", "attention.attention.key", "attention.attention.value",
               "attention.output.dense", "mlp.fc1", "mlp.fc2", "norm1", "norm2"]
    for i in range(config["num_hidden_layers"]):
        names |= {f"encoder.layer.{i}.{m}.{p}" for m in linears for p in ("weight", "bias")}
        names |= {f"encoder.layer.{i}.layer_scale{j}.lambda1" for j in (1, 2)}
    return names


def preprocessor_config(crop_size: int = 224) -> dict[str, Any]:
    """DINOv2's evaluation preprocessing: resize the short side to 256/224 of the crop, center-crop,
    ImageNet mean/std."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": crop_size * 256 // 224},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": crop_size, "width": crop_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }


def convert_onnx_dinov2(onnx_path: str | Path, out_dir: str | Path, num_heads: int, prefix: str = "backbone",
                        log=print) -> dict[str, Any]:
    """Write the HF directory for the DINOv2 backbone in `onnx_path` into `out_dir` (which must exist)."""
    import onnx
    from safetensors.numpy import save_file

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    log(f"reading {onnx_path}")
    model = onnx.load(str(onnx_path))
    check_gelu(model, prefix)
    weights = backbone_weights(model, prefix)
    config = dinov2_config(weights, num_heads, layer_norm_eps(model, prefix))
    missing, unexpected = expected_weights(config) - set(weights), set(weights) - expected_weights(config)
    if missing or unexpected:
        raise ONNXImportError(f"{onnx_path.name}: missing weights {sorted(missing)[:5]}, "
                              f"unexpected weights {sorted(unexpected)[:5]}")
    log(f"writing {len(weights)} tensors ({sum(v.size for v in weights.values()) / 1e6:.2f}M parameters, fp32)")
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2))
    return config
