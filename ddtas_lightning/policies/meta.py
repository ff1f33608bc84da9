"""Meta-learned loss threshold: DDTAS's Online Threshold Generator (OTG) in the form the paper
describes (Jiang et al., "Dual Dynamic Threshold Adjustment Strategy", ACM TOMM 2024; spec
``docs/papers/ddtas.md`` §2.1 and §2.3, ``threshold`` mode).

One step (``granularity="scalar"``: one lambda; ``"pos_neg"``: (lambda_pos, lambda_neg);
``"per_anchor"``: one lambda, differentiated as one copy per anchor, see :class:`MetaThreshold`):

1. embed the train batch with the live parameters (``torch.func.functional_call``), S = E E^T;
2. mine once; the selection is reused by every loss below;
3. ``L_t(theta, lambda) = loss(S, selection, lambda)`` with a differentiable lambda and one virtual
   SGD step ``theta' = theta - eta * grad_theta L_t``;
4. embed the meta batch with theta', ``L_m = loss(S_m, all pairs, lambda_0)`` (fixed
   ``meta_threshold``, no mining);
5. ``g = dL_m/dlambda`` (averaged over DDP ranks), then a normalised step
   ``lambda <- clamp(lambda - lr * step(g), min, max)`` (Adam moments or sign);
6. return the real loss ``loss(S, selection, lambda_new)`` on the step-1 similarities (same values
   and graph as a fresh forward with theta), which the module back-propagates.

``mode="exact"`` gives the exact derivative of step 5 (second order in the backbone), either by the
identity ``g = -eta (d/dlambda dL_t/dS)^T (J_S v')``, ``v' = grad_theta L_m(theta')``, evaluated
with one backward (scalar lambda) or one forward-mode pass (pos_neg, per_anchor) over the train batch
(``exact_impl="identity"``, default), or by back-propagating through the virtual step
(``exact_impl="double_backward"``). ``mode="jvp"`` is first order in eta: the same formula with
``v = grad_theta L_m(theta)``, so no virtual step is taken at all; there the meta batch is processed
first and, with ``jvp_reuse_forward=True``, the forward-mode pass over the train batch *is* the real
forward of step 1 (one forward fewer, more activation memory). See
:mod:`ddtas_lightning.policies.virtual_step`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ddtas_lightning.config.validation import as_int, check_choice
from ddtas_lightning.losses.base import MetricLoss
from ddtas_lightning.miners.base import BaseMiner
from ddtas_lightning.policies.base import (
    StepBatch,
    StepOutput,
    ThresholdPolicy,
    embed_and_mine,
    global_embeddings,
    global_similarities_with_tangent,
    similarities,
)
from ddtas_lightning.policies.virtual_step import (
    META_OBJECTIVES,
    META_PARAMS,
    FunctionalModel,
    MetaGradient,
    all_pairs_meta_loss,
    all_reduce_mean,
    cotangent_meta_gradient,
    exact_meta_gradient,
    loss_and_gradient,
    select_parameters,
    tangent_meta_gradient,
    virtual_sgd_step,
)
from ddtas_lightning.runtime.distributed import is_distributed

GRANULARITIES = ("scalar", "pos_neg", "per_anchor")
MODES = ("exact", "jvp")
STEP_RULES = ("adam", "sign")
EXACT_IMPLS = ("identity", "double_backward")


class MetaThreshold(ThresholdPolicy):
    """Learns the loss threshold lambda online by one-step look-ahead meta-learning (DDTAS OTG).

    init: initial lambda (float, or ``[pos, neg]`` with ``pos_neg``); ``None`` takes the loss's own
        ``threshold`` at the first step.
    granularity: ``"scalar"`` (one lambda, 0-d), ``"pos_neg"`` ((2,) = (lambda_pos, lambda_neg)) or
        ``"per_anchor"``: the persistent state is still ONE 0-d lambda (checkpointed as for scalar),
        but the meta gradient is taken w.r.t. a B-vector ``lambda_v`` (one threshold per anchor row of
        the global train batch, every entry = lambda; the loss takes it as a (B, 1) column), by the
        same machinery in both modes (``exact`` identity: one forward-mode pass, as pos_neg). The
        real loss of the step uses ``lambda_i* = clamp(lambda - step_i, min, max)`` with ``step_i``
        the step rule applied to ``g_i = dL_meta/dlambda_i`` (below); lambda itself then moves
        exactly as the scalar granularity would, with ``G = sum_i g_i``, which *is* the scalar
        lambda's meta gradient (chain rule: ``lambda_v = lambda 1_B``): from the same state and batch,
        lambda's update is the scalar one; only the step's own loss differs (so, through theta, later
        steps do). The per-anchor thresholds are not stored: a batch position has no identity across
        steps.
        Per-anchor step: ``sign``: ``lr * sign(g_i)``. ``adam``: the moments belong to the scalar G
        (they drive lambda, as for scalar), and ``step_i = lr * (B g_i / inner_lr) / (sqrt(v_hat) +
        eps)`` with this step's bias-corrected ``v_hat``: no momentum per anchor (positions do not
        persist), scaled by B so that the mean step is ``lr * (G / inner_lr) / (sqrt(v_hat) + eps)``,
        the scalar's RMS-normalised step (``~lr``, like sign's ``|step_i| = lr``; equal g_i on the
        first step give the scalar's first step, up to rounding). A single anchor can then move up
        to ~B lr: the clamp bounds it. A step whose update is skipped uses lambda for every anchor.
        ``last_anchor_grad`` / ``last_anchor_thresholds`` keep the (B,) g and lambda* of the last
        meta step (attributes for inspection, not state).
    mode: ``"exact"`` (the exact derivative through the virtual step, second order) or ``"jvp"``
        (first order in eta: no virtual step, one forward-mode pass; cheapest).
    inner_lr: eta of the virtual SGD step (1e-5: the papers' learning rate).
    lr: step size of lambda per update (the step is normalised, so this is ~ the change per step).
    step_rule: ``"adam"`` (bias-corrected moments of ``g / inner_lr``; the division makes ``eps``
        independent of eta, since g is O(eta)) or ``"sign"`` (``lr * sign(g)``).
    betas, eps: Adam's moment decays and denominator guard.
    min, max: lambda is clamped to [min, max] after every update (and must start inside).
    meta_threshold: the fixed lambda_0 of the meta loss (float or ``[pos, neg]``); ``None`` = the
        initial lambda.
    meta_objective: ``loss`` (the papers': the loss on all meta pairs at lambda_0) | ``smooth_ap`` |
        ``nca`` (lambda-free retrieval objectives, ``losses/retrieval_objectives.py``);
        meta_temperature: their temperature (None: their default).
    meta_params: ``all`` (the papers) | ``head``: the virtual step over the embedding head ``head.*``
        only (the backbone held fixed in it; cheaper).
    jvp_reuse_forward: ``mode="jvp"`` only: the forward-mode pass over the train batch doubles as the
        real forward (one backbone forward fewer, more memory); ``False``: a separate graph-free pass.
    exact_impl: ``mode="exact"`` only, two computations of the same exact derivative:
        ``"identity"``: theta' from a plain gradient, ``v' = grad L_m(theta')``, then the identity
        ``dL_m/dlambda = -eta (d/dlambda dL_t/dS)^T (J_S v')``, evaluated with one more backward
        through the train graph (scalar) or one forward-mode pass (pos_neg, per_anchor): no double
        backward, less time and memory; ``"double_backward"``: ``create_graph`` through the virtual
        step (the literal form; the reference).
    every: amortisation: the meta gradient (and lambda update) only on steps whose
        ``batch.global_step`` is a multiple of ``every``; in between lambda is held and the step is a
        static one at the current lambda (embed, mine, loss: a static step's cost), logged with
        ``meta/held`` = 1. ``every=1`` (default): every step is a meta step, as in the paper. The
        schedule follows the optimiser's step count, which checkpoints restore, so a run resumed
        mid-period holds and updates exactly where the uninterrupted run would.

    theta = the model's trainable parameters (``requires_grad``); a loss with parameters of its own
    would be outside the virtual step (none of the current losses has any). The threshold learns only
    with losses that are smooth in S (MS, soft contrastive, binomial): for hinge forms (contrastive,
    triplet) ``d/dlambda dL/dS = 0`` almost everywhere, the meta gradient is exactly 0 and every
    update is skipped.
    BatchNorm: only the real forward of the train batch updates running statistics (once, as in a
    static step); the meta-batch, virtual and tangent passes run on throw-away copies of the buffers,
    so with BN in train mode they normalise with their own batch statistics and write nothing back.
    The papers freeze BN (``backbone.freeze_bn=true``): then every pass uses the running statistics.
    DDP: the lambda gradient is averaged over ranks before the update, so every rank holds the same
    lambda and Adam state.

    State (buffers, so checkpoints carry them): ``lam``, ``meta_lam``, ``exp_avg``, ``exp_avg_sq``,
    ``step_count`` (Adam), ``initialized``. ``step`` skips the update (and logs ``meta/skipped``)
    when the averaged meta gradient is non-finite or exactly zero (e.g. no meta pair).
    Logs: ``train/lambda`` (``train/lambda_pos``, ``train/lambda_neg``), ``meta/loss``,
    ``meta/grad_lambda`` (``_pos``, ``_neg``): the raw dL_meta/dlambda (per_anchor: G), ``meta/skipped``;
    per_anchor meta steps also ``train/lambda_anchor_mean`` / ``_min`` / ``_max`` (of the lambda_i*).
    """

    needs_meta_batch = True

    def __init__(
        self,
        init: float | Sequence[float] | None = None,
        granularity: str = "scalar",
        mode: str = "exact",
        inner_lr: float = 1e-5,
        lr: float = 1e-3,
        step_rule: str = "adam",
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        min: float = 0.3,  # noqa: A002 - config key
        max: float = 0.9,  # noqa: A002 - config key
        meta_threshold: float | Sequence[float] | None = None,
        jvp_reuse_forward: bool = True,
        exact_impl: str = "identity",
        every: int = 1,
        meta_objective: str = "loss",
        meta_temperature: float | None = None,
        meta_params: str = "all",
    ) -> None:
        super().__init__()
        check_choice("threshold_policy.granularity", granularity, GRANULARITIES)
        check_choice("threshold_policy.mode", mode, MODES)
        check_choice("threshold_policy.step_rule", step_rule, STEP_RULES)
        check_choice("threshold_policy.exact_impl", exact_impl, EXACT_IMPLS)
        if not float(min) <= float(max):
            raise ValueError(f"threshold_policy.min ({min}) must be <= threshold_policy.max ({max})")
        if inner_lr <= 0 or lr < 0:
            raise ValueError(f"threshold_policy.inner_lr must be > 0 and lr >= 0, got {inner_lr}, {lr}")
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"threshold_policy.betas must be two numbers in [0, 1), got {betas}")
        self.granularity, self.mode, self.step_rule = granularity, mode, step_rule
        self.inner_lr, self.lr, self.betas, self.eps = float(inner_lr), float(lr), betas, float(eps)
        self.min, self.max = float(min), float(max)
        self.jvp_reuse_forward = bool(jvp_reuse_forward)
        self.exact_impl = exact_impl
        self.every = as_int("threshold_policy.every", every, minimum=1)
        check_choice("threshold_policy.meta_objective", meta_objective, META_OBJECTIVES)
        self.meta_objective, self.meta_temperature = meta_objective, meta_temperature
        check_choice("threshold_policy.meta_params", meta_params, META_PARAMS)
        self.meta_params = meta_params
        shape = (2,) if granularity == "pos_neg" else ()  # per_anchor: one lambda too
        self.register_buffer("lam", torch.zeros(shape))
        self.register_buffer("meta_lam", torch.zeros(shape))
        self.register_buffer("exp_avg", torch.zeros(shape))
        self.register_buffer("exp_avg_sq", torch.zeros(shape))
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._meta_threshold = meta_threshold
        self.last_anchor_grad: Tensor | None = None  # per_anchor: the last meta step's g and lambda*
        self.last_anchor_thresholds: Tensor | None = None
        # Python-side cache of `initialized` (avoids a host sync per step); re-read after loading.
        self._known_initialized = False
        self.register_load_state_dict_post_hook(_forget_initialized)
        if init is not None:
            self._initialize(init)

    # ---- state -----------------------------------------------------------------------------------
    def _as_lambda(self, value: float | Sequence[float] | Tensor, what: str) -> Tensor:
        if isinstance(value, Tensor):
            t = value.detach().to("cpu", torch.float64)
        elif isinstance(value, int | float):
            t = torch.tensor(float(value), dtype=torch.float64)
        else:  # a list / tuple / OmegaConf ListConfig
            t = torch.tensor([float(v) for v in value], dtype=torch.float64)
        if t.ndim == 0 and self.granularity == "pos_neg":
            t = t.expand(2)
        expected = tuple(self.lam.shape)
        if tuple(t.shape) != expected:
            raise ValueError(
                f"threshold_policy.{what} must be a number{' or [pos, neg]' if expected else ''} "
                f"for granularity={self.granularity!r}, got {value!r}"
            )
        return t

    @torch.no_grad()
    def _initialize(self, init: float | Sequence[float] | Tensor) -> None:
        lam = self._as_lambda(init, "init")
        if bool((lam < self.min).any() or (lam > self.max).any()):
            raise ValueError(
                f"initial lambda {lam.tolist()} lies outside [threshold_policy.min, threshold_policy.max]"
                f" = [{self.min}, {self.max}]; set init or the bounds"
            )
        meta = lam if self._meta_threshold is None else self._as_lambda(self._meta_threshold, "meta_threshold")
        self.lam.copy_(lam)
        self.meta_lam.copy_(meta)
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        self.step_count.zero_()
        self.initialized.fill_(True)
        self._known_initialized = True

    def current_threshold(self) -> Tensor | None:
        return self.lam.detach().clone() if bool(self.initialized) else None

    @torch.no_grad()
    def update(self, grad: Tensor) -> Tensor:
        """One normalised, clamped step of lambda along ``-grad`` (``grad`` = dL_meta/dlambda, already
        averaged over ranks). Skipped when ``grad`` is non-finite or exactly zero; returns whether it
        was applied (0-d bool). Branch-free: no host synchronisation."""
        grad = grad.to(self.lam.dtype)
        applied = torch.isfinite(grad).all() & (grad != 0).any()
        grad = torch.where(applied, grad, torch.zeros_like(grad))
        if self.step_rule == "sign":
            direction = torch.sign(grad)
        else:
            g = grad / self.inner_lr  # O(1): the meta gradient itself is O(eta)
            b1, b2 = self.betas
            self.step_count += applied.long()
            t = self.step_count.to(self.lam.dtype).clamp(min=1)
            self.exp_avg.copy_(torch.where(applied, b1 * self.exp_avg + (1 - b1) * g, self.exp_avg))
            self.exp_avg_sq.copy_(torch.where(applied, b2 * self.exp_avg_sq + (1 - b2) * g * g, self.exp_avg_sq))
            m_hat = self.exp_avg / (1 - b1**t)
            v_hat = self.exp_avg_sq / (1 - b2**t)
            direction = torch.where(applied, m_hat / (v_hat.sqrt() + self.eps), torch.zeros_like(g))
        self.lam.sub_(self.lr * direction).clamp_(self.min, self.max)
        return applied

    @torch.no_grad()
    def anchor_thresholds(self, lam: Tensor, grad: Tensor, applied: Tensor) -> Tensor:
        """per_anchor: ``lambda_i* = clamp(lam - step_i, min, max)`` for the (B,) ``grad`` = g_i, with
        the step rule's state as :meth:`update` (called first, with G = sum g) left it; see the class
        docstring. ``lam``: lambda before that update. Not ``applied``: lambda for every anchor."""
        grad = grad.to(self.lam.dtype)
        grad = torch.where(applied, grad, torch.zeros_like(grad))
        if self.step_rule == "sign":
            step = self.lr * torch.sign(grad)
        else:  # no per-anchor moments; this step's second moment of G sets the scale
            t = self.step_count.to(self.lam.dtype).clamp(min=1)
            v_hat = self.exp_avg_sq / (1 - self.betas[1] ** t)
            step = self.lr * (grad.numel() * grad / self.inner_lr) / (v_hat.sqrt() + self.eps)
        return (lam - step).clamp(self.min, self.max)

    def _lambda_leaf(self, dtype: torch.dtype, rows: int = 0) -> Tensor:
        """A differentiable copy of lambda (never an alias of the buffer, which is updated in place);
        per_anchor: ``rows`` copies, one per anchor (``repeat`` allocates)."""
        lam = self.lam.detach().to(dtype, copy=True)
        return (lam.repeat(rows) if self.granularity == "per_anchor" else lam).requires_grad_(True)

    def _loss_threshold(self, lam: Tensor) -> Tensor:
        """lambda as the loss takes it: per_anchor's (B,) vector as a (B, 1) column (a (2,) vector
        would read as (pos, neg) for a 2-row batch)."""
        return lam.unsqueeze(1) if lam.ndim == 1 and self.granularity == "per_anchor" else lam

    # ---- the step --------------------------------------------------------------------------------
    def step(self, model: nn.Module, loss_fn: MetricLoss, miner: BaseMiner, batch: StepBatch) -> StepOutput:
        if batch.meta_images is None or batch.meta_labels is None:
            raise ValueError(
                "threshold_policy=meta needs a meta batch (StepBatch.meta_images / meta_labels); "
                "the data module provides it when policy.needs_meta_batch is True"
            )
        if not self._known_initialized:
            if not bool(self.initialized):
                self._initialize(loss_fn.threshold)
            self._known_initialized = True
        if self.every > 1 and batch.global_step % self.every:
            return self._held_step(loss_fn, miner, model, batch)
        fm = FunctionalModel(model, select_parameters(model, self.meta_params))

        meta_loss_fn = all_pairs_meta_loss(fm, loss_fn, batch.meta_images, batch.meta_labels, self.meta_lam,
                                           self.meta_objective, self.meta_temperature)

        def head(s: Tensor, lam: Tensor) -> Tensor:  # the train loss on the fixed selection
            return loss_fn(s, selection, threshold=self._loss_threshold(lam))

        if self.mode == "exact":
            sim = similarities(global_embeddings(fm(batch.images)))  # the real forward: updates BN stats
            selection = miner(sim, batch.labels, epoch=batch.epoch, generator=batch.generator)
            lam_v = self._lambda_leaf(sim.dtype, sim.shape[0])
            train_loss = head(sim, lam_v)
            if self.exact_impl == "double_backward":
                if is_distributed():
                    raise ValueError(
                        "threshold_policy.exact_impl=double_backward is single-process only; "
                        "use exact_impl=identity (the same derivative) under DDP"
                    )
                meta = exact_meta_gradient(train_loss, lam_v, meta_loss_fn, fm.params, self.inner_lr)
            else:  # the exact identity with v' = grad L_meta(theta')
                virtual = virtual_sgd_step(train_loss, fm.params, self.inner_lr, create_graph=False)
                meta_loss, v_prime = loss_and_gradient(meta_loss_fn, virtual)
                del virtual
                if lam_v.numel() == 1:  # one backward through the retained train graph
                    grad = cotangent_meta_gradient(head, sim, lam_v, v_prime, fm.params, self.inner_lr)
                else:  # one forward-mode pass for both components
                    emb, emb_dot = fm.forward_with_tangent(
                        batch.images, v_prime, update_buffers=False, keep_graph=False
                    )
                    _, sim_dot = global_similarities_with_tangent(emb, emb_dot)
                    grad = tangent_meta_gradient(head, sim, sim_dot, lam_v, self.inner_lr)
                meta = MetaGradient(grad, meta_loss)
            del train_loss
        else:  # first order: v = grad L_meta(theta), no virtual step
            meta_loss, v = loss_and_gradient(meta_loss_fn, fm.params)
            if self.jvp_reuse_forward:  # the forward-mode pass is the real forward
                sim, sim_dot = global_similarities_with_tangent(*fm.forward_with_tangent(batch.images, v))
            else:
                sim = similarities(global_embeddings(fm(batch.images)))
                emb, emb_dot = fm.forward_with_tangent(batch.images, v, update_buffers=False, keep_graph=False)
                _, sim_dot = global_similarities_with_tangent(emb, emb_dot)
            selection = miner(sim, batch.labels, epoch=batch.epoch, generator=batch.generator)
            lam_v = self._lambda_leaf(sim.dtype, sim.shape[0])
            meta = MetaGradient(tangent_meta_gradient(head, sim, sim_dot, lam_v, self.inner_lr), meta_loss)

        grad = all_reduce_mean(meta.grad)
        anchor_grad = anchor_lam = None
        if self.granularity == "per_anchor":
            anchor_grad, lam_before = grad, self.lam.detach().clone()
            grad = anchor_grad.sum()  # = the scalar lambda's meta gradient, so lambda moves as for scalar
        applied = self.update(grad)
        threshold = self.lam.detach()
        if anchor_grad is not None:  # this step's loss: one threshold per anchor
            threshold = anchor_lam = self.anchor_thresholds(lam_before, anchor_grad, applied)
            self.last_anchor_grad, self.last_anchor_thresholds = anchor_grad.detach(), anchor_lam
        loss = loss_fn(sim, selection, threshold=self._loss_threshold(threshold.to(sim.dtype)))
        logs = self._logs(meta.meta_loss, grad, applied, anchor_lam)
        return StepOutput(loss=loss, selection=selection, logs=logs)

    def _held_step(self, loss_fn: MetricLoss, miner: BaseMiner, model: nn.Module, batch: StepBatch) -> StepOutput:
        """A step between two meta steps (``every > 1``): a static step at the held lambda."""
        sim, selection = embed_and_mine(model, miner, batch)
        loss = loss_fn(sim, selection, threshold=self.lam.detach().to(sim.dtype))
        lam = self.lam.detach()
        logs = {"meta/held": torch.ones((), device=lam.device)}
        if self.granularity != "pos_neg":  # per_anchor: every anchor at lambda
            logs["train/lambda"] = lam.clone()
        else:
            logs.update({"train/lambda_pos": lam[0].clone(), "train/lambda_neg": lam[1].clone()})
        return StepOutput(loss=loss, selection=selection, logs=logs)

    def _logs(self, meta_loss: Tensor, grad: Tensor, applied: Tensor,
              anchor_lam: Tensor | None = None) -> dict[str, Tensor]:
        lam, grad = self.lam.detach(), grad.detach()
        logs = {"meta/loss": meta_loss.detach(), "meta/skipped": (~applied).float()}
        if self.every > 1:
            logs["meta/held"] = torch.zeros((), device=lam.device)
        if anchor_lam is not None:  # per_anchor: the thresholds this step's loss used
            logs.update({"train/lambda_anchor_mean": anchor_lam.mean(), "train/lambda_anchor_min": anchor_lam.min(),
                         "train/lambda_anchor_max": anchor_lam.max()})
        if self.granularity != "pos_neg":
            logs["train/lambda"] = lam.clone()
            logs["meta/grad_lambda"] = grad
        else:
            logs.update({
                "train/lambda_pos": lam[0].clone(), "train/lambda_neg": lam[1].clone(),
                "meta/grad_lambda_pos": grad[0], "meta/grad_lambda_neg": grad[1],
            })
        return logs

    def extra_repr(self) -> str:
        return (
            f"granularity={self.granularity}, mode={self.mode}, inner_lr={self.inner_lr}, lr={self.lr}, "
            f"step_rule={self.step_rule}, min={self.min}, max={self.max}, every={self.every}"
        )


def _forget_initialized(module: MetaThreshold, incompatible_keys) -> None:
    module._known_initialized = False
