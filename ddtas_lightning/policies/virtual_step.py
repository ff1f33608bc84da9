"""Virtual-step machinery shared by the meta-learning policies (DDTAS's learned loss threshold,
MMSI's per-pair weights): spec ``docs/papers/ddtas.md`` §2.3 and ``docs/papers/mmsi.md`` §1.

Notation. theta = the model's trainable parameters, x_t / x_m = train / meta batch,
S(theta) = the quantity the train loss head reads (the B x M similarity matrix of the train batch),
c = a differentiable *control* tensor entering the train loss (the threshold lambda now, per-pair
weights later), ``L_t(theta, c) = head(S(theta), c)`` on a fixed pair selection, ``L_m(theta)`` the
meta loss on the meta batch (it does not depend on c directly). One virtual SGD step

    theta'(c) = theta - eta * grad_theta L_t(theta, c)

and the meta gradient ``dL_m(theta'(c)) / dc``. Two routes:

* **double backward** (:func:`exact_meta_gradient`): back-propagate ``L_m(theta')`` through the
  virtual step (``torch.autograd.grad(..., create_graph=True)``, second order through the backbone).
  Generic (c may enter anywhere), but the most expensive in time and memory.
* **tangent** (:func:`tangent_meta_gradient`): since ``grad_theta L_t = J_S^T dhead/dS`` and J_S does
  not depend on c (c enters the loss head only),

      dL_m/dc = -eta * (d/dc dhead/dS)^T (J_S v'),   v' = grad_theta L_m(theta')

  **exactly**. ``J_S v'`` is one forward-mode derivative of S along v'
  (:meth:`FunctionalModel.forward_with_tangent`), the rest is two cheap autograd calls on the loss
  head alone: no double backward through the backbone. Taking ``v = grad_theta L_m(theta)`` instead
  of v' (no virtual step needed at all) is exact to first order in eta. With per-pair weights as the
  control, ``d/dc dhead/dS`` is diagonal and this gives MMSI's ``w_k = -eta * c_k * (J_S v)_k`` for
  all pairs at once. For a control with very few components (a scalar threshold) the same number
  is cheaper in reverse mode, ``<v, J_S^T grad_S(dhead/dc_k)>``: :func:`cotangent_meta_gradient`.

Everything runs on the live model through ``torch.func.functional_call`` with explicit parameter
dictionaries: no model copies, the real parameters are never written.

Buffers (BatchNorm running statistics). Only the *real* forward of the train batch may update
running statistics (exactly once per step, as a plain forward would). Every other pass (meta batch,
virtual parameters, separate tangent pass) is called with ``update_buffers=False``: the model then
sees throw-away clones of its buffers, so a BatchNorm in eval mode normalises with the running
statistics as usual, a BatchNorm in train mode normalises with the pass's own batch statistics
(same function as the real train-mode forward) and nothing is written back.

Forward mode uses ``torch.autograd.forward_ad`` (the engine behind ``torch.func.jvp``) rather than
``torch.func.jvp`` itself, because ``torch.func.jvp`` refuses the in-place running-stat update of a
train-mode BatchNorm ("mutate a captured Tensor") and cannot hand back a primal output that stays
in the outer autograd graph, which :meth:`FunctionalModel.forward_with_tangent` uses to serve as
the real forward at the same time. Pure torch: no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call

from ddtas_lightning.runtime.distributed import all_reduce_mean, all_reduce_mean_  # noqa: F401 - re-exported

Params = dict[str, Tensor]


def trainable_parameters(model: nn.Module) -> Params:
    """The live ``requires_grad`` parameters of ``model`` by name: the theta of the virtual step."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


META_PARAMS = ("all", "head")


def select_parameters(model: nn.Module, which: str) -> Params:
    """The parameters the tangent tracks: ``all`` trainable ones, or ``head`` (names ``head.*``)."""
    if which not in META_PARAMS:
        raise ValueError(f"threshold_policy.meta_params must be one of {', '.join(META_PARAMS)}, got {which!r}")
    params = trainable_parameters(model)
    if which == "all":
        return params
    head = {n: p for n, p in params.items() if n.startswith("head.")}
    if not head:
        from ddtas_lightning.config.validation import ConfigError

        raise ConfigError(
            "threshold_policy.meta_params=head: the model has no trainable parameter named head.* "
            f"(it has {sorted(params)[:5]}...); use meta_params=all"
        )
    return head


