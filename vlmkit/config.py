"""Model configuration: plain dataclasses, built from dicts (YAML/JSON) with strict key checking."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vlmkit.anyres import check_grid_pinpoints

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value a user wrote is wrong; the message names the field."""


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclasses.

    Unknown keys are an error (a typo must not silently fall back to a default); numbers written as
    strings ("3e-4", which YAML 1.1 reads as text) become numbers; `where` is the dotted path used
    in messages, e.g. ``model.vision``.
    """
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        section = _section_class(hint)
        if section is not None and (value is not None or section is hint):  # `X | None` sections may be null
            kwargs[name] = from_dict(section, value or {}, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def _section_class(hint: Any) -> type | None:
    """The dataclass a field holds: the hint itself, or X of an optional section `X | None`."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        classes = [arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)]
        return classes[0] if len(classes) == 1 else None
    return None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Numbers for number fields (also inside dict[str, float]); a clear error for anything else."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is dict and isinstance(value, dict) and len(args) == 2:
        return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if value is None and type(None) in args:
        return None
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    number = next((t for t in (float, int) if hint is t or (is_union and t in args)), None)
    if number is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if number is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if number is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, number):
        raise ConfigError(f"{where}: expected {number.__name__}, got {value!r}")
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _check_choice(owner: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{owner}.{name}: {value!r} is not one of {list(choices)}")


@dataclass
class TokenMergingConfig:
    """ToMe in the vision tower (see models/token_merging.py): `r` tokens merged away per block."""

    r: int = 0  # 0: no merging, the plain ViT
    proportional_attention: bool = True  # add log(size) to the attention logits of merged tokens

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ConfigError(f"vision.token_merging.r: expected an integer >= 0 (tokens merged per block), "
                              f"got {self.r!r}")


@dataclass
class VisionConfig:
    """A ViT. Defaults are a tiny from-scratch tower; loaders fill in CLIP/SigLIP/DINOv2 values."""

    image_size: int = 64  # what images are resized to
    # The size the position embeddings were trained at (default: image_size); other sizes interpolate them.
    native_image_size: int | None = None
    patch_size: int = 8
    # How pixels become patch tokens: "patchify" (one patch_size x patch_size conv, as CLIP/SigLIP/DINOv2)
    # or "conv" (3x3 stride-2 convs + BatchNorm + GELU, then a 1x1 projection: Xiao et al. 2021,
    # "Early convolutions help transformers see better"; learns far faster from small data).
    stem: str = "patchify"
    num_channels: int = 3
    hidden_size: int = 192
    num_layers: int = 6
    num_heads: int = 3
    intermediate_size: int = 768
    activation: str = "gelu"  # quick_gelu (CLIP) | gelu (DINOv2) | gelu_tanh (SigLIP)
    layer_norm_eps: float = 1e-5
    use_cls_token: bool = True
    patch_bias: bool = True  # CLIP's patch conv has no bias
    pre_layernorm: bool = False  # CLIP normalises the embeddings before the blocks
    post_layernorm: bool = True  # final norm, used for pooled / last-layer output
    # Normalise the selected features with the final norm. Raw residual streams of a from-scratch
    # tower grow large (std ~17 after the demo's clip stage), swamping the LM's ~1-norm token
    # embeddings; HF CLIP-style towers (whose LLaVA features are raw) turn this off.
    feature_norm: bool = True
    layerscale: bool = False  # DINOv2 scales each residual branch per channel
    layerscale_init: float = 1.0
    select_layer: int = -1  # index into [embeddings, block 1, ..., block N]; -2 = penultimate
    keep_cls: bool = False  # whether the CLS token is passed on to the connector
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pretrained: str | None = None  # the HF checkpoint directory a VLM's tower is built from (see hf/pretrained.py)
    # Token merging (ToMe): fewer, size-weighted tokens after each block; r = 0 leaves the tower as it is.
    token_merging: TokenMergingConfig = field(default_factory=TokenMergingConfig)

    def __post_init__(self) -> None:
        if isinstance(self.token_merging, dict):
            self.token_merging = from_dict(TokenMergingConfig, self.token_merging, "vision.token_merging")
        _check_choice("vision", "activation", self.activation, ("quick_gelu", "gelu", "gelu_tanh"))
        _check_choice("vision", "stem", self.stem, ("patchify", "conv"))
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ConfigError(f"vision.stem conv needs a power-of-two patch_size (stride-2 convs), "
                              f"got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision.hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        for name in ("image_size", "native_image_size"):
            size = getattr(self, name)
            if size is not None and size % self.patch_size:
                raise ConfigError(f"vision.{name} {size} not divisible by patch_size {self.patch_size}")
        if not -(self.num_layers + 1) <= self.select_layer <= self.num_layers:
            raise ConfigError(f"vision.select_layer {self.select_layer} out of range for {self.num_layers} layers")
        if self.feature_norm and not self.post_layernorm:
            raise ConfigError("vision.feature_norm needs vision.post_layernorm: true (the norm it applies)")
        if self.keep_cls and not self.use_cls_token:
            raise ConfigError("vision.keep_cls is true but the tower has no CLS token (use_cls_token: false)")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def native_grid_size(self) -> int:
        """Side of the patch grid the position embeddings are stored for."""
        return (self.native_image_size or self.image_size) // self.patch_size

    @property
    def num_selected_blocks(self) -> int:
        """How many blocks must run to produce the selected layer (later ones are skipped)."""
        return self.select_layer % (self.num_layers + 1)

    @property
    def merges_tokens(self) -> bool:
        return self.token_merging.r > 0


@dataclass
class LanguageConfig:
    """A Llama/Qwen2/SmolLM2-family decoder."""

    vocab_size: int = 2048
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    intermediate_size: int = 688
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    pretrained: str | None = None  # the HF checkpoint directory a VLM's LM is built from (see hf/pretrained.py)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"lm.num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"lm.hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim % 2:
            raise ConfigError(f"lm.head_dim {self.head_dim} must be even for rotary embeddings")


@dataclass
class ConnectorConfig:
    """Which connector maps vision patches into the LM's embedding space (see models/connectors/)."""

    name: str = "mlp2x_gelu"
    downsample: int = 2  # pixel_shuffle: merge downsample x downsample patches into one token
    grid_embedding: bool = False  # add learned row/column embeddings to the image tokens
    # Resampling connectors (a fixed number of tokens per image, whatever the grid):
    num_queries: int = 64  # K learned queries / latents, or a sqrt(K) x sqrt(K) pooled grid
    num_layers: int = 2
    num_heads: int = 4
    hidden_size: int | None = None  # width inside the connector (None: the connector's own default)
    # perceiver only (Idefics2's resampler has these knobs; its checkpoints need them to load):
    num_kv_heads: int | None = None  # grouped key/value heads (None: num_heads)
    projection_size: int | None = None  # inner width of the gated projection into the LM (None: 4 x LM width)
    rms_norm_eps: float = 1e-6
    cross_attention_frequency: int = 2  # qformer: queries cross-attend to the image every this many layers (BLIP-2: 2)


SAMPLINGS = ("uniform", "change")


@dataclass
class VideoConfig:
    """How a clip (a record's or question's ``video``) becomes image tokens; see vlmkit/data/video.py.

    Frames are chosen so that kept frames x image tokens per frame <= `budget` (after `temporal_pool`,
    which averages the tokens of that many adjacent kept frames into one frame's worth), `uniform`ly
    over the clip or where the picture `change`s most. Each kept frame (or pooled group) is shown to
    the LM after a text marker, "Frame 3: " (or "Frames 5-6: "), so the order of frames is in the text.
    """

    budget: int | None = None  # image tokens per clip; None: every frame of the clip
    sampling: str = "uniform"  # uniform | change
    temporal_pool: int = 1  # 1: every kept frame is its own image; 2: adjacent pairs are averaged

    def __post_init__(self) -> None:
        _check_choice("model.video", "sampling", self.sampling, SAMPLINGS)
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int)
                                        or self.budget < 1):
            raise ConfigError(f"model.video.budget: expected image tokens per clip (an integer >= 1) or null, "
                              f"got {self.budget!r}")
        pool = self.temporal_pool
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ConfigError(f"model.video.temporal_pool: expected an integer >= 1 (frames averaged), got {pool!r}")


