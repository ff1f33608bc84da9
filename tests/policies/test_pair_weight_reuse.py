"""``threshold_policy=pair_weight mode=jvp``: the meta gradient comes first and the forward-mode pass
over the train batch is the real forward (one backbone forward fewer). Checked against the separate,
graph-free pass it replaces (the path MMSI still takes) and against one plain forward."""

from __future__ import annotations

import copy

import pytest
import torch

from ddtas_lightning.miners.none import AllPairsMiner
from ddtas_lightning.policies import MetaPairWeights
from tests.policies.problems import make_batch, make_model
from tests.policies.test_mmsi import ETA, FORMS, reference_weighted_loss


class SeparatePass(MetaPairWeights):
    """The same policy forced onto the separate-pass path (as if its meta loss read the train batch)."""

    def _meta_ignores_the_train_batch(self) -> bool:
        return False


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bn", [None, "train", "eval"])
def test_reused_forward_gives_the_separate_pass_weights_and_one_plain_forward(loss_fn, form, bn):
    model, batch = make_model(5, bn=bn), make_batch(5)
    twin, plain = copy.deepcopy(model), copy.deepcopy(model)
    calls = {"reuse": 0, "separate": 0}

    def counting(name, m):  # how many forwards run through each model's backbone layer
        m.fc1.register_forward_hook(lambda *_: calls.__setitem__(name, calls[name] + 1))

    counting("reuse", model)
    counting("separate", twin)
    reused = MetaPairWeights(mode="jvp", inner_lr=ETA, normalization=form).weigh(model, loss_fn, AllPairsMiner(), batch)
    separate = SeparatePass(mode="jvp", inner_lr=ETA, normalization=form).weigh(twin, loss_fn, AllPairsMiner(), batch)
    assert calls == {"reuse": 2, "separate": 3}  # meta + train, against meta + real + tangent
    assert separate.grad.abs().max() > 0
    torch.testing.assert_close(reused.grad, separate.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(reused.weights, separate.weights, rtol=1e-10, atol=1e-14)
    emb = plain(batch.images)  # one plain forward: same similarities and BN statistics
    torch.testing.assert_close(reused.sim, emb @ emb.T, rtol=0, atol=1e-15)
    for (k, b), (_, rb) in zip(model.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(b, rb, rtol=0, atol=0, msg=k)
    loss = reused.head(reused.sim, reused.weights)
    ref = reference_weighted_loss(loss_fn, emb @ emb.T, reused.selection, reused.weights, form)
    torch.testing.assert_close(loss, ref, rtol=1e-13, atol=0)
    g = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    g_ref = torch.autograd.grad(ref, list(plain.parameters()), allow_unused=True)
    for a, b in zip(g, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