class FunctionalModel:
    """Calls ``model`` with explicit parameters through ``torch.func.functional_call``.

    ``params``: the parameters the virtual step acts on (default: :func:`trainable_parameters`).
    Parameters not in ``params`` (frozen ones) and buffers are the model's own, except that passes
    with ``update_buffers=False`` get clones of the buffers (see the module docstring).
    """

    def __init__(self, model: nn.Module, params: Params | None = None) -> None:
        self.model = model
        self.params = trainable_parameters(model) if params is None else dict(params)

    def _buffers(self, update_buffers: bool) -> Params:
        if update_buffers:
            return {}  # functional_call falls back to the module's own buffers
        return {name: b.clone() for name, b in self.model.named_buffers()}

    def __call__(self, inputs: Tensor, params: Mapping[str, Tensor] | None = None, *,
                 update_buffers: bool = True) -> Tensor:
        """``model(inputs)`` with ``params`` (default: the live ones) in place of the parameters."""
        params = self.params if params is None else params
        return functional_call(self.model, {**params, **self._buffers(update_buffers)}, (inputs,))

    def forward_with_tangent(
        self,
        inputs: Tensor,
        tangent: Mapping[str, Tensor],
        params: Mapping[str, Tensor] | None = None,
        *,
        fn: Callable[[Tensor], Tensor] | None = None,
        update_buffers: bool = True,
        keep_graph: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """``(y, J_y v)`` for ``y = fn(model(inputs; params))`` and the direction ``v = tangent``.

        One forward-mode pass (dual numbers). ``keep_graph=True``: the primal ``y`` is built from the
        parameters as they are (the live ones keep their autograd graph), so ``y`` can serve as the
        real forward of the step and be back-propagated later (costs extra activation memory: autograd
        also records the tangent computations while the pass runs). ``keep_graph=False``: parameters
        are detached first, nothing is recorded; use ``update_buffers=False`` then, unless this pass
        is meant to be the one that updates BatchNorm statistics. ``tangent`` entries missing for a
        parameter mean a zero direction. The tangent is returned detached. Runs with autocast off
        (the parameters' precision) under mixed precision.
        """
        params = self.params if params is None else params
        # Forward mode and autocast do not mix: an eval-mode BatchNorm on a reduced-precision input
        # gets a float32 tangent beside its bf16/fp16 primal and the next convolution refuses the pair
        # ("Input type ... and weight type ... should be the same"), under 16-mixed / bf16-mixed. The
        # pass therefore runs in the parameters' own precision, with autocast off.
        with torch.autocast(inputs.device.type, enabled=False), forward_ad.dual_level():
            duals = {}
            for name, p in params.items():
                p = p if keep_graph else p.detach()
                t = tangent.get(name)
                duals[name] = p if t is None else forward_ad.make_dual(p, t.to(p.dtype))
            out = functional_call(self.model, {**duals, **self._buffers(update_buffers)}, (inputs,))
            if fn is not None:
                out = fn(out)
            primal, tan = forward_ad.unpack_dual(out)
            if tan is None:  # the output does not depend on any direction
                tan = torch.zeros_like(primal)
            # `primal` is a view of the dual output; clone it (cheap) so that nothing refers to the
            # dual level after it closes.
            return primal.clone() if keep_graph else primal.detach().clone(), tan.detach().clone()


def gradient(loss: Tensor, params: Mapping[str, Tensor], *, create_graph: bool = False,
             retain_graph: bool | None = None) -> Params:
    """``grad_theta loss`` as a dict (zeros for parameters the loss does not use)."""
    names = list(params)
    grads = torch.autograd.grad(
        loss, [params[n] for n in names], create_graph=create_graph, retain_graph=retain_graph,
        allow_unused=True,
    )
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)}


def virtual_sgd_step(loss: Tensor, params: Mapping[str, Tensor], lr: float, *,
                     create_graph: bool = True) -> Params:
    """``theta' = theta - lr * grad_theta loss`` (plain SGD, every parameter in ``params``).

    ``create_graph=True`` keeps theta' differentiable w.r.t. whatever ``loss`` depends on (the
    control tensor, theta itself); ``False`` returns constants (no graph). The graph of ``loss`` is retained, so the same forward can still
    be back-propagated for the real update. The real parameters are not modified.
    """
    grads = gradient(loss, params, create_graph=create_graph, retain_graph=True)
    if create_graph:
        return {n: p - lr * grads[n] for n, p in params.items()}
    names = list(params)
    # Under DDP the loss is the global batch's on every rank and each rank holds the gradient through
    # its own rows (times W): the mean over ranks is the full gradient (ddtas_lightning.runtime.distributed).
    all_reduce_mean_([grads[n] for n in names])
    with torch.no_grad():  # constants: one fused loop, no graph
        stepped = torch._foreach_add([params[n] for n in names], [grads[n] for n in names], alpha=-lr)
    return dict(zip(names, stepped))


