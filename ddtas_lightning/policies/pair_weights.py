"""Meta-learned per-pair weights ("learning to reweight" the mined pairs): the weight generator of
the DDTAS code (``threshold_policy=pair_weight``, spec ``docs/papers/mmsi.md`` §2 "DDTAS comparison")
and the shared machinery of MMSI (:mod:`ddtas_lightning.policies.mmsi`, spec §1).

One step:

1. embed the train batch with the live parameters (the real forward), S = E E^T (global batch);
2. mine once; the selection is reused by every loss below;
3. per-pair weights ``w = 0`` on the mined pairs as the differentiable control and the weighted
   train loss ``L_W(theta, w)`` (where w enters: ``normalization``, below);
4. the virtual SGD step ``theta' = theta - eta grad_theta L_W`` and the meta loss ``L_m(theta')``
   of the meta batch (here: scored against itself, all pairs, no mining; MMSI: against its memory);
5. ``g = dL_m/dw``, ``w~ = relu(-g)``, max-normalised to [0, 1];
6. return the real loss ``L_W(theta, w~)`` (weights detached) on the step-1 similarities (same
   values and graph as a fresh forward with theta), which the module back-propagates.

Spec §1.1: ``L_W(theta, 0)`` has a zero theta-gradient in every form below (each pair's
contribution is scaled by its weight), so the virtual step leaves theta unchanged and only its
derivative w.r.t. w matters: ``g_k = -eta (d/dw_k dL_W/dS)^T (J_S v)`` with ``v = grad L_m(theta)``.
``mode="exact"`` back-propagates through the virtual step (double backward, the literal official
algorithm); ``mode="jvp"`` evaluates the identity with one backward over the meta batch and one
forward-mode pass over the train batch (:func:`tangent_meta_gradient`). Both give the same value:
the identity is exact at theta' = theta. eta cancels in the max-normalisation (spec §6.2). The
meta loss of ``pair_weight`` does not read the train batch, so with ``mode="jvp"`` it is taken first
and the forward-mode pass over the train batch *is* the real forward (as ``threshold_policy=meta``'s
``jvp_reuse_forward``: one backbone forward fewer). MMSI must enqueue the train embeddings before its
meta loss exists, so there the real forward comes first and the forward-mode pass is a separate,
graph-free one.
The warm-up and skip decisions are Python booleans: one host synchronisation per step.

Where the weights enter (``normalization``):

* ``official``: the weight multiplies the *similarity* (``u_k = w_k s_k``, the loss evaluated on u),
  as the official MS_W / Contrastive_W losses; ``w~ = relu(-g) / max`` over all mined pairs. For MS
  the negative pairs' derivative carries a factor ~e^{-alpha lambda}, so negatives end up ~1e-8 of
  the positives and stop training (spec §1.1).
* ``per_sign`` (default): the similarity form too, but positives and negatives are max-normalised
  separately, so both signs keep weights in [0, 1].
* ``loss_terms``: the weight multiplies each pair's loss term (the loss's ``weights=`` argument, as in
  learning-to-reweight; for MS it multiplies the pair's exponential inside the log-sum), per-sign
  max-normalisation. Use this with hinge losses (contrastive): in the similarity form a negative
  pair's hinge ``relu(w s - lambda)`` is inactive at w = 0, so negatives get weight 0.

The triplet loss always uses the loss-term form (one weight per triplet, (T,), in the order of
``selection.triplets`` or :func:`enumerate_triplets`), one normalisation group (a triplet has no
sign). Guards (the official code divides 0/0): a group without a positive weight gets zeros; when
no weight at all is positive, or the meta gradient is not finite, the update is skipped
(``StepOutput.skip_update``, ``meta/skipped`` = 1) and the step's loss is a zero with a graph.

DDP: the train batch is the gathered global batch and the meta batch is identical on every rank, so
every rank computes the same weights; the meta gradient is still averaged over ranks so they agree
bit for bit. ``mode="exact"`` (double backward) is single-process only; use ``mode="jvp"`` (the
same value) under DDP. Pure torch: no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ddtas_lightning.config.validation import as_int, check_choice
from ddtas_lightning.losses.base import MetricLoss, zero_loss
from ddtas_lightning.losses.triplet import TripletMarginLoss
from ddtas_lightning.miners.base import BaseMiner
from ddtas_lightning.miners.selection import PairSelection, basic_stats, enumerate_triplets
from ddtas_lightning.policies.base import (
    StepBatch,
    StepOutput,
    ThresholdPolicy,
    global_embeddings,
    global_similarities_with_tangent,
    similarities,
)
from ddtas_lightning.policies.virtual_step import (
    FunctionalModel,
    MetaGradient,
    Params,
    all_reduce_mean,
    exact_meta_gradient,
    loss_and_gradient,
    tangent_meta_gradient,
)
from ddtas_lightning.runtime.distributed import is_distributed

MODES = ("exact", "jvp")
NORMALIZATIONS = ("official", "per_sign", "loss_terms")


# ---- the weighted train loss -----------------------------------------------------------------------
class WeightedLoss:
    """The train loss as a function ``(S, w) -> L_W`` on a fixed selection (the "head" of the
    virtual-step machinery): where the weights enter, the control's shape and its groups."""

    def __init__(self, loss_fn: MetricLoss, selection: PairSelection, normalization: str) -> None:
        self.loss_fn = loss_fn
        self.triplet = isinstance(loss_fn, TripletMarginLoss)
        if self.triplet:  # one weight per triplet; enumerate once, the loss reuses the same order
            triplets = selection.triplets
            if triplets is None:
                triplets = enumerate_triplets(selection.pos_mask, selection.neg_mask)
            self.selection = replace(selection, triplets=triplets)
            self.shape: tuple[int, ...] = (triplets[0].numel(),)
            self.similarity_form = False
        else:
            self.selection = selection
            self.shape = tuple(selection.pos_mask.shape)
            self.similarity_form = normalization != "loss_terms"
        self.normalization = normalization

    def __call__(self, sim: Tensor, weights: Tensor) -> Tensor:
        if self.similarity_form:  # u = w * s: entries outside the selection are never read
            return self.loss_fn(weights * sim, self.selection)
        return self.loss_fn(sim, self.selection, weights=weights)

    def groups(self) -> dict[str, Tensor]:
        """Boolean masks (control-shaped) of the weights that share one max-normalisation."""
        if self.triplet:
            return {"triplet": torch.ones(self.shape, dtype=torch.bool, device=self.selection.pos_mask.device)}
        pos, neg = self.selection.pos_mask, self.selection.neg_mask
        if self.normalization == "official":
            return {"pair": pos | neg}
        return {"pos": pos, "neg": neg}

    def log_groups(self) -> dict[str, Tensor]:
        """The groups the weights are reported by (positives / negatives even for ``official``)."""
        if self.triplet:
            return self.groups()
        return {"pos": self.selection.pos_mask, "neg": self.selection.neg_mask}


