"""Meta-learned per-pair weights (threshold_policy=pair_weight and mmsi) on tiny float64 problems,
against plain references: model copies + real SGD steps, nested finite differences, per-pair loops."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddtas_lightning.losses import BinomialDevianceLoss, ContrastiveLoss, TripletMarginLoss
from ddtas_lightning.miners.none import AllPairsMiner
from ddtas_lightning.miners.selection import PairSelection, enumerate_triplets
from ddtas_lightning.policies import MMSI, MetaPairWeights
from ddtas_lightning.policies.base import StepBatch
from ddtas_lightning.policies.pair_weights import WeightedLoss, meta_selection, normalize_weights
from ddtas_lightning.policies.virtual_step import FunctionalModel, virtual_sgd_step
from tests.policies.problems import LOSSES, central_difference, make_batch, make_model

CONF = Path(__file__).resolve().parents[2] / "conf" / "threshold_policy"
FORMS = ["official", "per_sign", "loss_terms"]
ETA = 0.5  # large: the finite differences see the full virtual step


# ---- problems and references -------------------------------------------------------------------------
def mmsi_batch(seed: int) -> StepBatch:
    """Train batch 4 classes x 3 (indices 0-11), meta batch 3 classes x 1 whose images are train
    images 0, 3 and 6 (so the index exclusion matters) plus one image of a class with no memory."""
    batch = make_batch(seed)
    batch.indices = torch.arange(len(batch.labels))
    batch.meta_images = torch.cat([batch.images[[0, 3, 6]], batch.meta_images[:1]])
    batch.meta_labels = torch.tensor([0, 1, 2, 9])
    batch.meta_indices = torch.tensor([0, 3, 6, 50])
    return batch


def prefill(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Older memory entries (other images of classes 0-3, random unit vectors); with 4 slots per
    class and 3 new train images, the newer prefill entry of each class survives the step."""
    g = torch.Generator().manual_seed(77 + seed)
    emb = torch.nn.functional.normalize(torch.randn(8, 5, generator=g, dtype=torch.float64), dim=1)
    return emb, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), torch.arange(100, 108)


def make_policy(kind: str, seed: int = 0, **kw):
    if kind == "pair_weight":
        return MetaPairWeights(inner_lr=ETA, **kw)
    policy = MMSI(inner_lr=ETA, warmup_classes=2, memory_size_per_class=4, **kw)
    policy.memory.enqueue(*prefill(seed))
    return policy


def problem(kind: str, seed: int):
    return make_model(seed), (make_batch(seed) if kind == "pair_weight" else mmsi_batch(seed))


def reference_weighted_loss(loss_fn, sim, selection, w, form):
    """Where the weights enter, written out independently of WeightedLoss."""
    if isinstance(loss_fn, TripletMarginLoss) or form == "loss_terms":
        return loss_fn(sim, selection, weights=w)
    return loss_fn(w * sim, selection)


def reference_meta_loss(kind, loss_fn, batch, memory):
    """L_meta as a function of a model, with the masks built by Python loops."""

    def f(model):
        emb = model(batch.meta_images)
        if kind == "pair_weight":
            return loss_fn(emb @ emb.T, PairSelection.all_pairs(batch.meta_labels))
        ref, ref_labels, ref_indices = memory
        pos = torch.zeros(len(emb), len(ref), dtype=torch.bool)
        neg = torch.zeros_like(pos)
        for i, (y, idx) in enumerate(zip(batch.meta_labels.tolist(), batch.meta_indices.tolist())):
            for j, (yr, ir) in enumerate(zip(ref_labels.tolist(), ref_indices.tolist())):
                pos[i, j] = y == yr and idx != ir
                neg[i, j] = y != yr
            if not (pos[i].any() and neg[i].any()):
                pos[i] = neg[i] = False
        return loss_fn(emb @ ref.T, PairSelection(pos, neg))

    return f


