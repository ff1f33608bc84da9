"""The lambda grid in one run: K embedding heads on one backbone, head k trained at its own static lambda_k
(issue 23). ``threshold_policy=many_heads threshold_policy.thresholds=[...]``.

The module wraps the configured backbone in :class:`~ddtas_lightning.models.many_heads.ManyHeads` (one head
per threshold; ``split`` and ``trunk_grad`` are that model's options, kept here so that the number of heads
has one source, the list). One step:

1. ``E = model(x, heads="all")``: (K, B, d), every head's embeddings of the train batch in one call
   (gathered over DDP ranks as every policy's embeddings are);
2. for each head k: ``S_k = E_k E_k^T``, the miner's selection on S_k, and ``L_k = loss(S_k, selection_k,
   lambda_k)``, exactly a static step at ``loss.threshold = lambda_k`` (the same operations on the same
   shapes); head k mines with its own generator, whose stream is the one a single run of this seed would
   draw (the module's generator state at the first step, then advanced by head k's draws only;
   checkpoints carry the K states). ``vmap_loss=true`` runs the K heads' mining and losses in one
   ``torch.func.vmap`` call instead (faster for tiny models; rounds differently; a miner that draws at
   random, or anything vmap cannot batch, falls back to the loop);
3. the loss back-propagated is ``sum_k L_k``: each head's parameters get exactly the gradient of its own
   L_k, and a shared trunk gets the mean over heads (``ManyHeads`` scales its gradient by 1/K; see there).

With a frozen backbone (``split=none`` in cached-feature mode, or ``split=head`` with the trunk frozen)
head k therefore follows the same trajectory as a single run at lambda_k with the same seed and batches,
bit for bit on the same machine and thread count (exceptions: a non-finite loss in any head skips the update
of all heads; ``vmap_loss``). The module validates every head and keeps the head with the best validation
R@1 (the first on ties) as the model's ``selected`` head: with one ``val/R@1`` per validation taken as the
best head's, the checkpoint rule (the first best ``val/R@1``) picks what a grid search that keeps each
point's best checkpoint and then the point with the best of those picks (with several validations, an exact
tie between heads at different validations goes to the earlier validation here, to the lower head index
there). Only that head is tested (``test_all_heads=true`` also logs every head's test metrics as
``test/head<k>/*``: a diagnostic, never used for selection). ``current_threshold()`` is the selected head's
lambda (the run summary's final lambda).

**Successive halving** (``reduction_factor`` eta >= 2; 0: off): the synchronous successive halving of a
grid (Jamieson & Talwalkar 2016; Li et al. 2018), inside the one run. The rungs are the training
validations number ``min_resource * eta**i`` (i = 0, 1, ...); at a rung the module keeps the best
``max(1, n // eta)`` of the n heads still trained, by that validation's R@1 (ties: the lower index), and the
others stop: no forward, backward, mining, loss or validation any more, their parameters stay where the rung
found them (a head that is never called has no gradient, and the optimisers skip such parameters). Every
head sees the same number of steps before a rung, in lockstep, so the decision does not depend on the order
in which points were tried, unlike a sequential Optuna study's pruner (the first trials there always run to
the end). With a frozen backbone, a head that survives is still bit for bit its grid run; the compute is
the heads actually run (passes and CPU seconds). The selected (tested) head is the best *active* head.

Logs: ``train/loss`` is ``sum_k L_k``; ``train/loss_head<k>``; ``mining/*`` are means over the heads;
``val/active_heads`` (successive halving).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import vmap

from ddtas_lightning.config.validation import ConfigError, as_float, as_int
from ddtas_lightning.losses.base import MetricLoss
from ddtas_lightning.miners.base import BaseMiner
from ddtas_lightning.miners.selection import PairSelection
from ddtas_lightning.policies.base import (
    StepBatch,
    StepOutput,
    ThresholdPolicy,
    global_embeddings,
    similarities,
)
from ddtas_lightning.runtime.distributed import is_distributed


def global_head_embeddings(local: Tensor) -> Tensor:
    """(K, b, d) of this rank's rows -> (K, B, d) of the global batch (gathered with gradient; the same
    tensor in a single process)."""
    if not is_distributed():
        return local
    k, b, d = local.shape
    rows = global_embeddings(local.transpose(0, 1).reshape(b, k * d))
    return rows.reshape(-1, k, d).transpose(0, 1).contiguous()


def is_rung(validation: int, min_resource: int, reduction_factor: int) -> bool:
    """Whether training validation number ``validation`` (1, 2, ...) is a rung: ``min_resource * eta**i``."""
    if reduction_factor < 2:
        return False
    rung = min_resource
    while rung < validation:
        rung *= reduction_factor
    return rung == validation


def halve(active: Sequence[bool], r1: Sequence[float], reduction_factor: int) -> list[bool]:
    """The heads kept at a rung: the best ``max(1, n // eta)`` of the n active heads by ``r1`` (NaN last, ties
    to the lower index); inactive heads stay inactive."""
    alive = [k for k, a in enumerate(active) if a]
    keep = max(1, len(alive) // reduction_factor)
    ranked = sorted(alive, key=lambda k: (-r1[k] if not math.isnan(r1[k]) else math.inf, k))
    kept = set(ranked[:keep])
    return [k in kept for k in range(len(active))]


def mean_selection(selections: list[PairSelection]) -> PairSelection:
    """For logging: the first head's masks, every stat and threshold averaged over the heads."""
    first = selections[0]

    def mean(key: str, field: str) -> Tensor:
        return torch.stack([getattr(s, field)[key].float() for s in selections]).mean()

    return PairSelection(first.pos_mask, first.neg_mask,
                         thresholds={k: mean(k, "thresholds") for k in first.thresholds},
                         stats={k: mean(k, "stats") for k in first.stats})


