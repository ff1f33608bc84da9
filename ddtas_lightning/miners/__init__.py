from ddtas_lightning.miners.base import BaseMiner
from ddtas_lightning.miners.selection import PairSelection, basic_stats, label_masks

__all__ = ["BaseMiner", "PairSelection", "basic_stats", "label_masks"]
