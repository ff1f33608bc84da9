# Importing bn_inception registers the timm model "bninception" (Embedder(model_name="bninception")).
from ddtas_lightning.models.bn_inception import BNInception
from ddtas_lightning.models.embedder import Embedder

__all__ = ["BNInception", "Embedder"]