@dataclass
class AnyResConfig:
    """LLaVA-NeXT's AnyRes tiling (see vlmkit/anyres.py): each image is cut into `base`-pixel tiles at the
    candidate resolution that fits it best, plus a thumbnail; its token count follows its size."""

    grid_pinpoints: list[tuple[int, int]] = field(default_factory=list)  # candidate [height, width]s, in px
    base: int | None = None  # tile side in px (None: vision.image_size); a multiple of vision.patch_size


@dataclass
class ImageConfig:
    """How an image becomes the tower's input: one resized square (the default), or AnyRes tiles.

    A section of its own, not part of `vision`: the tower only ever sees squares; tiling decides what it
    is shown and how the tiles' tokens are joined for the LM (with a learned newline token)."""

    anyres: AnyResConfig | None = None


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LanguageConfig = field(default_factory=LanguageConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    image_token_id: int = 0  # id of the image placeholder token in the tokenizer
    # How image tokens reach the LM (see models/fusion.py): "splice" writes them over the placeholders
    # (one placeholder per image token); "cross_attention" (Flamingo) keeps one placeholder per image
    # and lets gated cross-attention blocks, placed before LM blocks, read the image tokens.
    fusion: str = "splice"
    # cross_attention: a block before every N-th LM block (1: every block; 4: before blocks 4, 8, ...).
    cross_attention_every: int = 1
    # cross_attention: which images a text token sees: "latest" (the last image at or before it, as
    # Flamingo) or "all_previous" (every image at or before it). Tokens before any image see none.
    cross_attention_media: str = "latest"
    # Clips (records with "video"): how many frames, which, pooled or not; see VideoConfig.
    video: VideoConfig = field(default_factory=VideoConfig)

    def __post_init__(self) -> None:
        if isinstance(self.video, dict):
            self.video = from_dict(VideoConfig, self.video, "model.video")
        _check_choice("model", "cross_attention_media", self.cross_attention_media, ("latest", "all_previous"))
        every = self.cross_attention_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"model.cross_attention_every: expected an integer >= 1, got {every!r}")
        if self.fusion == "cross_attention" and self.cross_attention_every > self.lm.num_layers:
            raise ConfigError(f"model.cross_attention_every {self.cross_attention_every} is more than the LM's "
                              f"{self.lm.num_layers} layers: no cross-attention block would be placed")
        anyres = self.image.anyres
        if anyres is not None:
            if anyres.base is None:
                anyres.base = self.vision.image_size
            base = anyres.base
            if isinstance(base, bool) or not isinstance(base, int) or base < 1 or base % self.vision.patch_size:
                raise ConfigError(f"model.image.anyres.base {anyres.base!r} must be a multiple of vision.patch_size "
                                  f"{self.vision.patch_size}")
            try:
                anyres.grid_pinpoints = check_grid_pinpoints(anyres.grid_pinpoints, anyres.base, "model.image.anyres")
            except ValueError as err:
                raise ConfigError(str(err)) from None
            if self.vision.keep_cls:
                raise ConfigError("model.image.anyres joins the tiles' patch grids: the CLS token has no place in "
                                  "them; set vision.keep_cls: false")
            # Clip frames are resized squares (data/video.py), never tiles: AnyRes would tile each frame.
            if self.video != VideoConfig():
                raise ConfigError("model.video sets how clips are sampled, but a model with model.image.anyres takes "
                                  "no clips (their frames are resized squares, not AnyRes tiles); remove model.video "
                                  "or model.image.anyres")
        self.check_token_merging(self.vision.token_merging.r)

    def check_token_merging(self, r: int) -> None:
        """Refuse token merging (`r` tokens per block) where image tokens must keep their patch places;
        also called when a built model switches merging on (`VisionLanguageModel.set_token_merging`)."""
        if r and self.video.temporal_pool > 1:
            raise ConfigError(f"vision.token_merging.r {r}: model.video.temporal_pool {self.video.temporal_pool} "
                              "averages the t-th image tokens of adjacent frames, which merging makes stand for "
                              "different places; set vision.token_merging.r: 0 or model.video.temporal_pool: 1")
        if r and self.image.anyres is not None:
            raise ConfigError(f"vision.token_merging.r {r}: model.image.anyres lays each tile's tokens out on its "
                              "patch grid (unpadding, a newline token per row), which token merging removes; set "
                              "vision.token_merging.r: 0 or remove model.image.anyres")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model") -> ModelConfig:
        return from_dict(cls, data, where)

