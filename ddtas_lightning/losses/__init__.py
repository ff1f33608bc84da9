from ddtas_lightning.losses.base import MetricLoss, zero_loss

__all__ = ["MetricLoss", "zero_loss"]