def normalize_weights(grad: Tensor, groups: dict[str, Tensor]) -> Tensor:
    """``relu(-grad)`` divided by its max within each group; a group whose max is 0 gets zeros,
    entries outside every group get 0. (The official code also divides by the sum first, which the
    max-division cancels.)"""
    raw = torch.where(grad < 0, -grad, torch.zeros_like(grad))  # relu(-g), without -0.0 entries
    out = torch.zeros_like(raw)
    if raw.numel() == 0:  # e.g. no triplet mined
        return out
    for mask in groups.values():
        top = raw.masked_fill(~mask, 0.0).amax()
        scaled = raw / torch.where(top > 0, top, torch.ones_like(top))
        out = torch.where(mask & (top > 0), scaled, out)
    return out


# ---- the meta loss -----------------------------------------------------------------------------------
def meta_selection(
    labels: Tensor,
    ref_labels: Tensor | None = None,
    indices: Tensor | None = None,
    ref_indices: Tensor | None = None,
) -> PairSelection:
    """All pairs between the meta batch (rows) and a reference (columns; ``None``: the meta batch
    itself), no mining, as the official G-loss: positives = same label, excluding the image itself
    *by index* (the diagonal without a reference; equal dataset indices >= 0 against a reference),
    negatives = other labels. Anchors lacking a positive or a negative are dropped entirely."""
    ref = labels if ref_labels is None else ref_labels
    same = labels[:, None] == ref[None, :]
    pos = same.clone()
    if ref_labels is None:
        pos.fill_diagonal_(False)
    elif indices is not None and ref_indices is not None:
        known = (indices[:, None] >= 0) & (ref_indices[None, :] >= 0)
        pos &= ~(known & (indices[:, None] == ref_indices[None, :]))
    neg = ~same
    valid = pos.any(1) & neg.any(1)
    pos, neg = pos & valid[:, None], neg & valid[:, None]
    return PairSelection(pos, neg, stats=basic_stats(pos, neg))


