"""Connectors, keyed by the names configs use (`model.connector.name`).

Adding one is a `Connector` subclass in a module of this package and an entry in `CONNECTORS`.
"""

from __future__ import annotations

from vlmkit.config import ConfigError, ConnectorConfig
from vlmkit.models.connectors.base import Connector, GridEmbedding
from vlmkit.models.connectors.c_abstractor import CAbstractor
from vlmkit.models.connectors.perceiver import Perceiver
from vlmkit.models.connectors.projectors import Linear, MLP2xGELU, PixelShuffle
from vlmkit.models.connectors.qformer import QFormerConnector

__all__ = ["CONNECTORS", "Connector", "GridEmbedding", "build_connector"]

CONNECTORS: dict[str, type[Connector]] = {
    "linear": Linear,
    "mlp2x_gelu": MLP2xGELU,
    "pixel_shuffle": PixelShuffle,
    "perceiver": Perceiver,
    "c_abstractor": CAbstractor,
    "qformer": QFormerConnector,
}


def build_connector(cfg: ConnectorConfig, vision_dim: int, lm_dim: int, num_prefix_tokens: int = 0) -> Connector:
    if cfg.name not in CONNECTORS:
        raise ConfigError(f"connector.name: unknown connector {cfg.name!r}; choose one of {sorted(CONNECTORS)}")
    return CONNECTORS[cfg.name](cfg, vision_dim, lm_dim, num_prefix_tokens)
