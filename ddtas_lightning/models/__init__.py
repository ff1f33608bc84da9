from ddtas_lightning.models.embedder import Embedder

__all__ = ["Embedder"]
