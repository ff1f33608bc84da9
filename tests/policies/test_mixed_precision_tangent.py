"""The forward-mode pass under autocast (trainer.precision=16-mixed / bf16-mixed): an eval-mode
BatchNorm (backbone.freeze_bn=true, the papers' setting) on a bf16 input gets a float32 tangent and the
next convolution refused the pair; the pass now runs with autocast off, in the parameters' precision."""

from __future__ import annotations

import pytest
import torch

from ddtas_lightning.losses import MultiSimilarityLoss, SoftContrastiveLoss
from ddtas_lightning.miners.at_asms import AdaptiveToleranceASMS
from ddtas_lightning.models import Embedder
from ddtas_lightning.policies import MMSI, MetaPairWeights, MetaThreshold, StepBatch
from ddtas_lightning.policies.virtual_step import FunctionalModel


def _model():
    torch.manual_seed(0)
    return Embedder("resnet10t", dim=16, freeze_bn=True).train()


def _batch():
    g = torch.Generator().manual_seed(0)
    return StepBatch(torch.randn(8, 3, 32, 32, generator=g), torch.arange(4).repeat_interleave(2),
                     indices=torch.arange(8), meta_images=torch.randn(4, 3, 32, 32, generator=g),
                     meta_labels=torch.arange(2).repeat_interleave(2), meta_indices=torch.arange(4) + 100)


@pytest.mark.parametrize("keep_graph", [True, False])
def test_tangent_pass_under_autocast_equals_the_float32_pass(keep_graph):
    model, batch = _model(), _batch()
    fm = FunctionalModel(model)
    v = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, (n, p) in
         enumerate(fm.params.items())}
    ref = fm.forward_with_tangent(batch.images, v, update_buffers=False, keep_graph=keep_graph)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fm.forward_with_tangent(batch.images, v, update_buffers=False, keep_graph=keep_graph)
    for a, b in zip(out, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("make", [
    lambda: MetaThreshold(mode="jvp", init=0.5, lr=0.01),
    lambda: MetaThreshold(mode="jvp", init=0.5, lr=0.01, jvp_reuse_forward=False),
    lambda: MetaThreshold(mode="exact", init=0.5, lr=0.01, granularity="pos_neg"),
    lambda: MetaPairWeights(mode="jvp"),
    lambda: MMSI(mode="jvp", warmup_classes=2, memory_size_per_class=4, meta_K=None),
], ids=["meta-jvp", "meta-jvp-separate", "meta-exact-pos_neg", "pair_weight-jvp", "mmsi-jvp"])
def test_every_forward_mode_policy_steps_under_bf16_autocast(make):
    policy, model, batch = make(), _model(), _batch()
    loss_fn = SoftContrastiveLoss() if isinstance(policy, MetaThreshold) else MultiSimilarityLoss()
    if isinstance(policy, MMSI):  # the meta classes' other images in the memory
        policy.memory.enqueue(torch.nn.functional.normalize(torch.randn(8, 16), dim=1),
                              torch.arange(2).repeat(4), torch.arange(8) + 1000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = policy.step(model, loss_fn, AdaptiveToleranceASMS(), batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and not out.skip_update
    if isinstance(policy, MetaThreshold):
        assert not torch.equal(policy.lam, torch.full_like(policy.lam, 0.5))  # lambda learned
    else:
        assert out.logs["meta/weighted_pairs"] > 0
