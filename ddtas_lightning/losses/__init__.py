from ddtas_lightning.losses.base import MetricLoss, zero_loss
from ddtas_lightning.losses.binomial import BinomialDevianceLoss
from ddtas_lightning.losses.contrastive import ContrastiveLoss
from ddtas_lightning.losses.ms import MultiSimilarityLoss
from ddtas_lightning.losses.soft_contrastive import SoftContrastiveLoss
from ddtas_lightning.losses.triplet import TripletMarginLoss

__all__ = [
    "BinomialDevianceLoss",
    "ContrastiveLoss",
    "MetricLoss",
    "MultiSimilarityLoss",
    "SoftContrastiveLoss",
    "TripletMarginLoss",
    "zero_loss",
]