@dataclass
class MetaTarget:
    """What the meta embeddings are scored against: ``reference`` (N x D constants, e.g. MMSI's
    memory; ``None``: the meta embeddings themselves) with the pairs of :func:`meta_selection`."""

    selection: PairSelection
    reference: Tensor | None = None

    def loss(self, loss_fn: MetricLoss, emb: Tensor) -> Tensor:
        ref = emb if self.reference is None else self.reference.to(emb.dtype)
        return loss_fn(emb @ ref.T, self.selection)

    def has_anchor(self) -> bool:
        return bool(self.selection.valid_anchors.any())


@dataclass
class WeighedBatch:
    """One step's train similarities (with graph), selection and logs, and, unless the step is
    skipped, the weighted loss head, the meta gradient ``grad`` (dL_meta/dw) and the normalised
    ``weights`` (detached). ``head(sim, weights)`` is the loss of the real update."""

    sim: Tensor
    selection: PairSelection
    logs: dict[str, Tensor]
    head: WeightedLoss | None = None
    grad: Tensor | None = None
    weights: Tensor | None = None

    def skipped(self, *, warmup: bool = False) -> WeighedBatch:
        self.head = self.weights = None
        self.logs["meta/warmup"] = torch.tensor(float(warmup), device=self.sim.device)
        self.logs["meta/skipped"] = torch.ones((), device=self.sim.device)
        return self


def _weight_logs(weights: Tensor, head: WeightedLoss) -> dict[str, Tensor]:
    """Mean (over the mined pairs of the group) and max weight per group, and how many are > 0."""
    w = weights.detach()
    logs = {}
    for name, mask in head.log_groups().items():
        masked = w.masked_fill(~mask, 0.0)
        logs[f"meta/w_{name}_mean"] = masked.sum() / mask.sum().clamp(min=1)
        logs[f"meta/w_{name}_max"] = masked.amax() if w.numel() else masked.sum()
    logs["meta/weighted_triplets" if head.triplet else "meta/weighted_pairs"] = (w > 0).sum()
    return logs