def reference_memory(seed, model, batch, size_per_class=4):
    """Prefill + the train batch embedded at theta, FIFO per class, by a loop."""
    old_emb, old_labels, old_idx = prefill(seed)
    with torch.no_grad():
        new_emb = copy.deepcopy(model)(batch.images)
    rows = list(zip(old_emb, old_labels.tolist(), old_idx.tolist()))
    rows += list(zip(new_emb, batch.labels.tolist(), batch.indices.tolist()))
    kept = []
    for y in sorted({r[1] for r in rows}):
        kept += [r for r in rows if r[1] == y][-size_per_class:]
    return torch.stack([r[0] for r in kept]), torch.tensor([r[1] for r in kept]), torch.tensor([r[2] for r in kept])


def nested_fd_grad(model, loss_fn, selection, batch, meta_fn, form, control_shape):
    """dL_meta(theta - eta grad L_W(theta, w))/dw_k at w = 0 by central differences, k over the
    mined pairs (triplets); the virtual step itself on a model copy with a real SGD update."""

    def objective(w):
        m = copy.deepcopy(model)
        emb = m(batch.images)
        train_loss = reference_weighted_loss(loss_fn, emb @ emb.T, selection, w, form)
        params = [p for p in m.parameters() if p.requires_grad]
        grads = torch.autograd.grad(train_loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.sub_(ETA * g)
            return meta_fn(m)

    if isinstance(loss_fn, TripletMarginLoss):
        mined = torch.ones(control_shape, dtype=torch.bool)
    else:
        mined = selection.pos_mask | selection.neg_mask
    out = torch.zeros(control_shape, dtype=torch.float64)
    idx = mined.nonzero(as_tuple=True)
    flat = torch.zeros(int(mined.sum()), dtype=torch.float64)

    def along(values):
        w = torch.zeros(control_shape, dtype=torch.float64)
        w[idx] = values
        return objective(w)

    # one coordinate at a time (central_difference loops over the entries of `flat`)
    out[idx] = central_difference(along, flat, h=1e-6)
    return out


def slow_normalize(grad, selection, form, triplet):
    """relu(-g), max-normalised per group, pair by pair with Python loops."""
    raw = [max(-float(g), 0.0) for g in grad.reshape(-1)]
    if triplet:
        groups = [list(range(len(raw)))]
    else:
        flat_pos = selection.pos_mask.reshape(-1).tolist()
        flat_neg = selection.neg_mask.reshape(-1).tolist()
        pos = [k for k, p in enumerate(flat_pos) if p]
        neg = [k for k, n in enumerate(flat_neg) if n]
        groups = [pos + neg] if form == "official" else [pos, neg]
    out = [0.0] * len(raw)
    for group in groups:
        top = max((raw[k] for k in group), default=0.0)
        for k in group:
            out[k] = raw[k] / top if top > 0 else 0.0
    return torch.tensor(out, dtype=torch.float64).reshape(grad.shape)


# ---- the weights are the meta gradient ----------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", ["pair_weight", "mmsi"])
def test_weights_equal_nested_finite_differences(loss_fn, kind, form):
    seed = 1
    model, batch = problem(kind, seed)
    miner = AllPairsMiner()
    emb = copy.deepcopy(model)(batch.images)
    selection = miner(emb @ emb.T, batch.labels)
    memory = reference_memory(seed, model, batch) if kind == "mmsi" else None
    meta_fn = reference_meta_loss(kind, loss_fn, batch, memory)
    expected_grad = nested_fd_grad(model, loss_fn, selection, batch, meta_fn, form, selection.pos_mask.shape)
    assert expected_grad.abs().max() > 1e-4 and (expected_grad < 0).sum() > 3  # a problem where w matters
    expected_w = slow_normalize(expected_grad, selection, form, triplet=False)

    for mode in ("exact", "jvp"):
        policy = make_policy(kind, seed, mode=mode, normalization=form)
        weighed = policy.weigh(make_model(seed), loss_fn, miner, batch)
        torch.testing.assert_close(weighed.grad, expected_grad, rtol=1e-6, atol=1e-9, msg=mode)
        # weights lie in [0, 1]; the tiny MS negatives' gradients (~1e-4) divided by their own max
        # amplify the finite-difference error to ~1e-6
        torch.testing.assert_close(weighed.weights, expected_w, rtol=0, atol=1e-5, msg=mode)
        torch.testing.assert_close(weighed.logs["meta/loss"], meta_fn(make_model(seed)), rtol=1e-12, atol=0)
        if kind == "mmsi":  # the memory was updated with the current batch before it was used
            for got, want in zip(policy.memory.entries(), memory):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
        # the step itself, from the same state (a fresh memory: weigh has just updated this one)
        out = make_policy(kind, seed, mode=mode, normalization=form).step(make_model(seed), loss_fn, miner, batch)
        emb = make_model(seed)(batch.images)
        ref_loss = reference_weighted_loss(loss_fn, emb @ emb.T, selection, expected_w, form)
        torch.testing.assert_close(out.loss, ref_loss, rtol=1e-6, atol=1e-9)
        assert not out.skip_update and out.logs["meta/skipped"] == 0


@pytest.mark.parametrize("loss_name", ["ms", "soft_contrastive", "contrastive", "triplet"])
def test_triplet_and_hinge_weights_equal_nested_finite_differences(loss_name):
    """One weight per triplet (loss-term form); the contrastive hinge in the loss-term form."""
    seed = 2
    loss_fn = {"contrastive": ContrastiveLoss(threshold=0.0), "triplet": TripletMarginLoss(threshold=0.5)}.get(
        loss_name) or LOSSES[loss_name]()
    model, batch = make_model(seed), make_batch(seed, classes=3, k=2)
    miner = AllPairsMiner()
    emb = copy.deepcopy(model)(batch.images)
    selection = miner(emb @ emb.T, batch.labels)
    triplet = loss_name == "triplet"
    shape = (enumerate_triplets(selection.pos_mask, selection.neg_mask)[0].numel(),) if triplet else selection.pos_mask.shape
    meta_fn = reference_meta_loss("pair_weight", loss_fn, batch, None)
    expected = nested_fd_grad(model, loss_fn, selection, batch, meta_fn, "loss_terms", shape)
    assert (expected < 0).sum() > 2
    for mode in ("exact", "jvp"):
        weighed = MetaPairWeights(mode=mode, inner_lr=ETA, normalization="loss_terms").weigh(
            make_model(seed), loss_fn, miner, batch)
        assert weighed.weights.shape == shape
        torch.testing.assert_close(weighed.grad, expected, rtol=1e-6, atol=1e-9, msg=mode)
        torch.testing.assert_close(weighed.weights, slow_normalize(expected, selection, "loss_terms", triplet))


# ---- structure ---------------------------------------------------------------------------------------------
ALL_LOSSES = {
    **LOSSES,
    "contrastive": lambda: ContrastiveLoss(threshold=0.0),
    "binomial": lambda: BinomialDevianceLoss(scale_neg=10.0),
    "triplet": lambda: TripletMarginLoss(threshold=0.5),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("loss_name", sorted(ALL_LOSSES))
def test_virtual_step_at_zero_weights_leaves_theta_unchanged(loss_name, form):
    """Spec mmsi.md §1.1: grad_theta L_W(theta, 0) = 0 exactly, in every form, for every loss."""
    loss_fn = ALL_LOSSES[loss_name]()
    model, batch = make_model(3), make_batch(3)
    fm = FunctionalModel(model)
    sim = fm(batch.images) @ fm(batch.images).T
    head = WeightedLoss(loss_fn, AllPairsMiner()(sim, batch.labels), form)
    w = torch.zeros(head.shape, dtype=torch.float64, requires_grad=True)
    virtual = virtual_sgd_step(head(sim, w), fm.params, lr=10.0)
    for name, p in fm.params.items():
        assert torch.equal(virtual[name], p), name
    # ... while the loss does depend on w: its derivative is the c_k of the spec
    assert torch.autograd.grad(head(sim, w), w)[0].abs().max() > 0


@pytest.mark.parametrize("kind", ["pair_weight", "mmsi"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("loss_name", sorted(ALL_LOSSES))
def test_jvp_equals_exact(loss_name, form, kind):
    """Not a first-order approximation: at w = 0 the identity is exact (large eta on purpose)."""
    loss_fn = ALL_LOSSES[loss_name]()
    out = {}
    for mode in ("exact", "jvp"):
        model, batch = problem(kind, 4)
        out[mode] = make_policy(kind, 4, mode=mode, normalization=form).weigh(model, loss_fn, AllPairsMiner(), batch)
    exact, jvp = out["exact"], out["jvp"]
    assert exact.grad.abs().max() > 0
    torch.testing.assert_close(jvp.grad, exact.grad, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(jvp.weights, exact.weights, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(jvp.head(jvp.sim, jvp.weights), exact.head(exact.sim, exact.weights), rtol=1e-12, atol=0)


# ---- normalisation and guards -----------------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("triplet", [False, True])
def test_normalisation_matches_a_per_pair_reference(form, triplet):
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(3).repeat_interleave(3)
    selection = AllPairsMiner()(torch.randn(9, 9, generator=g), labels)
    selection.neg_mask &= torch.rand(9, 9, generator=g) > 0.3  # a sparser mined set
    loss_fn = TripletMarginLoss() if triplet else LOSSES["ms"]()
    head = WeightedLoss(loss_fn, selection, form)
    grad = torch.randn(head.shape, generator=g, dtype=torch.float64)
    grad[grad.abs() < 0.2] = 0.0  # exact zeros must give weight 0, not -0 or NaN
    got = normalize_weights(grad, head.groups())
    expected = slow_normalize(grad, selection, form, triplet)
    torch.testing.assert_close(got, expected, rtol=1e-15, atol=0)
    assert got.max() == 1 and (got >= 0).all() and not torch.signbit(got).any()
    if not triplet:
        outside = ~(selection.pos_mask | selection.neg_mask)
        assert (got[outside] == 0).all()  # only mined pairs carry weight
        pos_max, neg_max = got[selection.pos_mask].max(), got[selection.neg_mask].max()
        if form == "official":
            assert max(pos_max, neg_max) == 1 and min(pos_max, neg_max) < 1
        else:
            assert pos_max == 1 and neg_max == 1


def test_a_group_without_positive_weight_gets_zeros():
    labels = torch.arange(2).repeat_interleave(2)
    selection = PairSelection.all_pairs(labels)
    head = WeightedLoss(LOSSES["ms"](), selection, "per_sign")
    grad = torch.where(selection.pos_mask, -torch.ones(4, 4), torch.ones(4, 4))  # negatives: only g > 0
    w = normalize_weights(grad, head.groups())
    assert torch.equal(w, selection.pos_mask.float())  # no 0/0 = NaN for the negatives
    assert torch.equal(normalize_weights(torch.ones(4, 4), head.groups()), torch.zeros(4, 4))
    assert normalize_weights(torch.zeros(0), {"triplet": torch.ones(0, dtype=torch.bool)}).numel() == 0


@pytest.mark.parametrize("bad", ["positive", "nan"])
def test_no_positive_weight_skips_the_update(loss_fn, monkeypatch, bad):
    policy = MetaPairWeights(mode="jvp")
    real = MetaPairWeights.meta_gradient

    def fake(self, *args):
        meta = real(self, *args)
        if bad == "positive":
            meta.grad = meta.grad.abs()
        else:  # one non-finite entry: the other weights would still be fine
            meta.grad = meta.grad.clone()
            meta.grad.view(-1)[1] = float("nan")
        return meta

    monkeypatch.setattr(MetaPairWeights, "meta_gradient", fake)
    model = make_model(6)
    out = policy.step(model, loss_fn, AllPairsMiner(), make_batch(6))
    assert out.skip_update and out.logs["meta/skipped"] == 1 and out.logs["meta/warmup"] == 0
    assert out.loss == 0 and out.loss.requires_grad  # a zero with a graph (DDP keeps its sync)
    out.loss.backward()
    assert all(p.grad is not None and (p.grad == 0).all() for p in model.parameters())
    monkeypatch.undo()
    assert not policy.step(make_model(6), loss_fn, AllPairsMiner(), make_batch(6)).skip_update


# ---- MMSI: memory, warm-up, meta target ---------------------------------------------------------------------
def test_mmsi_warm_up_does_no_update_but_fills_the_memory(loss_fn):
    policy = MMSI(mode="jvp", warmup_classes=6, memory_size_per_class=2)
    model, batch = make_model(7), mmsi_batch(7)
    out = policy.step(model, loss_fn, AllPairsMiner(), batch)  # 4 classes < 6
    assert out.skip_update and out.logs["meta/warmup"] == 1 and out.logs["meta/skipped"] == 1
    assert "meta/loss" not in out.logs and out.loss == 0 and out.loss.requires_grad
    assert out.logs["meta/memory_size"] == 8 and out.logs["meta/memory_classes"] == 4
    assert set(out.selection.stats) >= {"pos_pairs", "neg_pairs"}  # mining still reported
    batch.labels = batch.labels + 2  # classes 2..5: now 6 classes are stored
    out = policy.step(model, loss_fn, AllPairsMiner(), batch)
    assert not out.skip_update and out.logs["meta/warmup"] == 0 and out.logs["meta/memory_classes"] == 6
    assert out.logs["meta/w_pos_max"] == 1 and out.logs["meta/weighted_pairs"] > 0
    assert out.loss > 0


def test_mmsi_meta_target_excludes_the_image_itself_by_index():
    labels = torch.tensor([0, 0, 1])
    # meta image 0 is memory entry 0 (same index); entry 1 is another image of class 0. Only indices
    # decide: no similarity value is looked at (the official `s < 1` test, spec mmsi.md §6.5)
    sel = meta_selection(torch.tensor([0, 1]), labels, torch.tensor([10, 12]), torch.tensor([10, 11, 12]))
    assert sel.pos_mask.tolist() == [[False, True, False], [False, False, False]]
    # meta image 1 (class 1) has only itself as positive: the anchor is dropped entirely
    assert sel.neg_mask.tolist() == [[False, False, True], [False, False, False]]
    # unknown indices (-1) never match
    sel = meta_selection(torch.tensor([0]), labels, torch.tensor([-1]), torch.tensor([-1, -1, 5]))
    assert sel.pos_mask.tolist() == [[True, True, False]]
    # no reference: the meta batch against itself, the diagonal excluded by index
    sel = meta_selection(torch.tensor([0, 0, 1]))
    assert sel.pos_mask.tolist() == [[False, True, False], [True, False, False], [False, False, False]]


def test_mmsi_without_a_valid_meta_anchor_skips(loss_fn):
    policy = MMSI(mode="exact", warmup_classes=1)
    batch = mmsi_batch(8)
    batch.meta_labels = torch.tensor([7, 7, 8, 8])  # classes the memory has never seen: no positive
    batch.meta_indices = torch.tensor([40, 41, 42, 43])
    out = policy.step(make_model(8), loss_fn, AllPairsMiner(), batch)
    assert out.skip_update and out.logs["meta/skipped"] == 1 and out.logs["meta/warmup"] == 0
    assert len(policy.memory) == 12  # the memory was still updated


def test_memory_state_is_in_the_policy_state_dict(loss_fn):
    policy = make_policy("mmsi", 9, mode="jvp")
    policy.step(make_model(9), loss_fn, AllPairsMiner(), mmsi_batch(9))
    state = copy.deepcopy(policy.state_dict())
    assert set(state) == {"memory.embeddings", "memory.labels", "memory.indices"}
    restored = MMSI(mode="jvp", inner_lr=ETA, warmup_classes=2, memory_size_per_class=4)
    restored.load_state_dict(state)
    a = policy.step(make_model(10), loss_fn, AllPairsMiner(), mmsi_batch(10))
    b = restored.step(make_model(10), loss_fn, AllPairsMiner(), mmsi_batch(10))
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)


# ---- the real update, BN, DDP, config ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exact", "jvp"])
@pytest.mark.parametrize("bn", [None, "train", "eval"])
def test_real_update_is_the_weighted_loss_only(loss_fn, mode, bn):
    """Parameters, gradients and BN statistics untouched by the meta work; the returned loss is the
    weighted loss of one plain forward with the final weights."""
    model, batch = make_model(11, bn=bn), mmsi_batch(11)
    twin = copy.deepcopy(model)
    params0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    policy = make_policy("mmsi", 11, mode=mode)
    weighed = policy.weigh(model, loss_fn, AllPairsMiner(), batch)
    for k, p in model.named_parameters():
        assert torch.equal(p, params0[k]) and p.grad is None, k
    emb = twin(batch.images)  # one plain forward: the BN statistics must agree with it
    for (k, b), (_, rb) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.equal(b, rb), k
    loss = weighed.head(weighed.sim, weighed.weights)
    ref = reference_weighted_loss(loss_fn, emb @ emb.T, weighed.selection, weighed.weights, "per_sign")
    torch.testing.assert_close(loss, ref, rtol=1e-14, atol=0)
    g = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    g_ref = torch.autograd.grad(ref, list(twin.parameters()), allow_unused=True)
    for a, b in zip(g, g_ref):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_exact_mode_under_ddp_names_the_alternative(loss_fn, monkeypatch):
    import ddtas_lightning.policies.pair_weights as pw

    monkeypatch.setattr(pw, "is_distributed", lambda: True)
    with pytest.raises(ValueError, match="mode=jvp"):
        MetaPairWeights(mode="exact").step(make_model(0), loss_fn, AllPairsMiner(), make_batch(0))
    with pytest.raises(ValueError, match="meta batch"):
        MetaPairWeights(mode="jvp").step(make_model(0), loss_fn, AllPairsMiner(), StepBatch(
            make_batch(0).images, make_batch(0).labels))


def test_logs_are_zero_dim_tensors(loss_fn):
    out = make_policy("mmsi", 12, mode="jvp").step(make_model(12), loss_fn, AllPairsMiner(), mmsi_batch(12))
    assert set(out.logs) == {
        "meta/loss", "meta/warmup", "meta/skipped", "meta/w_pos_mean", "meta/w_pos_max", "meta/w_neg_mean",
        "meta/w_neg_max", "meta/weighted_pairs", "meta/memory_size", "meta/memory_classes",
    }
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in out.logs.values())
    out = MetaPairWeights(mode="jvp").step(make_model(12), TripletMarginLoss(), AllPairsMiner(), make_batch(12))
    assert {"meta/w_triplet_mean", "meta/w_triplet_max", "meta/weighted_triplets"} <= set(out.logs)


@pytest.mark.parametrize("name, cls", [("mmsi", MMSI), ("pair_weight", MetaPairWeights)])
def test_config_instantiates_with_the_documented_defaults(name, cls):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    policy = instantiate(cfg)
    assert type(policy) is cls and policy.needs_meta_batch
    signature = inspect.signature(cls.__init__).parameters
    keys = set(cfg) - {"_target_"}
    assert keys == set(signature) - {"self"}  # every constructor argument is in the config
    for key in keys:
        assert signature[key].default == OmegaConf.to_object(cfg)[key], key
    assert policy.meta_K == (1 if cls is MMSI else None)  # MMSI: a P_m x 1 meta batch; else data.meta_K
    with pytest.raises(ValueError, match="normalization"):
        cls(normalization="softmax")
    with pytest.raises(ValueError, match="mode"):
        cls(mode="first_order")
