"""Long-horizon hypergradient of the loss threshold lambda (forward mode, Franceschi et al. 2017).

Notation as in :mod:`ddtas_lightning.policies.virtual_step`. The real training trajectory
``theta_{t+1} = theta_t - U_t(g_t)``, ``g_t = grad_theta L_t(theta_t, lambda)``, depends on lambda through
every step taken so far. Forward mode carries the tangent ``Z_t = d theta_t / d lambda`` (one
parameter-sized tensor per component of lambda) along the *real* optimiser updates:

    gdot_t  = H_t Z_t + d g_t / d lambda          (one forward-over-reverse pass per step:
                                                   ``torch.func.jvp`` over ``torch.func.grad``)
    Z_{t+1} = Z'_t - dU_t/dg . (gdot_t [+ weight-decay term]),  Z'_t = mu Z_t, gdot_t taken along Z'_t

and the hypergradient of the meta loss is ``dL_m(theta_t)/dlambda = grad_theta L_m(theta_t) . Z_t``
(plus the direct term ``dL_m/dlambda``, which is zero for the fixed-lambda_0 meta loss used here).

Optimisers (read from the real optimiser's ``param_groups`` and ``state`` after its step, through the
:meth:`HypergradThreshold.after_optimizer_step` hook the module calls):

* ``torch.optim.SGD`` (momentum, nesterov, L2 weight decay; dampening 0): the update is linear in g,
  the tangent is **exact** (the momentum buffer carries its own tangent ``B = d buf / d lambda``).
* ``torch.optim.Adam`` / ``AdamW`` (L2 or decoupled weight decay; no amsgrad): **exact** too: both
  moments carry their tangents (``M = d m / d lambda``, ``V = d v / d lambda = b2 V + 2 (1 - b2) g gdot``)
  and the update ``lr m_hat / (sqrt(v_hat) + eps)`` is differentiated in full. (Holding the
  preconditioner fixed instead, the common shortcut, was measured 15x too large on the 4-step test
  problem: in its first steps Adam is close to sign descent, whose output hardly depends on g's size.)
* ``torch.optim.RMSprop`` (not centered; momentum allowed): approximate: ``square_avg`` is held fixed
  (d square_avg / d lambda := 0), i.e. the preconditioner of each step is treated as a constant.

``decay`` (mu < 1) forgets old influence geometrically; ``truncate`` = N resets Z (and the optimiser
tangents) to zero every N steps (after that step's
hypergradient: each hypergradient sees the last 1..N steps). ``mu = 1``, no truncation: the full-horizon hypergradient.
``meta_params``: ``all`` (every trainable parameter) or ``head`` (the embedding head ``head.*`` only:
the tangent and the Hessian block are restricted to it; the backbone counts as constant w.r.t. lambda).

State (buffers, float32 whatever the trainer's precision; the tangents float64 for a float64 model): lambda and its step-rule state (as
:class:`MetaThreshold`), ``tangent`` (C x N, N = number of tracked parameter entries, C = components of
lambda), ``opt_tangent`` and ``opt_tangent_sq`` (the optimiser moments' tangents, same shape). All start empty and take their
shape at the first step (declared in ``variable_shape_state`` for the checkpoint check).
Single process only (the tangent is not reduced across ranks). Pure torch: no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ddtas_lightning.config.validation import ConfigError, check_choice
from ddtas_lightning.losses.base import MetricLoss
from ddtas_lightning.miners.base import BaseMiner
from ddtas_lightning.miners.selection import PairSelection
from ddtas_lightning.miners.soft_asms import soft_asms_weights
from ddtas_lightning.policies.base import StepBatch, StepOutput, similarities
from ddtas_lightning.policies.meta import MetaThreshold
from ddtas_lightning.policies.virtual_step import (
    FunctionalModel,
    Params,
    all_pairs_meta_loss,
    gradient_and_tangent,
    loss_and_gradient,
    select_parameters,
)
from ddtas_lightning.runtime.distributed import is_distributed

LR_SCHEDULES = ("constant", "run_length")


class HypergradThreshold(MetaThreshold):
    """lambda learned from the forward-mode hypergradient of the whole training run so far.

    Per step: (1) ``h = grad_theta L_m(theta_t) . Z_t`` on the meta batch (all pairs, fixed lambda_0);
    (2) lambda updated with ``h`` by the step rule of :class:`MetaThreshold` (``adam``: normalised, ~lr
    per step; ``sign``) and clamped; (3) the real forward, mining and loss at the new lambda; (4) one
    forward-over-reverse pass for ``gdot_t``; (5) after the module's optimiser step,
    :meth:`after_optimizer_step` advances Z with that optimiser's update rule. A step whose update is
    skipped (non-finite, MMSI-style skip) leaves Z unchanged (the hook is not called).

    decay: mu in (0, 1] (Z <- mu Z at every step). truncate: reset Z every this many steps (None: never).
    meta_params: ``all`` | ``head``.
    lr_schedule: ``constant`` (``lr`` per step, as ``meta``) | ``run_length`` (see :meth:`step_size`:
    ``travel`` x the width of [min, max] spread over the run, cosine-annealed; ``lr`` unused).
    learn_margin: also learn the ASMS margin m (start ``margin``, clamped to [margin_min, margin_max])
    from its own hypergradient: the configured miner is replaced by the soft ASMS relaxation
    (miners/soft_asms.py, ``margin_temperature``; smooth in S too, so the tangent is exact) whose
    weights multiply the pairs inside the loss (MS / binomial: inside the exponentials). Logs ``train/margin``, ``meta/grad_margin``.
    Other arguments: as :class:`MetaThreshold` (``init``,
    ``granularity`` scalar | pos_neg, ``lr``, ``step_rule``, ``betas``, ``eps``, ``min``, ``max``,
    ``meta_threshold``, ``meta_objective`` loss | smooth_ap | nca, ``meta_temperature``).
    Logs: those of :class:`MetaThreshold` (``meta/grad_lambda`` is the hypergradient h) and
    ``meta/tangent_norm`` (||Z||, all components).
    """

    variable_shape_state = frozenset({"tangent", "opt_tangent", "opt_tangent_sq"})

    def __init__(
        self,
        init: float | Sequence[float] | None = None,
        granularity: str = "scalar",
        lr: float = 1e-3,
        step_rule: str = "adam",
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-12,
        min: float = 0.3,  # noqa: A002 - config key
        max: float = 0.9,  # noqa: A002 - config key
        meta_threshold: float | Sequence[float] | None = None,
        decay: float = 1.0,
        truncate: int | None = None,
        meta_params: str = "all",
        meta_objective: str = "loss",
        meta_temperature: float | None = None,
        lr_schedule: str = "constant",
        travel: float = 2.0,
        learn_margin: bool = False,
        margin: float = 0.1,
        margin_temperature: float = 0.01,
        margin_min: float = 0.0,
        margin_max: float = 0.5,
    ) -> None:
        if granularity not in ("scalar", "pos_neg"):  # before meta's check, which also allows per_anchor
            raise ConfigError(
                f"threshold_policy.granularity must be one of ('scalar', 'pos_neg') for "
                f"threshold_policy=hypergrad, got {granularity!r} (per_anchor is threshold_policy=meta's "
                "only: the hypergradient carries the tangent d theta / d lambda across steps, and a "
                "threshold per batch position has no meaning across steps, every batch has other anchors)"
            )
        # inner_lr=1: the Adam rule's normalisation of the gradient by the virtual step size does not
        # apply (there is no virtual step); the hypergradient is used as it is.
        super().__init__(init=init, granularity=granularity, mode="jvp", inner_lr=1.0, lr=lr,
                         step_rule=step_rule, betas=betas, eps=eps, min=min, max=max,
                         meta_threshold=meta_threshold, meta_objective=meta_objective,
                         meta_temperature=meta_temperature, meta_params=meta_params)
        if not 0.0 < float(decay) <= 1.0:
            raise ConfigError(f"threshold_policy.decay must be in (0, 1], got {decay}")
        if truncate is not None and int(truncate) < 1:
            raise ConfigError(f"threshold_policy.truncate must be a positive number of steps or null, got {truncate}")
        check_choice("threshold_policy.lr_schedule", lr_schedule, LR_SCHEDULES)
        if not float(travel) > 0:
            raise ConfigError(f"threshold_policy.travel must be > 0, got {travel}")
        self.lr_schedule, self.travel, self.total_steps = lr_schedule, float(travel), None
        self.decay, self.truncate = float(decay), truncate and int(truncate)
        self.register_buffer("tangent", torch.zeros(0, 0, dtype=torch.float32))
        self.register_buffer("opt_tangent", torch.zeros(0, 0, dtype=torch.float32))
        self.register_buffer("opt_tangent_sq", torch.zeros(0, 0, dtype=torch.float32))
        self.register_buffer("tangent_steps", torch.zeros((), dtype=torch.long))
        # learned ASMS margin m (soft ASMS, miners/soft_asms.py) and its Adam moments
        self.learn_margin, self.margin_temperature = bool(learn_margin), float(margin_temperature)
        self.margin_min, self.margin_max = float(margin_min), float(margin_max)
        if not self.margin_min <= float(margin) <= self.margin_max or not self.margin_temperature > 0:
            raise ConfigError(f"threshold_policy.margin={margin} must lie in [margin_min, margin_max] = "
                              f"[{margin_min}, {margin_max}] and margin_temperature={margin_temperature} be > 0")
        self.register_buffer("margin", torch.tensor(float(margin), dtype=torch.float32))
        self.register_buffer("margin_moments", torch.zeros(2, dtype=torch.float32))
        self._pending: tuple[Params, Params, Params, list[Params]] | None = None

    # ---- the step size ---------------------------------------------------------------------------
    def set_run_length(self, total_steps: int) -> None:
        self.total_steps = int(total_steps) if total_steps and total_steps > 0 else None

    def step_size(self) -> float:
        """lr (``constant``) or, with ``run_length``, ``travel * (max - min) / T * (1 + cos(pi t / T))``
        at optimiser step t of a run of T steps: the summed step sizes are ``travel`` times the width of
        [min, max] whatever the run length, large first and annealed to 0 at the end (no step size to
        tune per run length). Before the run length is known (a policy used outside the module): lr."""
        if self.lr_schedule == "constant" or not self.total_steps:
            return self.lr
        t = min(int(self.tangent_steps), self.total_steps)
        return self.travel * (self.max - self.min) / self.total_steps * (1 + math.cos(math.pi * t / self.total_steps))

    @torch.no_grad()
    def update(self, grad: Tensor) -> Tensor:
        lr, self.lr = self.lr, self.step_size()
        try:
            return super().update(grad)
        finally:
            self.lr = lr

    # ---- tangent storage -------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in self.variable_shape_state:  # take the checkpoint's shape (filled during training)
            value = state_dict.get(prefix + name)
            if value is not None:
                dtype = torch.promote_types(torch.float32, value.dtype)
                setattr(self, name, torch.zeros(value.shape, dtype=dtype, device=self.lam.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _components(self) -> int:
        return self.lam.numel() + int(self.learn_margin)

    @torch.no_grad()
    def _update_margin(self, grad: Tensor) -> None:
        """Adam-normalised, clamped step of m along -grad, with the lambda step size scaled to the
        width of [margin_min, margin_max] (the same relative travel)."""
        grad = grad.to(self.margin.dtype)
        if not bool(torch.isfinite(grad)) or float(grad) == 0.0:
            return
        b1, b2 = self.betas
        t = float(self.tangent_steps) + 1
        self.margin_moments[0].mul_(b1).add_((1 - b1) * grad)
        self.margin_moments[1].mul_(b2).add_((1 - b2) * grad * grad)
        direction = (self.margin_moments[0] / (1 - b1**t)) / ((self.margin_moments[1] / (1 - b2**t)).sqrt() + self.eps)
        size = self.step_size() * (self.margin_max - self.margin_min) / max(self.max - self.min, 1e-12)
        self.margin.sub_(size * direction).clamp_(self.margin_min, self.margin_max)

    def _ensure_tangent(self, params: Params) -> None:
        n = sum(p.numel() for p in params.values())
        shape = (self._components(), n)
        if tuple(self.tangent.shape) == shape:
            return
        if self.tangent.numel() != 0:
            raise ValueError(
                f"threshold_policy=hypergrad: the tangent holds {self.tangent.shape[1]} parameter entries, "
                f"the model's tracked parameters have {n} (another model or meta_params?)"
            )
        first = next(iter(params.values()))
        # float32, or float64 for a float64 model (the exactness tests); never lower than float32
        dtype = torch.promote_types(torch.float32, first.dtype)
        self.tangent = torch.zeros(shape, dtype=dtype, device=first.device)
        self.opt_tangent = torch.zeros(shape, dtype=dtype, device=first.device)
        self.opt_tangent_sq = torch.zeros(shape, dtype=dtype, device=first.device)

    @staticmethod
    def _views(flat: Tensor, params: Params) -> list[Params]:
        """Per component, parameter-shaped views into the flat (C x N) store."""
        sizes = [p.numel() for p in params.values()]
        return [
            {n: chunk.view(p.shape) for (n, p), chunk in zip(params.items(), row.split(sizes))}
            for row in flat
        ]

    @torch.no_grad()
    def reset_tangent(self) -> None:
        self.tangent.zero_()
        self.opt_tangent.zero_()
        self.opt_tangent_sq.zero_()

    # ---- the step --------------------------------------------------------------------------------
    def step(self, model: nn.Module, loss_fn: MetricLoss, miner: BaseMiner, batch: StepBatch) -> StepOutput:
        if batch.meta_images is None or batch.meta_labels is None:
            raise ValueError("threshold_policy=hypergrad needs a meta batch (StepBatch.meta_images / meta_labels)")
        if is_distributed():
            raise ConfigError("threshold_policy=hypergrad is single-process only (the tangent is not "
                              "reduced across ranks); use threshold_policy=meta under DDP")
        if not self._known_initialized:
            if not bool(self.initialized):
                self._initialize(loss_fn.threshold)
            self._known_initialized = True
        fm = FunctionalModel(model, select_parameters(model, self.meta_params))
        self._ensure_tangent(fm.params)
        z = self._views(self.tangent, fm.params)

        # (1) hypergradient at theta_t (no direct term: the meta loss reads the fixed lambda_0, or no
        # lambda at all with meta_objective=smooth_ap | nca)
        meta_loss_fn = all_pairs_meta_loss(fm, loss_fn, batch.meta_images, batch.meta_labels, self.meta_lam,
                                           self.meta_objective, self.meta_temperature)
        meta_loss, v = loss_and_gradient(meta_loss_fn, fm.params)
        hyper_all = torch.stack([sum((v[n].to(zc[n].dtype) * zc[n]).sum() for n in fm.params) for zc in z])
        n_lam = self.lam.numel()
        hyper = hyper_all[:n_lam].reshape(self.lam.shape)
        # (2) the lambda (and margin) update
        applied = self.update(hyper)
        if self.learn_margin:
            self._update_margin(hyper_all[n_lam])
        steps = int(self.tangent_steps)
        if self.truncate and steps > 0 and steps % self.truncate == 0:  # window: the last <= N steps
            self.reset_tangent()
        elif self.decay != 1.0:  # forget: Z <- mu Z, before this step's tangent update
            self.tangent.mul_(self.decay)

        # (3) the real forward (updates BN statistics), mining and loss at the new lambda
        sim = similarities(fm(batch.images))
        lam = self.lam.detach().to(sim.dtype)
        control = lam.reshape(-1)
        if self.learn_margin:  # soft ASMS weights (differentiable in m) replace the configured miner
            selection = PairSelection.all_pairs(batch.labels)
            pos, neg = selection.pos_mask, selection.neg_mask
            control = torch.cat([control, self.margin.detach().to(sim.dtype).reshape(1)])

            def train_loss(s: Tensor, c: Tensor) -> Tensor:
                w_pos, w_neg = soft_asms_weights(s, pos, neg, c[n_lam], self.margin_temperature, detach_sim=False)
                return loss_fn(s, selection, threshold=c[:n_lam].reshape(lam.shape), weights=w_pos + w_neg)
        else:
            selection = miner(sim, batch.labels, epoch=batch.epoch, generator=batch.generator)

            def train_loss(s: Tensor, c: Tensor) -> Tensor:
                return loss_fn(s, selection, threshold=c.reshape(lam.shape))
        loss = train_loss(sim, control)

        # (4) gdot = H Z + dg/dc for each component c (lambda's, then m), on throw-away buffers
        def loss_of(params: Params, c: Tensor) -> Tensor:
            return train_loss(similarities(fm(batch.images, params, update_buffers=False)), c)

        gdots = []
        for c, zc in enumerate(z):
            e = torch.zeros(control.numel(), dtype=sim.dtype, device=sim.device)
            e[c] = 1
            g, gdot = gradient_and_tangent(loss_of, fm.params, control, zc, e)
            gdots.append(gdot)
        # theta_t and g_t as the optimiser sees them (Adam's second-moment tangent needs g_t + wd theta_t)
        before = {n: p.detach().clone() for n, p in fm.params.items()}
        self._pending = (dict(fm.params), before, g, gdots)

        logs = self._logs(meta_loss, hyper, applied)
        logs["meta/tangent_norm"] = self.tangent.norm().detach()
        if self.learn_margin:
            logs["train/margin"] = self.margin.detach().clone()
            logs["meta/grad_margin"] = hyper_all[n_lam].detach()
        return StepOutput(loss=loss, selection=selection, logs=logs)

    # ---- the tangent update along the real optimiser step ----------------------------------------
    @torch.no_grad()
    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Advance Z through the update the optimiser has just applied (its lr, momentum, Adam state)."""
        if self._pending is None:
            return
        params, before, grads, gdots = self._pending
        self._pending = None
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        z = self._views(self.tangent, params)
        b = self._views(self.opt_tangent, params)
        bsq = self._views(self.opt_tangent_sq, params)
        for name, p in params.items():
            group = groups.get(id(p))
            if group is None:  # not optimised: theta constant, its tangent stays
                continue
            state = optimizer.state.get(p, {})
            for c in range(len(z)):
                zc = z[c][name]
                _tangent_update(optimizer, group, state, zc, b[c][name], bsq[c][name],
                                gdots[c][name].to(zc.dtype), grads[name].to(zc.dtype), before[name].to(zc.dtype))
        self.tangent_steps += 1

    def extra_repr(self) -> str:
        return (f"granularity={self.granularity}, lr={self.lr}, step_rule={self.step_rule}, decay={self.decay}, "
                f"truncate={self.truncate}, meta_params={self.meta_params}, min={self.min}, max={self.max}")


