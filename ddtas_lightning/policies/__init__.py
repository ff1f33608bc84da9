from ddtas_lightning.policies.base import StepBatch, StepOutput, ThresholdPolicy, embed_and_mine
from ddtas_lightning.policies.static import StaticThreshold

__all__ = ["StaticThreshold", "StepBatch", "StepOutput", "ThresholdPolicy", "embed_and_mine"]
