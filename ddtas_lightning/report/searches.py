"""The pruned searches of a study setting (``search_<name>/``, issue 23): one Optuna study of
``hparams_search=<name>`` per training seed (``seed<k>/optuna.json`` and a dir per trial), read as one family
against the grid chosen on validation: per seed the validation-best *complete* trial (a pruned trial never
is), its test R@1 paired by seed with the grid's pick, at the CPU seconds of all the seed's trials, pruned ones
included. :mod:`ddtas_lightning.report.study` puts each family in its tables beside the learned arms."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ddtas_lightning.report.runs import OPTUNA_MARKER, Arm, SweepError, is_optuna_sweep, load_optuna
from ddtas_lightning.report.summary import GridPick, OptunaFamily, Stat, Versus, summarize, versus

# hydra.sweeper.pruner -> the name in a search's label
PRUNER_NAMES = {"successive_halving": "SHA", "hyperband": "Hyperband", "median": "median"}


@dataclass
class Search:
    """One ``search_<name>/``: an Optuna study per training seed (``hparams_search=<name>``), read as one family
    against the grid: per seed the validation-best complete trial, at the CPU seconds of all the seed's trials."""

    name: str                        # <name> of search_<name>
    path: Path
    studies: list[tuple[dict, OptunaFamily]]  # (optuna.json, its trials), in training-seed order
    versus: Versus | None            # the picks against the grid's validation pick (None: no pick, or no grid)
    unpaired: list[int] = field(default_factory=list)    # seeds with a pick but no grid pick: left out of ΔR@1
    no_pick: list[int] = field(default_factory=list)     # seeds none of whose trials completed
    unreadable: list[Path] = field(default_factory=list)  # sub-dirs without optuna.json: left out

    @property
    def families(self) -> list[OptunaFamily]:
        return [f for _, f in self.studies]

    @property
    def label(self) -> str:
        """``search study_grid_sha (Grid + SHA, 6 trials: 2.3 complete, 3.7 pruned per seed)``."""
        n = len(self.families)
        kinds = []
        for study, family in self.studies:
            spec = study.get("pruner")  # the sweeper's {"kind", "options"}
            pruner = spec.get("kind") if isinstance(spec, dict) else None
            kinds.append(family.sampler + (f" + {PRUNER_NAMES.get(pruner, pruner)}" if pruner not in (None, "none")
                                           else " + pruning" if family.pruned else ""))
        trials = [len(f.trials) for f in self.families]
        counts = [("complete", [len(f.complete) for f in self.families]),
                  ("pruned", [len(f.pruned) for f in self.families]),
                  ("failed", [len(f.trials) - len(f.complete) - len(f.pruned) for f in self.families])]
        parts = [f"{_num(sum(v) / n)} {what}" for what, v in counts if what != "failed" or any(v)]
        head = f"{' / '.join(dict.fromkeys(kinds))}, {_num(sum(trials) / n)} trials: {', '.join(parts)} per seed"
        notes = []
        if self.no_pick:
            notes.append(f"seed {_seeds(self.no_pick)}: no complete trial")
        if self.unpaired:
            notes.append(f"seed {_seeds(self.unpaired)} not in the grid: left out of ΔR@1")
        if self.unreadable:
            notes.append(f"{', '.join(p.name for p in self.unreadable)}: no {OPTUNA_MARKER}, left out")
        return f"search {self.name} ({'; '.join([head, *notes])})"


def _num(x: float) -> str:
    """``2.3``, ``6`` (a per-seed mean)."""
    return f"{x:.1f}".removesuffix(".0")


def _seeds(seeds: list[int]) -> str:
    return ", ".join(str(s) for s in seeds)


def load_search(path: Path, grid: GridPick | None) -> Search:
    """``search_<name>/``: its Optuna studies (``seed<k>/optuna.json``, or ``optuna.json`` in the dir itself),
    read as one family against ``grid`` (the grid chosen on validation per seed). SweepError without any."""
    if is_optuna_sweep(path):
        sweeps, unreadable = [path], []
    else:
        subdirs = sorted((p for p in path.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name))
        sweeps = [p for p in subdirs if is_optuna_sweep(p)]
        unreadable = [p for p in subdirs if not is_optuna_sweep(p)]
    if not sweeps:
        raise SweepError(f"{path}: no Optuna sweep; a study search dir holds one per training seed, "
                         f"seed<k>/{OPTUNA_MARKER} with a dir per trial (make study writes them with "
                         f"hparams_search={path.name.removeprefix('search_')} hydra.sweep.dir={path}/seed<k>), "
                         f"or is itself one sweep with {OPTUNA_MARKER}")
    studies = []
    for sweep in sweeps:
        study, trials = load_optuna(sweep)
        seeds = {t.seed for t in trials if t.seed is not None}
        seed = seeds.pop() if len(seeds) == 1 else study.get("seed")
        studies.append((study, OptunaFamily(sweep, seed, trials, str(study.get("sampler") or "TPE"))))
    studies.sort(key=lambda sf: (sf[1].seed is None, sf[1].seed or 0))
    seen: dict[int, Path] = {}
    for _, family in studies:
        if family.seed in seen:
            raise SweepError(f"{path}: {seen[family.seed].name}/ and {family.sweep.name}/ are both studies of training "
                             f"seed {family.seed}; keep one study per seed")
        seen[family.seed] = family.sweep
    picks = {f.seed: f.best() for _, f in studies}
    no_pick = sorted(s for s, run in picks.items() if run is None and s is not None)
    arm = Arm(f"search {path.name.removeprefix('search_')}", [r for r in picks.values() if r is not None])
    found = None
    unpaired = []
    if arm.runs and grid is not None:
        summary = replace(summarize(arm), cpu=Stat.of([f.cpu_s for _, f in studies]),
                          thresholds=f"chose λ {choices(r.loss_threshold for r in arm.runs)}")
        found = versus(summary, grid)  # the picks' test R@1 paired by seed; grid CPU s / the family's per seed
        unpaired = sorted(s for s in arm.by_seed("R@1") if s not in grid.by_seed)
    return Search(path.name.removeprefix("search_"), path, studies, found, unpaired, no_pick, unreadable)


def choices(lambdas, digits: int = 2) -> str:
    """``0.2 x7, 0.4 x5``: how often each lambda was chosen, to ``digits`` decimals (a TPE's are continuous)."""
    counts: dict[float, int] = {}
    for lam in lambdas:
        if lam is not None:
            key = round(float(lam), digits) + 0.0  # no -0
            counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{lam:g} x{n}" for lam, n in sorted(counts.items()))


__all__ = ["PRUNER_NAMES", "Search", "choices", "load_search"]