def _tangent_update(optimizer: torch.optim.Optimizer, group: dict, state: dict, z: Tensor, b: Tensor,
                    bsq: Tensor, gdot: Tensor, grad: Tensor, theta: Tensor) -> None:
    """In place: ``z`` (d theta / d lambda), ``b`` (d first moment / d lambda) and ``bsq`` (d second
    moment / d lambda, Adam) of one parameter through one step of ``optimizer`` with the
    hyperparameters of ``group`` and the (post-step) ``state``; ``grad``, ``theta``: g_t and theta_t."""
    if group.get("maximize", False):
        raise ConfigError("threshold_policy=hypergrad: optimizer maximize=true is not supported")
    lr, wd = float(group["lr"]), float(group.get("weight_decay", 0.0))
    if isinstance(optimizer, torch.optim.SGD):
        if float(group.get("dampening", 0.0)) != 0.0:
            raise ConfigError("threshold_policy=hypergrad: SGD dampening must be 0")
        d = gdot + wd * z
        mom = float(group.get("momentum", 0.0))
        if mom != 0.0:
            b.mul_(mom).add_(d)  # buf_{t} = mom buf_{t-1} + d (buf_0 = d: b starts at 0)
            d = d + mom * b if group.get("nesterov", False) else b
        z.sub_(lr * d)
    elif isinstance(optimizer, torch.optim.Adam):  # AdamW is Adam with decoupled_weight_decay in torch 2.x
        if group.get("amsgrad", False):
            raise ConfigError("threshold_policy=hypergrad: Adam amsgrad=true is not supported")
        b1, b2 = (float(x) for x in group["betas"])
        decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
        if decoupled:
            z.mul_(1 - lr * wd)
            d = gdot
        else:
            d = gdot + wd * z
        t = float(state["step"])
        g = grad if decoupled else grad + wd * theta  # the gradient Adam's moments saw
        # u = lr m_hat / (sqrt(v_hat) + eps): du = lr/bc1 [M / den - m * dsqrt(v_hat) / den^2]
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        root = state["exp_avg_sq"].to(z.dtype).div(bc2).sqrt_()
        denom = root + float(group["eps"])
        b.mul_(b1).add_(d, alpha=1 - b1)
        bsq.mul_(b2).add_(2 * (1 - b2) * g * d)
        droot = torch.where(root > 0, bsq / (2 * bc2 * root.clamp(min=torch.finfo(root.dtype).tiny)),
                            torch.zeros_like(root))
        m = state["exp_avg"].to(z.dtype)
        z.sub_(lr / bc1 * (b / denom - m * droot / denom**2))
    elif isinstance(optimizer, torch.optim.RMSprop):
        if group.get("centered", False):
            raise ConfigError("threshold_policy=hypergrad: RMSprop centered=true is not supported")
        d = gdot + wd * z
        avg = state["square_avg"].to(z.dtype).sqrt().add_(float(group["eps"]))
        mom = float(group.get("momentum", 0.0))
        if mom > 0:
            b.mul_(mom).add_(d / avg)
            z.sub_(lr * b)
        else:
            z.sub_(lr * d / avg)
    else:
        raise ConfigError(
            f"threshold_policy=hypergrad: optimizer {type(optimizer).__name__} has no tangent rule; "
            "use optimizer=sgd, adam, adamw or rmsprop"
        )


__all__ = ["HypergradThreshold"]