class ManyHeadsThreshold(ThresholdPolicy):
    """K heads, head k at the static ``thresholds[k]`` (module docstring).

    thresholds: the grid's lambdas, one head each. split: ``none`` (K whole copies of the backbone) |
    ``head`` (a shared trunk, K linear heads). trunk_grad: ``mean`` | a head index (split=head).
    test_all_heads: also test every head (diagnostic ``test/head<k>/*``; the run's ``test/*`` stay the
    selected head's). vmap_loss: the heads' mining and losses in one vmap call (see the module docstring).
    reduction_factor, min_resource: successive halving of the heads (0: off; see the module docstring).
    """

    many_heads = True  # the builder gives such a policy the many-heads module

    def __init__(self, thresholds: Sequence[float], split: str = "none", trunk_grad: str | int = "mean",
                 test_all_heads: bool = False, vmap_loss: bool = False, reduction_factor: int = 0,
                 min_resource: int = 1) -> None:
        super().__init__()
        if isinstance(thresholds, str | int | float) or not len(thresholds):
            raise ConfigError(f"threshold_policy.thresholds must be a non-empty list of lambdas (one head each), "
                              f"got {thresholds!r}")
        self.thresholds = tuple(as_float(f"threshold_policy.thresholds[{i}]", t) for i, t in enumerate(thresholds))
        self.split, self.trunk_grad, self.test_all_heads = split, trunk_grad, bool(test_all_heads)
        self.vmap_loss = bool(vmap_loss)
        self.reduction_factor = as_int("threshold_policy.reduction_factor", reduction_factor, 0)
        if self.reduction_factor == 1:
            raise ConfigError("threshold_policy.reduction_factor must be 0 (no successive halving) or >= 2 (keep "
                              "1/eta of the heads at each rung), got 1")
        self.min_resource = as_int("threshold_policy.min_resource", min_resource, 1)
        if self.reduction_factor and trunk_grad != "mean":
            raise ConfigError("threshold_policy.reduction_factor needs trunk_grad=mean (a trunk that follows one "
                              "head would stop learning once that head is stopped)")
        # training validations so far: the successive-halving rungs count them (checkpoints carry it)
        self.register_buffer("validations", torch.zeros((), dtype=torch.long))
        # the head the module selected on validation (it sets it with the model's ``selected``)
        self.register_buffer("selected", torch.zeros((), dtype=torch.long))
        size = torch.Generator().get_state().numel()
        self.register_buffer("head_rng", torch.zeros(len(self.thresholds), size, dtype=torch.uint8))
        self.register_buffer("rng_ready", torch.zeros((), dtype=torch.bool))
        # whether the heads' mining and loss run batched under vmap (None: not tried yet; see _batched_heads)
        self._batched: bool | None = None

    @property
    def num_heads(self) -> int:
        return len(self.thresholds)

    def current_threshold(self) -> Tensor | None:
        """The selected head's lambda (the model the run tests); each head trains at its own."""
        return torch.tensor(self.thresholds[int(self.selected)])

    @torch.no_grad()
    def _generators(self, generator: torch.Generator | None) -> list[torch.Generator | None]:
        """Head k's generator, restored from its saved state (the module's state at the first step)."""
        if generator is None or generator.device.type != "cpu":
            return [generator] * self.num_heads
        if not bool(self.rng_ready):
            self.head_rng.copy_(generator.get_state().unsqueeze(0).expand_as(self.head_rng))
            self.rng_ready.fill_(True)
        gens = []
        for k in range(self.num_heads):
            g = torch.Generator()
            g.set_state(self.head_rng[k].clone())
            gens.append(g)
        return gens

    def step(self, model: nn.Module, loss_fn: MetricLoss, miner: BaseMiner, batch: StepBatch) -> StepOutput:
        if getattr(model, "num_heads", None) != self.num_heads:
            raise ConfigError(f"threshold_policy=many_heads needs a ManyHeads model with {self.num_heads} heads "
                              f"(one per threshold), got {type(model).__name__}")
        active = model.active_heads()
        emb = global_head_embeddings(model(batch.images, heads="active"))
        out = self._batched_heads(emb, active, loss_fn, miner, batch) \
            if self.vmap_loss and self._batched is not False else None
        if out is None:
            out = self._looped_heads(emb, active, loss_fn, miner, batch)
        losses, selection = out
        logs = {f"train/loss_head{k}": loss.detach() for k, loss in zip(active, losses)}
        return StepOutput(loss=losses.sum(), selection=selection, logs=logs)

    def _looped_heads(self, emb: Tensor, active: list[int], loss_fn: MetricLoss, miner: BaseMiner,
                      batch: StepBatch):
        """Head by head, each exactly a static step's mining and loss; head k mines with its own generator.
        ``emb[i]`` is head ``active[i]``'s."""
        gens = self._generators(batch.generator)
        losses, selections = [], []
        for i, k in enumerate(active):
            sim = similarities(emb[i])
            selection = miner(sim, batch.labels, epoch=batch.epoch, generator=gens[k])
            losses.append(loss_fn(sim, selection, threshold=self.thresholds[k]))
            selections.append(selection)
        with torch.no_grad():
            for k in active:
                g = gens[k]
                if g is not None and g is not batch.generator:
                    self.head_rng[k].copy_(g.get_state())
        return torch.stack(losses), mean_selection(selections)

    def _batched_heads(self, emb: Tensor, active: list[int], loss_fn: MetricLoss, miner: BaseMiner,
                       batch: StepBatch):
        """``vmap_loss=true``: all heads' mining and loss in one ``torch.func.vmap`` call (the same operations,
        batched over the K heads: ~2.4x faster for K = 6 at B = 32, the per-call overhead of K calls; the
        batched kernels round differently from a single run's). A miner or loss that cannot run under vmap
        (one that draws at random, data-dependent shapes) raises there; the policy then uses
        :meth:`_looped_heads` from this step on."""
        sims = emb @ emb.transpose(1, 2)  # (K, B, B): S_k = E_k E_k^T
        lams = torch.tensor([self.thresholds[k] for k in active], dtype=torch.float64, device=sims.device)
        labels, epoch = batch.labels, batch.epoch

        def one_head(sim: Tensor, lam: Tensor):
            sel = miner(sim, labels, epoch=epoch, generator=None)
            return loss_fn(sim, sel, threshold=lam), sel.pos_mask, sel.neg_mask, sel.thresholds, sel.stats

        try:
            losses, pos, neg, thresholds, stats = vmap(one_head, randomness="error")(sims, lams)
        except Exception:  # noqa: BLE001 - anything vmap cannot batch: the head-by-head loop computes the same
            self._batched = False
            return None
        self._batched = True
        selection = PairSelection(pos[0], neg[0], thresholds={k: v.float().mean() for k, v in thresholds.items()},
                                  stats={k: v.float().mean() for k, v in stats.items()})
        return losses, selection

    def extra_repr(self) -> str:
        halving = f", reduction_factor={self.reduction_factor}, min_resource={self.min_resource}" \
            if self.reduction_factor else ""
        return f"thresholds={list(self.thresholds)}, split={self.split}, trunk_grad={self.trunk_grad}{halving}"
