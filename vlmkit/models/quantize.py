"""Weight-only int8 quantization of a model's linear layers, for faster and smaller inference.

Each `nn.Linear` of the chosen parts becomes an `Int8Linear`: its weight is stored as int8 with one
scale per output channel (symmetric, scale = max |w| of the row / 127); activations stay floating point.
Decoding reads every weight once per token, so a quarter of fp32's bytes (half of bf16's) is where the
speed comes from.

On CPU, up to 16 rows at a time (decode steps of small batches), the matmul is torch's
`_weight_int8pack_mm` kernel (int8 weights, bf16 activations): 2-3x faster than a bf16 matmul at 1-8
rows, even at 16, twice as slow at 64 (SmolLM2's shapes, measured here). It needs the input width to be
a multiple of 16 (other widths give wrong numbers, not errors). Larger row counts (prefill, large
batches), other widths and other devices dequantize on the fly: the weight is cast to the compute
dtype at each call and the per-channel scales multiply the output. That second path is what torchao
0.18's `Int8WeightOnlyConfig` does on CPU, behind a tensor-subclass dispatch; bench/decode.py measures it
beside `torch.ao.quantization.quantize_dynamic`, which also quantizes activations (one scale per
tensor): faster still here, but it wrecks SmolLM2 (top-1 agreement with fp32 0.47; weight-only: 0.93),
and it is deprecated. On CPU the layer computes in bf16 either way (its weights hold less precision).

A quantized model is for inference: `quantize_model` marks it (`model.quantization`) and saving it
is refused (quantizing takes seconds; keep the float checkpoint and quantize after loading).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATIONS = ("int8",)
_KERNEL_MULTIPLE = 16  # _weight_int8pack_mm's input width must be a multiple of this
_KERNEL_MAX_ROWS = 16  # beyond, dequantizing and one bf16 matmul is faster


class Int8Linear(nn.Module):
    """`y = x W^T + b` with W stored as int8 [out, in] and fp32 `scales` [out] (W ~ int8 * scales[:, None])."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2:
            raise ValueError(f"expected an int8 [out, in] weight, got {weight_int8.dtype} {tuple(weight_int8.shape)}")
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._scale_cache: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # symmetric, per output channel
        q = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scales, linear.bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this layer computes with."""
        return self.weight_int8.to(dtype) * self.scales.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The caller gets what a float Linear would give it: the autocast dtype under autocast, else x's.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        compute = torch.bfloat16 if x.device.type == "cpu" else dtype
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(compute)
        if x.device.type == "cpu" and self.in_features % _KERNEL_MULTIPLE == 0 and 0 < len(x2) <= _KERNEL_MAX_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self._scales(compute))
        else:
            out = F.linear(x2, self.weight_int8.to(compute)) * self._scales(compute)
        if self.bias is not None:
            out = out + self.bias.to(compute)
        return out.to(dtype).reshape(*shape[:-1], self.out_features)

    def _scales(self, dtype: torch.dtype) -> torch.Tensor:
        cached = self._scale_cache.get(dtype)
        if cached is None or cached.device != self.scales.device:
            cached = self._scale_cache[dtype] = self.scales.to(dtype)
        return cached

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _replace_linears(module: nn.Module) -> int:
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child))
            count += 1
        else:
            count += _replace_linears(child)
    return count


def quantize_model(model: nn.Module, method: str = "int8", vision: bool = False) -> nn.Module:
    """Quantize `model` in place (and return it): every linear layer of its language model, and of its
    vision tower and connector too with `vision=True`. `model` is a VisionLanguageModel (its `lm`) or
    a LanguageModel. A tied output head gets its own int8 copy; the float embedding stays."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}: expected one of {list(QUANTIZATIONS)}")
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is already quantized ({model.quantization})")
    lm = getattr(model, "lm", model)
    parts = [lm] + ([model.vision, model.connector] if vision and hasattr(model, "vision") else [])
    if vision and not hasattr(model, "vision"):
        raise ValueError("vision=True needs a VisionLanguageModel; this model has no vision tower")
    if sum(_replace_linears(part) for part in parts) == 0:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize")
    model.quantization = method
    return model.eval()


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (int8 weights count one byte each)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())