# ---- the policy ----------------------------------------------------------------------------------------
class MetaPairWeights(ThresholdPolicy):
    """Per-pair weights from the meta gradient of a virtual step (``threshold_policy=pair_weight``:
    the DDTAS code's weight generator; the meta batch is scored against itself).

    mode: ``"exact"`` (double backward through the virtual step: the official algorithm) or
        ``"jvp"`` (one forward-mode pass; the same value, see the module docstring; works under DDP).
    inner_lr: eta of the virtual SGD step (cancels in the normalisation; the papers use the model's lr).
    normalization: ``"official"`` | ``"per_sign"`` | ``"loss_terms"`` (module docstring).
    meta_K: images per class of the meta batch the data module builds (``None``: ``data.meta_K``;
        this policy needs >= 2 so that meta images have positives).
    static_steps: the first this many optimiser steps are plain static steps (unweighted loss; MMSI's
        memory still fills): MMSI's official protocol fine-tunes a trained model (0: weights from step 0).

    Subclasses (MMSI) override :meth:`observe`, :meth:`warming_up` and :meth:`meta_target`.
    Logs: ``meta/loss``, ``meta/warmup``, ``meta/skipped``, ``meta/w_{pos,neg}_{mean,max}`` (means
    over the mined pairs of that sign; ``meta/w_triplet_*`` for the triplet loss),
    ``meta/weighted_pairs`` (``meta/weighted_triplets``): how many weights are > 0.
    """

    needs_meta_batch = True

    def __init__(
        self,
        mode: str = "exact",
        inner_lr: float = 1e-5,
        normalization: str = "per_sign",
        meta_K: int | None = None,
        static_steps: int = 0,
    ) -> None:
        super().__init__()
        check_choice("threshold_policy.mode", mode, MODES)
        check_choice("threshold_policy.normalization", normalization, NORMALIZATIONS)
        if not inner_lr > 0:
            raise ValueError(f"threshold_policy.inner_lr must be > 0, got {inner_lr}")
        self.mode, self.inner_lr, self.normalization = mode, float(inner_lr), normalization
        self.meta_K = None if meta_K is None else as_int("threshold_policy.meta_K", meta_K, minimum=1)
        self.static_steps = as_int("threshold_policy.static_steps", static_steps, minimum=0)

    # ---- hooks -----------------------------------------------------------------------------------
    def observe(self, embeddings: Tensor, batch: StepBatch) -> None:
        """Sees the detached global train embeddings at theta before the meta loss is built."""

    def warming_up(self) -> bool:
        """True: no update at all this step (MMSI: memory not ready)."""
        return False

    def meta_target(self, batch: StepBatch) -> MetaTarget:
        """The meta batch against itself, all pairs (the DDTAS code's ``criterion_m(ev, yv, ev, yv)``)."""
        return MetaTarget(meta_selection(batch.meta_labels))

    def extra_logs(self) -> dict[str, Tensor]:
        return {}

    # ---- the step --------------------------------------------------------------------------------
    def step(self, model: nn.Module, loss_fn: MetricLoss, miner: BaseMiner, batch: StepBatch) -> StepOutput:
        if batch.global_step < self.static_steps:  # MMSI's protocol: a static (unweighted) warm-up first
            emb = global_embeddings(model(batch.images))
            self.observe(emb.detach(), batch)  # the memory fills meanwhile
            sim = similarities(emb)
            selection = miner(sim, batch.labels, epoch=batch.epoch, generator=batch.generator)
            logs = {"meta/static": torch.ones((), device=sim.device), **self.extra_logs()}
            return StepOutput(loss=loss_fn(sim, selection), selection=selection, logs=logs)
        weighed = self.weigh(model, loss_fn, miner, batch)
        sim, selection, logs = weighed.sim, weighed.selection, weighed.logs
        if weighed.head is None or weighed.weights is None:  # skipped: zero loss with a graph, no update
            return StepOutput(loss=zero_loss(sim), selection=selection, logs=logs, skip_update=True)
        return StepOutput(loss=weighed.head(sim, weighed.weights), selection=selection, logs=logs)

    def weigh(self, model: nn.Module, loss_fn: MetricLoss, miner: BaseMiner, batch: StepBatch) -> WeighedBatch:
        """Steps 1-5 of the module docstring: the real forward of the train batch (updates BN
        statistics and, for MMSI, the memory), the selection and the normalised weights."""
        if batch.meta_images is None or batch.meta_labels is None:
            raise ValueError(
                f"{type(self).__name__} needs a meta batch (StepBatch.meta_images / meta_labels); "
                "the data module provides it when policy.needs_meta_batch is True"
            )
        fm = FunctionalModel(model)
        target = tangent = None
        if self.mode == "jvp" and self._meta_ignores_the_train_batch():
            target = self.meta_target(batch)
            if target.has_anchor():  # the meta gradient first; the forward-mode pass is the real forward
                meta_loss, v = loss_and_gradient(self._meta_loss_fn(fm, loss_fn, batch, target), fm.params)
                sim, sim_dot = global_similarities_with_tangent(*fm.forward_with_tangent(batch.images, v))
                tangent = (meta_loss, sim_dot)
        if tangent is None:
            emb = global_embeddings(fm(batch.images))  # the real forward: updates BN statistics once
            sim = similarities(emb)
            self.observe(emb.detach(), batch)  # before the memory is used (spec §2)
        selection = miner(sim, batch.labels, epoch=batch.epoch, generator=batch.generator)
        weighed = WeighedBatch(sim, selection, self.extra_logs())
        if self.warming_up():  # official: no update at all until the memory is ready
            return weighed.skipped(warmup=True)
        target = self.meta_target(batch) if target is None else target
        if not target.has_anchor():  # official `if L_G == 0: continue`
            return weighed.skipped()
        head = WeightedLoss(loss_fn, selection, self.normalization)
        meta = self.meta_gradient(fm, loss_fn, batch, sim, head, target, tangent)
        weights = normalize_weights(meta.grad, head.groups())
        weighed.grad = meta.grad
        weighed.logs["meta/loss"] = meta.meta_loss
        weighed.logs.update(_weight_logs(weights, head))
        if not bool(torch.isfinite(meta.grad).all() & (weights > 0).any()):  # one host sync
            return weighed.skipped()
        weighed.head, weighed.weights = head, weights.detach()
        weighed.logs["meta/warmup"] = weighed.logs["meta/skipped"] = torch.zeros((), device=sim.device)
        return weighed

    def _meta_ignores_the_train_batch(self) -> bool:
        """The meta loss reads nothing of this step's train batch (the base hooks: no memory)."""
        cls = type(self)
        return (cls.observe is MetaPairWeights.observe and cls.warming_up is MetaPairWeights.warming_up
                and cls.meta_target is MetaPairWeights.meta_target)

    @staticmethod
    def _meta_loss_fn(fm: FunctionalModel, loss_fn: MetricLoss, batch: StepBatch, target: MetaTarget):
        def meta_loss_fn(params: Params) -> Tensor:
            emb_m = fm(batch.meta_images, params, update_buffers=False)
            return target.loss(loss_fn, emb_m)

        return meta_loss_fn

    def meta_gradient(self, fm: FunctionalModel, loss_fn: MetricLoss, batch: StepBatch, sim: Tensor,
                      head: WeightedLoss, target: MetaTarget,
                      tangent: tuple[Tensor, Tensor] | None = None) -> MetaGradient:
        """``dL_meta(theta'(w))/dw`` at ``w = 0`` (averaged over DDP ranks). ``tangent``: ``mode="jvp"``
        with the meta loss and ``Sdot = J_S v`` already computed (by the real forward)."""
        meta_loss_fn = self._meta_loss_fn(fm, loss_fn, batch, target)
        dtype = torch.promote_types(sim.dtype, torch.float32)  # fp16/bf16 losses run in float32
        w = torch.zeros(head.shape, dtype=dtype, device=sim.device, requires_grad=True)
        if self.mode == "exact":
            if is_distributed():
                raise ValueError(
                    "threshold_policy.mode=exact (double backward) is single-process only; "
                    "use threshold_policy.mode=jvp (the same weights, spec mmsi.md §1.1) under DDP"
                )
            meta = exact_meta_gradient(head(sim, w), w, meta_loss_fn, fm.params, self.inner_lr)
        elif tangent is not None:
            meta_loss, sim_dot = tangent
            meta = MetaGradient(tangent_meta_gradient(head, sim, sim_dot, w, self.inner_lr), meta_loss)
        else:  # theta' = theta at w = 0, so v = grad L_meta(theta) makes the identity exact
            meta_loss, v = loss_and_gradient(meta_loss_fn, fm.params)
            emb, emb_dot = fm.forward_with_tangent(batch.images, v, update_buffers=False, keep_graph=False)
            _, sim_dot = global_similarities_with_tangent(emb, emb_dot)
            meta = MetaGradient(tangent_meta_gradient(head, sim, sim_dot, w, self.inner_lr), meta_loss)
        return MetaGradient(all_reduce_mean(meta.grad), meta.meta_loss)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, inner_lr={self.inner_lr}, normalization={self.normalization}, meta_K={self.meta_K}"


__all__ = ["MetaPairWeights", "MetaTarget", "WeighedBatch", "WeightedLoss", "meta_selection", "normalize_weights"]
