"""Objects of one run, built from a composed config with ``hydra.utils.instantiate``: the data module,
the LightningModule, and the Trainer with the run's callbacks and plugins."""

from __future__ import annotations

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.data.datamodule import DMLDataModule
from ddtas_lightning.heads_module import module_class
from ddtas_lightning.module import DMLModule
from ddtas_lightning.runtime.checkpointing import with_atomic_checkpoint_io
from ddtas_lightning.runtime.cluster import cluster_plugins
from ddtas_lightning.runtime.pruning import pruning_callbacks
from ddtas_lightning.runtime.run_dir import run_callbacks
from ddtas_lightning.runtime.run_output import progress_options
from ddtas_lightning.runtime.run_record import ComputeMeter, TrainLossTrace, ValidationHistory


def build(cfg: DictConfig) -> tuple[DMLDataModule, DMLModule]:
    """Instantiate the data module and the LightningModule from a composed config."""
    policy = instantiate(cfg.threshold_policy)
    datamodule = DMLDataModule(
        source=instantiate(cfg.dataset.source),
        transform=instantiate(cfg.transform),
        seed=int(cfg.seed),
        with_meta_batch=policy.needs_meta_batch,
        **{**OmegaConf.to_container(cfg.data, resolve=True),
           **({"meta_K": policy.meta_K} if policy.meta_K is not None else {})},
    )
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    model, loss, miner = instantiate(cfg.backbone), instantiate(cfg.loss), instantiate(cfg.miner)
    check_loss_miner_pairing(loss, miner)  # miner=nspa* mines triplets for a triplet loss
    module = module_class(policy)(  # threshold_policy=many_heads: ManyHeadsModule (K heads, heads_module.py)
        model=model,
        loss=loss,
        miner=miner,
        policy=policy,
        optimizer=instantiate(optimizer_without_loss_lr(cfg.optimizer)),
        loss_lr=cfg.optimizer.get("loss_lr"),
        scheduler=scheduler,
        recall_ks=tuple(cfg.metrics.recall_ks),
        knn_backend=cfg.metrics.knn_backend,
        compute_nmi=bool(cfg.metrics.nmi),
        cluster_stats=bool(cfg.metrics.get("cluster_stats", False)),
        max_nonfinite_steps=int(cfg.module.max_nonfinite_steps),
        meta_batch_size=int(cfg.data.meta_batch_size) if policy.needs_meta_batch else 0,
        seed=int(cfg.seed),
    )
    return datamodule, module


def check_loss_miner_pairing(loss, miner) -> None:
    """NSPA (``miner=nspa``, ``nspa_hardest``, ``nspa_random_hard``, ``nspa_semi_hard``) picks one negative per
    anchor-positive pair against a triplet margin (``miner.margin``, paired with the triplet loss's margin
    ``loss.threshold``). A pair loss (the default ``loss=ms``, and contrastive, binomial, ...) would read only
    the pairs those triplets contain and ignore NSPA's margin, silently training something else."""
    from ddtas_lightning.losses.pml import PMLLoss
    from ddtas_lightning.losses.triplet import TripletMarginLoss
    from ddtas_lightning.miners.nspa import NSPAMiner

    if isinstance(miner, NSPAMiner) and not isinstance(loss, TripletMarginLoss | PMLLoss):
        raise ConfigError(
            f"miner=nspa (NSPAMiner) mines triplets for a triplet loss, but the loss is {type(loss).__name__}, a "
            "pair loss that would use only the triplets' pairs and ignore NSPA's margin; use loss=triplet "
            f"(with loss.threshold={getattr(miner, 'margin', 0.4):g}, the miner's margin, as experiment=nspa_* do)")


def optimizer_without_loss_lr(node: DictConfig) -> DictConfig:
    """``optimizer`` minus ``loss_lr`` (the learning rate of the loss's own parameters, a key of ours)."""
    node = OmegaConf.masked_copy(node, [k for k in node if k != "loss_lr"]) if "loss_lr" in node else node
    return node


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()
                 if OmegaConf.is_dict(c) and "_target_" in c]  # not the group's plain options (keep_last)
    # Checkpoint files are written atomically (a kill mid-save keeps the previous last.ckpt), unless
    # the trainer config chooses its own CheckpointIO plugin.
    plugins = with_atomic_checkpoint_io(instantiate(cfg.trainer.get("plugins")))
    plugins += cluster_plugins()  # DDP ranks started by a submitit sweep job join, not re-launch
    callbacks += run_callbacks(cfg)  # config saved in checkpoints, last.ckpt at SIGTERM/SIGINT, R@K check
    # What metrics.json records about the run itself (compute, the selected checkpoint's val metrics).
    callbacks += [ComputeMeter(), ValidationHistory(), TrainLossTrace()]
    callbacks += pruning_callbacks(cfg)  # a pruned sweep's trial: val/R@1 to its Optuna trial, stop if pruned
    # Output that is not a terminal (a log file, SLURM) gets one progress line per N steps, not bar frames.
    progress = progress_options(cfg.trainer, callbacks)
    return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=plugins, **progress)


def find_callback(trainer: pl.Trainer, kind: type):
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)