@dataclass
class MetaGradient:
    """``grad``: dL_meta/d control (shape of the control). ``meta_loss``: the meta loss, detached;
    at theta' for the exact gradient, at theta for the first-order one."""

    grad: Tensor
    meta_loss: Tensor


def exact_meta_gradient(
    train_loss: Tensor,
    control: Tensor,
    meta_loss_fn: Callable[[Params], Tensor],
    params: Mapping[str, Tensor],
    inner_lr: float,
) -> MetaGradient:
    """Exact (second-order) ``d L_m(theta - eta grad_theta L_t(theta, c)) / dc``.

    train_loss: ``L_t(theta, c)``, built from ``params`` and the ``control`` tensor (requires grad).
    meta_loss_fn: ``theta' -> L_m(theta')`` (e.g. embeds the meta batch with
        ``FunctionalModel(..)(x_m, theta', update_buffers=False)``); must not use ``control``.
    The graph of ``train_loss`` is retained (the caller may back-propagate the same forward).
    """
    virtual = virtual_sgd_step(train_loss, params, inner_lr, create_graph=True)
    meta_loss = meta_loss_fn(virtual)
    if not meta_loss.requires_grad:  # no meta pair at all: no information
        return MetaGradient(torch.zeros_like(control), meta_loss.detach())
    (grad,) = torch.autograd.grad(meta_loss, control, retain_graph=True, allow_unused=True)
    grad = torch.zeros_like(control) if grad is None else grad
    return MetaGradient(grad.detach(), meta_loss.detach())


def loss_and_gradient(loss_fn: Callable[[Params], Tensor], params: Mapping[str, Tensor]) -> tuple[Tensor, Params]:
    """``(L(p), grad_p L(p))`` at ``p = params`` taken as constants (detached leaves), e.g. the meta
    loss and ``v'`` at the virtual parameters. The loss is returned detached."""
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    loss = loss_fn(leaves)
    if not loss.requires_grad:
        return loss.detach(), {n: torch.zeros_like(p) for n, p in leaves.items()}
    return loss.detach(), gradient(loss, leaves)


def tangent_meta_gradient(
    head: Callable[[Tensor, Tensor], Tensor],
    features: Tensor,
    features_tangent: Tensor,
    control: Tensor,
    inner_lr: float,
) -> Tensor:
    """``-eta * (d/dc dhead(S, c)/dS)^T Sdot`` with ``Sdot = J_S v`` (see the module docstring).

    head: ``(S, c) -> L_t`` on a fixed selection (the loss head only, no backbone).
    features: S (values; detached here). features_tangent: ``J_S v`` from
    :meth:`FunctionalModel.forward_with_tangent` with ``v = grad_theta L_m``.
    Exact when ``v = grad_theta L_m(theta')``; first order in eta with ``v`` at theta.
    """
    s = features.detach().requires_grad_(True)
    loss = head(s, control)
    if not loss.requires_grad:
        return torch.zeros_like(control)
    (g_s,) = torch.autograd.grad(loss, s, create_graph=True)
    directional = (g_s * features_tangent.to(g_s.dtype)).sum()
    if not directional.requires_grad:  # dhead/dS does not depend on c (e.g. nothing selected)
        return torch.zeros_like(control)
    (grad,) = torch.autograd.grad(directional, control, allow_unused=True)
    grad = torch.zeros_like(control) if grad is None else grad
    return -inner_lr * grad.detach()


