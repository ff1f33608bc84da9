"""Reading a Hydra multirun: one :class:`Run` per job dir, grouped into :class:`Arm` s (runs that differ
only in their seed).

A sweep dir (``multirun/<task_name>/<date>_<time>``) holds Hydra's ``multirun.yaml`` and one sub-dir per
job with ``.hydra/`` (config, overrides, choices), ``metrics.json`` (written by ``train.py`` when the run
finished) and ``csv/metrics.csv`` (every training step: ``train/lambda``, ``mining/*``). A job dir
without ``metrics.json`` is a failed (or unfinished) run: reported, never fatal.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from ddtas_lightning.report.kinds import class_name, run_kind

SWEEP_MARKER = "multirun.yaml"  # Hydra writes it into the sweep dir before the first job starts
# Per-step curves the report plots (CSV logger columns).
CURVES = ("train/lambda", "train/margin", "mining/ratio", "mining/tolerance", "mining/gamma_pos", "mining/gamma_neg")


class SweepError(ValueError):
    """The directory cannot be compared (missing, empty, not a sweep); the message says why."""


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "metrics.json").is_file() or (path / ".hydra").is_dir())


def _sort_key(path: Path) -> tuple:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def run_dirs(sweep: Path) -> list[Path]:
    """The job dirs of a sweep, in job-number order."""
    return sorted((p for p in sweep.iterdir() if _is_run_dir(p)), key=_sort_key)


def find_sweep(path: Path) -> Path:
    """The sweep dir to read: ``path`` itself when it is one, else the newest sweep below it (so
    ``multirun/<task_name>`` means its latest sweep). Raises :class:`SweepError` otherwise."""
    if not path.exists():
        raise SweepError(f"{path} does not exist (a sweep dir: multirun/<task_name>/<date>_<time>; "
                         "`make sweep` makes multirun/threshold_grid/...)")
    if not path.is_dir():
        raise SweepError(f"{path} is not a directory (expected a sweep dir, multirun/<task_name>/<date>_<time>)")
    if (path / SWEEP_MARKER).is_file():
        return path
    jobs = run_dirs(path)
    if jobs:
        single = [p for p in jobs if _hydra_mode(p) == "RUN"]
        if single or not any(p.name.isdigit() for p in jobs):
            raise SweepError(
                f"{path} holds single runs ({len(jobs)}, e.g. {jobs[0].name}), not a sweep: compare reads one Hydra "
                "multirun (multirun/<task_name>/<date>_<time>, with multirun.yaml and one numbered dir per job, made "
                "by `python -m ddtas_lightning.train -m ...` or `make sweep`), whose jobs differ only in the swept "
                "values; separate runs may differ in loss, miner, data or length and are no grid")
        return path
    if not any(path.iterdir()):
        raise SweepError(f"{path} is empty: no sweep to compare (start one with `make sweep`)")
    sweeps = [p.parent for p in path.glob(f"*/{SWEEP_MARKER}")]
    if sweeps:
        return max(sweeps, key=lambda p: ((p / SWEEP_MARKER).stat().st_mtime, p.name))
    if (path / ".hydra").is_dir() or (path / "metrics.json").is_file():
        raise SweepError(f"{path} is a single run, not a sweep: compare reads a multirun dir "
                         "(multirun/<task_name>/<date>_<time>, made by `train -m`)")
    raise SweepError(f"{path} is not a Hydra sweep: no {SWEEP_MARKER} and no job sub-directories with "
                     "metrics.json or .hydra/ (expected multirun/<task_name>/<date>_<time>)")


def _hydra_mode(run: Path) -> str | None:
    """``hydra.mode`` of a job dir (``RUN`` for a single run, ``MULTIRUN`` for a sweep's job), or None."""
    mode = _select(_load_yaml(run / ".hydra" / "hydra.yaml"), "hydra.mode")
    return None if mode is None else str(mode).rsplit(".", 1)[-1]


def _load_yaml(path: Path) -> DictConfig | None:
    cfg = _load_any(path)
    return cfg if isinstance(cfg, DictConfig) else None


def _load_any(path: Path):
    try:
        return OmegaConf.load(path)
    except Exception:  # absent or unreadable: the run is still reported, with fewer details
        return None


def _select(cfg: DictConfig | None, key: str):
    """A config value without resolving the rest (``${hydra:...}`` cannot be resolved outside a run)."""
    if cfg is None:
        return None
    value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value


def _last_error_line(run: Path) -> str | None:
    """The last line of the job's log files that names an error, to say why a run failed."""
    found = None
    for log in sorted(run.glob("*.log")):
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if "error" in line.lower() or "exception" in line.lower() or "traceback" in line.lower():
                found = line.strip()
    return found


# metrics.json fields the report reads as numbers (a nested key: "split/name").
NUMERIC_FIELDS = ("wall_time_s", "train_time_s", "best_val_R@1", "global_steps")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def malformed(metrics) -> str | None:
    """Why a parsed metrics.json cannot be read as a run's result (None: it can)."""
    if not isinstance(metrics, dict):
        return f"expected a JSON object (train.py writes one), got a {type(metrics).__name__}"
    for key in NUMERIC_FIELDS:
        if key in metrics and metrics[key] is not None and not _is_number(metrics[key]):
            return f"{key} is {metrics[key]!r}, expected a number"
    for split in ("test", "val", "val_at_best"):
        values = metrics.get(split, {})
        if not isinstance(values, dict):
            return f"{split} is {values!r}, expected an object of metric: number"
        bad = [k for k, v in values.items() if not _is_number(v)]
        if bad:
            return f"{split}.{bad[0]} is {values[bad[0]]!r}, expected a number"
    if not isinstance(metrics.get("compute", {}), dict):
        return f"compute is {metrics['compute']!r}, expected an object"
    return None


@dataclass
class Run:
    """One job of the sweep. ``metrics`` is None when the run did not finish (``error`` says why)."""

    path: Path
    overrides: tuple[str, ...]
    metrics: dict | None
    error: str | None
    config: DictConfig | None = field(repr=False, default=None)
    choices: dict = field(default_factory=dict)  # Hydra's group choices (hydra.runtime.choices)

    @classmethod
    def load(cls, path: Path) -> Run:
        hydra_dir = path / ".hydra"
        config = _load_yaml(hydra_dir / "config.yaml")
        hydra_cfg = _load_yaml(hydra_dir / "hydra.yaml")
        choices = _select(hydra_cfg, "hydra.runtime.choices") or {}
        metrics, error = None, None
        metrics_path = path / "metrics.json"
        if metrics_path.is_file():
            try:
                metrics = json.loads(metrics_path.read_text())
            except (OSError, ValueError) as exc:
                error = f"metrics.json unreadable: {exc}"
            else:
                problem = malformed(metrics)
                if problem:
                    metrics, error = None, f"metrics.json malformed: {problem}"
        else:
            cause = _last_error_line(path)
            error = "no metrics.json (the run failed or did not finish)" + (f": {cause}" if cause else "")
        record = metrics
        if metrics is not None and metrics.get("status") == "not_trained":  # every update skipped: failed
            error = f"not trained: {metrics.get('error') or 'every update was skipped (non-finite)'}"
            metrics = None
        elif metrics is not None and metrics.get("status") == "pruned":  # metrics kept: its compute counts
            error = f"pruned by the Optuna study at validation {(metrics.get('pruned') or {}).get('at_validation')}"
        if record is not None and "overrides" in record:
            overrides = record["overrides"]
        else:
            listed = _load_any(hydra_dir / "overrides.yaml")
            overrides = OmegaConf.to_container(listed) if isinstance(listed, ListConfig) else []
        return cls(path, tuple(str(o) for o in overrides or ()), metrics, error, config, dict(choices))

    @property
    def ok(self) -> bool:
        """Finished with a result (a pruned trial's metrics.json records only its compute and validations)."""
        return self.metrics is not None and not self.pruned

    @property
    def pruned(self) -> bool:
        """A trial an Optuna pruner stopped (``"status": "pruned"``; hydra.sweeper.pruner)."""
        return self.metrics is not None and self.metrics.get("status") == "pruned"

    @property
    def seed(self) -> int | None:
        if self.metrics and "seed" in self.metrics:
            return int(self.metrics["seed"])
        for o in self.overrides:
            if o.startswith("seed="):
                return int(o.split("=", 1)[1])
        seed = _select(self.config, "seed")
        return None if seed is None else int(seed)

    @property
    def policy_target(self) -> str | None:
        return _select(self.config, "threshold_policy._target_") or (self.metrics or {}).get("choices", {}).get(
            "threshold_policy")

    @property
    def miner_target(self) -> str | None:
        return _select(self.config, "miner._target_") or (self.metrics or {}).get("choices", {}).get("miner")

    @property
    def kind(self) -> str:
        return run_kind(self.policy_target, self.miner_target)

    @property
    def policy(self) -> str:
        """``<threshold_policy choice> + <miner choice>``, e.g. ``meta + asms``."""
        policy = self.choices.get("threshold_policy") or class_name(self.policy_target)
        miner = self.choices.get("miner") or class_name(self.miner_target)
        return f"{policy} + {miner}"

    @property
    def loss_threshold(self) -> float | None:
        value = (self.metrics or {}).get("loss_threshold", _select(self.config, "loss.threshold"))
        return None if value is None else float(value)

    @property
    def margin(self) -> float | None:
        """The miner's margin (ASMS, AT-ASMS: ``margin``; MS mining: ``epsilon``)."""
        for key in ("miner.margin", "miner.epsilon"):
            value = _select(self.config, key)
            if isinstance(value, int | float):
                return float(value)
        return None

    def metric(self, name: str) -> float:
        """``test/<name>`` of the best checkpoint, else the last ``val/<name>``; NaN when absent."""
        for split in ("test", "val"):
            value = (self.metrics or {}).get(split, {}).get(f"{split}/{name}")
            if value is not None:
                return float(value)
        return math.nan

    def val_metric(self, name: str) -> float:
        """Validation ``name`` of the selected checkpoint (the model-selection signal); NaN when absent."""
        m = self.metrics or {}
        value = m.get("val_at_best", {}).get(f"val/{name}")
        if value is None and name == "R@1":
            value = m.get("best_val_R@1")
        if value is None:
            value = m.get("val", {}).get(f"val/{name}")
        return math.nan if value is None else float(value)

    def test_metric(self, name: str) -> float:
        value = (self.metrics or {}).get("test", {}).get(f"test/{name}")
        return math.nan if value is None else float(value)

    @property
    def selection(self) -> str:
        """Where the run chose its checkpoint: "val" (held-out train classes) or "test" (papers' protocol).
        Runs from before the protocol existed validated on the test split unless val_fraction > 0."""
        m = self.metrics or {}
        if "selection" in m:
            return str(m["selection"])
        fraction = _select(self.config, "data.val_fraction")
        return "val" if isinstance(fraction, int | float) and fraction > 0 else "test"

    @property
    def wall_time_s(self) -> float:
        return float((self.metrics or {}).get("wall_time_s", math.nan))

    @property
    def compute(self) -> dict:
        return (self.metrics or {}).get("compute") or {}

    @property
    def cpu_s(self) -> float:
        """CPU seconds of training with its validations (what picking a grid point costs); NaN if unknown."""
        value = self.compute.get("fit_cpu_s")
        return math.nan if value is None else float(value)

    @property
    def gpu_s(self) -> float:
        value = self.compute.get("fit_gpu_s")
        return math.nan if value is None else float(value)

    @property
    def train_passes(self) -> float:
        """Images through the model in training, forward plus backward (a forward-mode pass counts as
        a forward): the hardware-independent count of work."""
        counts = self.compute.get("passes", {}).get("train")
        if not counts:
            return math.nan
        return float(counts.get("forward_images", 0) + counts.get("backward_images", 0))

    @cached_property
    def per_query(self) -> dict | None:
        """``per_query_test.npz`` (ids, R@1, MAP@R of every test query), or None."""
        path = self.path / "per_query_test.npz"
        if not path.is_file():
            return None
        try:
            import numpy as np

            with np.load(path, allow_pickle=False) as data:  # object arrays are pickles: refused
                return {k: data[k] for k in data.files}
        except (OSError, ValueError):
            return None

    @property
    def loss(self) -> str | None:
        """The loss class (``MultiSimilarityLoss``; a PML loss with its name: ``PMLLoss(ArcFaceLoss)``)."""
        choices = (self.metrics or {}).get("choices", {})
        loss = choices.get("loss") or class_name(_select(self.config, "loss._target_"))
        name = _select(self.config, "loss.name")
        return f"{loss}({name})" if loss and isinstance(name, str) and loss.startswith("PML") else loss

    @property
    def protocol(self) -> tuple:
        """What must be equal for two runs to be compared: dataset, backbone, run length, loss (arms differ
        in thresholds, miners and policies; runs of another loss, e.g. ArcFace or NSPA's triplet loss beside
        MS, are no points of the same grid)."""
        choices = (self.metrics or {}).get("choices", {})
        dataset = choices.get("dataset") or _select(self.config, "dataset.name")
        backbone = choices.get("backbone") or _select(self.config, "backbone.model_name")
        length = tuple(_select(self.config, k) for k in ("trainer.max_epochs", "trainer.max_steps",
                                                          "data.batches_per_epoch"))
        return dataset, backbone, length, self.loss

    @cached_property
    def curves(self) -> dict[str, list[tuple[int, float]]]:
        """Per-step values of :data:`CURVES` from the CSV logger (empty when the run has no CSV log)."""
        out: dict[str, list[tuple[int, float]]] = {}
        files = sorted(self.path.glob("csv/**/metrics.csv")) or sorted(self.path.glob("**/metrics.csv"))
        if not files:
            return out
        with files[0].open(newline="") as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                for key in CURVES:
                    value = row.get(key)
                    if step not in (None, "") and value not in (None, ""):
                        out.setdefault(key, []).append((int(float(step)), float(value)))
        return out


@dataclass
class Arm:
    """The runs of one configuration (the same overrides apart from ``seed``)."""

    label: str
    runs: list[Run]

    @property
    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    @property
    def failed_runs(self) -> list[Run]:
        return [r for r in self.runs if not r.ok]

    @property
    def first(self) -> Run:
        """The run whose config describes the arm (a finished one when there is one)."""
        return (self.ok_runs or self.runs)[0]

    @property
    def kind(self) -> str:
        return self.first.kind

    def values(self, name: str) -> list[float]:
        return [v for v in (r.metric(name) for r in self.ok_runs) if not math.isnan(v)]

    def by_seed(self, name: str) -> dict[int, float]:
        return {r.seed: r.metric(name) for r in self.ok_runs if r.seed is not None}


def load_sweep(sweep: Path) -> list[Run]:
    runs = [Run.load(p) for p in run_dirs(sweep)]
    if not runs:
        raise SweepError(f"{sweep} holds no runs yet: {SWEEP_MARKER} but no job sub-directories "
                         "(did the sweep start any job?)")
    return runs


def _key_value(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


LABEL_VALUE_CHARS = 14  # an override's value in an arm label, at most (longer: cut with "…")


def _short(override: str, keys: set[str]) -> str:
    """``loss.threshold=0.3`` -> ``threshold=0.3``: the key's last part, unless another varying key of the
    sweep ends the same way; a long value cut to :data:`LABEL_VALUE_CHARS`."""
    key, value = _key_value(override)
    last = key.rsplit(".", 1)[-1]
    name = last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key
    if len(value) > LABEL_VALUE_CHARS:
        value = value[:LABEL_VALUE_CHARS - 1] + "…"
    return f"{name}={value}"


def group_arms(runs: list[Run]) -> list[Arm]:
    """Groups runs whose overrides differ only in ``seed``; an arm's label is what sets it apart from the
    other arms, abbreviated (``arm=meta`` -> ``meta``, ``loss.threshold=0.3`` -> ``threshold=0.3``, long
    values cut; the full overrides when that would make two labels equal), in the order the sweep ran them."""
    keyed = [(r, tuple(sorted(o for o in r.overrides if _key_value(o)[0] != "seed"))) for r in runs]
    common = set.intersection(*(set(k) for _, k in keyed)) if keyed else set()
    varying = {_key_value(o)[0] for _, k in keyed for o in k if o not in common}
    arms: dict[tuple[str, ...], Arm] = {}
    full: dict[tuple[str, ...], str] = {}
    for run, key in keyed:
        distinct = [o for o in run.overrides if o not in common and _key_value(o)[0] != "seed"]
        if distinct and all(_key_value(o)[0] == "arm" for o in distinct):
            label = " ".join(_key_value(o)[1] for o in distinct)
        else:
            label = " ".join(_short(o, varying) for o in distinct) or "(all runs)"
        full.setdefault(key, " ".join(distinct) or "(all runs)")
        arms.setdefault(key, Arm(label, [])).runs.append(run)
    labels = [a.label for a in arms.values()]
    for key, arm in arms.items():
        if labels.count(arm.label) > 1:  # abbreviations that collide: the full overrides
            arm.label = full[key]
    return list(arms.values())


OPTUNA_MARKER = "optuna.json"  # hydra/sweeper=tpe writes it into its sweep dir


def is_optuna_sweep(sweep: Path) -> bool:
    return (sweep / OPTUNA_MARKER).is_file()


def load_optuna(sweep: Path) -> tuple[dict, list[Run]]:
    """An Optuna (TPE) sweep: its study record and its trials' runs in trial order (a trial without a
    job dir, e.g. one the sweep never launched, is left out)."""
    try:
        study = json.loads((sweep / OPTUNA_MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise SweepError(f"{sweep / OPTUNA_MARKER} is unreadable ({exc}); it is written by hydra/sweeper=tpe") from None
    if not isinstance(study, dict) or not isinstance(study.get("trials"), list):
        raise SweepError(f"{sweep / OPTUNA_MARKER} is not an Optuna study record (expected an object with 'trials')")
    runs = []
    for trial in sorted(study["trials"], key=lambda t: int(t.get("number", 0))):
        path = sweep / str(trial.get("number"))
        if path.is_dir():
            runs.append(Run.load(path))
    return study, runs
