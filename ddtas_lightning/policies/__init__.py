from ddtas_lightning.policies.base import (
    StepBatch,
    StepOutput,
    ThresholdPolicy,
    embed_and_mine,
    global_embeddings,
    global_similarities_with_tangent,
    similarities,
)
from ddtas_lightning.policies.hypergrad import HypergradThreshold
from ddtas_lightning.policies.many_heads import ManyHeadsThreshold
from ddtas_lightning.policies.meta import MetaThreshold
from ddtas_lightning.policies.mmsi import MMSI
from ddtas_lightning.policies.pair_weights import MetaPairWeights
from ddtas_lightning.policies.static import StaticThreshold
from ddtas_lightning.policies.target_rate import TargetRateThreshold
from ddtas_lightning.policies.virtual_step import (
    FunctionalModel,
    MetaGradient,
    cotangent_meta_gradient,
    exact_meta_gradient,
    loss_and_gradient,
    tangent_meta_gradient,
    virtual_sgd_step,
)

__all__ = [
    "FunctionalModel",
    "HypergradThreshold",
    "MMSI",
    "ManyHeadsThreshold",
    "MetaGradient",
    "MetaPairWeights",
    "MetaThreshold",
    "StaticThreshold",
    "StepBatch",
    "StepOutput",
    "TargetRateThreshold",
    "ThresholdPolicy",
    "cotangent_meta_gradient",
    "embed_and_mine",
    "global_embeddings",
    "global_similarities_with_tangent",
    "similarities",
    "exact_meta_gradient",
    "loss_and_gradient",
    "tangent_meta_gradient",
    "virtual_sgd_step",
]