def cotangent_meta_gradient(
    head: Callable[[Tensor, Tensor], Tensor],
    features: Tensor,
    control: Tensor,
    direction: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    inner_lr: float,
) -> Tensor:
    """The value of :func:`tangent_meta_gradient` for ``v = direction``, by reverse mode instead.

    ``(d/dc dhead/dS)^T (J_S v) = <v, J_S^T C>`` with ``C_k = grad_S (dhead/dc_k)`` (mixed partials
    commute), so each component of the control costs one backward through the graph of ``features``
    (which must still be alive, built from ``params``; it is retained). Cheaper than the forward-mode
    pass when the control has one component (a backward costs ~2 forwards, a forward-mode pass ~3);
    for larger controls use the tangent form.
    """
    s = features.detach().requires_grad_(True)
    loss = head(s, control)
    out = torch.zeros_like(control)
    if not loss.requires_grad:
        return out
    (dl_dc,) = torch.autograd.grad(loss, control, create_graph=True, allow_unused=True)
    if dl_dc is None:
        return out
    names = [n for n in params if n in direction]
    flat = out.view(-1)
    for k, dl_dck in enumerate(dl_dc.reshape(-1)):
        if not dl_dck.requires_grad:  # dhead/dc_k does not depend on S: zero
            continue
        (c_k,) = torch.autograd.grad(dl_dck, s, retain_graph=True, allow_unused=True)
        if c_k is None:
            continue
        u = torch.autograd.grad(features, [params[n] for n in names], grad_outputs=c_k.to(features.dtype),
                                retain_graph=True, allow_unused=True)
        flat[k] = -inner_lr * sum(
            (direction[n].to(g.dtype) * g).sum() for n, g in zip(names, u) if g is not None
        )
    return out.detach()


META_OBJECTIVES = ("loss", "smooth_ap", "nca")


def all_pairs_meta_loss(
    fm: FunctionalModel, loss_fn: Callable[..., Tensor], images: Tensor, labels: Tensor, threshold: Tensor,
    objective: str = "loss", temperature: float | None = None,
) -> Callable[[Params], Tensor]:
    """``theta -> L_m(theta)`` on the meta batch (embedded with ``theta`` on throw-away buffers), scored
    against itself. objective: ``loss`` (the papers': ``loss_fn`` on every pair, no mining, at the
    fixed ``threshold`` lambda_0) | ``smooth_ap`` | ``nca`` (lambda-free retrieval objectives of
    :mod:`ddtas_lightning.losses.retrieval_objectives`, ``temperature`` None = their default)."""
    from ddtas_lightning.losses.retrieval_objectives import OBJECTIVES  # local: keeps imports light
    from ddtas_lightning.miners.selection import PairSelection

    if objective not in META_OBJECTIVES:
        raise ValueError(f"threshold_policy.meta_objective must be one of {', '.join(META_OBJECTIVES)}, "
                         f"got {objective!r}")
    selection = PairSelection.all_pairs(labels)
    kwargs = {} if temperature is None else {"temperature": float(temperature)}

    def meta_loss(params: Params) -> Tensor:
        emb = fm(images, params, update_buffers=False)
        sim = emb @ emb.T
        if objective != "loss":
            return OBJECTIVES[objective](sim, labels.to(sim.device), **kwargs)
        return loss_fn(sim, selection, threshold=threshold.to(sim.dtype))

    return meta_loss


def gradient_and_tangent(
    loss_of: Callable[[Params, Tensor], Tensor],
    params: Mapping[str, Tensor],
    control: Tensor,
    params_tangent: Mapping[str, Tensor],
    control_tangent: Tensor,
) -> tuple[Params, Params]:
    """``(g, gdot)`` with ``g = grad_theta L(theta, c)`` and its directional derivative along
    ``(Z, cdot)``: ``gdot = H_theta Z + (d g / d c) cdot`` (a Hessian-vector product plus the mixed
    partial, in one forward-over-reverse pass: ``torch.func.jvp`` over ``torch.func.grad``).

    loss_of: ``(params, c) -> scalar`` built with :class:`FunctionalModel` (use ``update_buffers=False``
    inside: the pass runs on throw-away buffers). The parameters are taken as constants (detached);
    ``params_tangent`` entries missing mean zero. Both results are detached.
    """
    names = list(params)
    primals = {n: params[n].detach() for n in names}
    tangents = {
        n: (torch.zeros_like(primals[n]) if params_tangent.get(n) is None
            else params_tangent[n].to(primals[n].dtype))
        for n in names
    }
    control = control.detach()
    grad_fn = torch.func.grad(loss_of)
    g, gdot = torch.func.jvp(grad_fn, (primals, control), (tangents, control_tangent.to(control.dtype)))
    return ({n: g[n].detach() for n in names}, {n: gdot[n].detach() for n in names})


__all__ = [
    "FunctionalModel",
    "MetaGradient",
    "Params",
    "all_pairs_meta_loss",
    "all_reduce_mean",
    "cotangent_meta_gradient",
    "exact_meta_gradient",
    "gradient",
    "gradient_and_tangent",
    "loss_and_gradient",
    "tangent_meta_gradient",
    "select_parameters",
    "trainable_parameters",
    "virtual_sgd_step",
]
