"""Read a run or a sweep folder and summarize it for people: trials ranked by the objective with their
searched parameters and metrics, learning curves of the best trials and the objective against each
parameter (PNG), the best trial as a command line and as an experiment config.

A trial folder is what ``scripts/train.py`` writes: ``metrics.json``, ``.hydra/{overrides,config,
hydra}.yaml`` and TensorBoard events under ``tb/`` (``tb/<fold>/`` for k-fold). A sweep folder holds
trial folders and, for the hparams_search configs, ``budget.json``. Plain Python: PyYAML for Hydra's
files, TensorBoard's event reader for curves, matplotlib (the ``sweep`` extra) only when plotting.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass, field

import yaml

from recsys_torch.errors import RecsysError
from recsys_torch.runfolder import complete_metrics

# Metrics where lower is better; anything else (ndcg, recall, hr, ...) is maximized.
LOWER_IS_BETTER = ("rmse", "mae", "mse", "loss")
# Config groups that say how a run was observed, not what was trained: left out of experiment configs.
NOT_A_SETTING = ("logger", "hparams_search", "experiment")
# Always named by an experiment config, default or not: tuned values belong to one model.
PINNED = ("model",)


class ReportError(RecsysError):
    """The folder is not a run or a sweep, or lacks what the report needs."""


def _read_yaml(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as fh:
        return yaml.safe_load(fh)


def split_override(override: str) -> tuple[str, str]:
    """``'model.reg=0.1'`` -> ``('model.reg', '0.1')``; a leading ``+``/``++`` is dropped."""
    key, _, value = override.partition("=")
    return key.lstrip("+"), value


def scalar(text: str):
    """A Hydra override value as the YAML scalar it stands for (``1e-05`` is a float here, not a
    string as YAML 1.1 would read it)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text) if text else text


@dataclass
class Trial:
    name: str                      # folder name within the sweep ("." for a single run)
    path: str
    overrides: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    hydra: dict = field(default_factory=dict)
    metrics: dict | None = None    # None: unfinished, failed or interrupted

    @classmethod
    def read(cls, path: str, name: str) -> "Trial":
        # only a complete set of outputs counts: an old result beside a failed rerun is not the rerun's
        metrics = complete_metrics(path)
        hydra_dir = os.path.join(path, ".hydra")
        return cls(
            name=name, path=path,
            overrides=_read_yaml(os.path.join(hydra_dir, "overrides.yaml"), []) or [],
            config=_read_yaml(os.path.join(hydra_dir, "config.yaml"), {}) or {},
            hydra=(_read_yaml(os.path.join(hydra_dir, "hydra.yaml"), {}) or {}).get("hydra", {}),
            metrics=metrics,
        )

    @property
    def params(self) -> dict[str, str]:
        return dict(split_override(o) for o in self.overrides)

    def value(self, key: str) -> float | None:
        value = (self.metrics or {}).get(key)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    @property
    def choices(self) -> dict:
        return dict(self.hydra.get("runtime", {}).get("choices", {}) or {})


def _is_trial_folder(path: str) -> bool:
    return os.path.exists(os.path.join(path, "metrics.json")) or os.path.isdir(os.path.join(path, ".hydra"))


def find_trials(root: str) -> list[Trial]:
    """The run in ``root``, or the trial folders right under it (numbered ones in numeric order)."""
    if not os.path.isdir(root):
        raise ReportError(f"no such folder: {root}")
    if _is_trial_folder(root):
        return [Trial.read(root, ".")]
    names = [n for n in os.listdir(root) if _is_trial_folder(os.path.join(root, n))]
    if not names:
        raise ReportError(f"{root} is neither a run folder (metrics.json, .hydra/) nor a sweep folder holding runs")
    names.sort(key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
    return [Trial.read(os.path.join(root, n), n) for n in names]


def direction_of(metric: str) -> str:
    name = metric.rsplit("/", 1)[-1].split("@", 1)[0]
    return "minimize" if name in LOWER_IS_BETTER else "maximize"


@dataclass
class Sweep:
    root: str
    trials: list[Trial]
    objective: str
    direction: str                 # minimize | maximize
    searched: list[str]            # parameters that were searched (or differ between trials)
    budget: dict | None = None     # budget.json of the hparams_search sweeps

    def ranked(self) -> list[Trial]:
        """Trials with a finite objective, best first (ties: folder order), then the others."""
        done = [t for t in self.trials if t.value(self.objective) is not None]
        sign = 1.0 if self.direction == "minimize" else -1.0
        done.sort(key=lambda t: sign * t.value(self.objective))
        return done + [t for t in self.trials if t.value(self.objective) is None]

    @property
    def best(self) -> Trial:
        ranked = self.ranked()
        if not ranked or ranked[0].value(self.objective) is None:
            raise ReportError(f"no trial in {self.root} has a finite {self.objective} in its metrics.json")
        return ranked[0]


def searched_params(trials: list[Trial]) -> list[str]:
    """The Optuna search space keys, plus any override whose value differs between trials."""
    keys: list[str] = []
    for trial in trials:
        for key in (trial.hydra.get("sweeper", {}) or {}).get("params", {}) or {}:
            key = split_override(key)[0]  # "++model.x" searches model.x
            if key not in keys:
                keys.append(key)
    values: dict[str, set] = {}
    for trial in trials:
        for key, value in trial.params.items():
            values.setdefault(key, set()).add(value)
    for key, seen in values.items():
        differs = len(seen) > 1 or any(key not in t.params for t in trials)
        if differs and key not in keys and not key.startswith("hydra"):
            keys.append(key)
    return keys


def load(root: str, objective: str | None = None) -> Sweep:
    trials = find_trials(root)
    objective = objective or next((t.config.get("optimized_metric") or (t.metrics or {}).get("optimized_metric")
                                   for t in trials
                                   if t.config.get("optimized_metric") or (t.metrics or {}).get("optimized_metric")),
                                  None)
    if not objective:
        raise ReportError(f"no optimized_metric in {root}'s .hydra/config.yaml or metrics.json: pass the objective "
                          "explicitly (--objective)")
    direction = next((str(t.hydra["sweeper"]["direction"]) for t in trials
                      if isinstance((t.hydra.get("sweeper") or {}).get("direction"), str)), None)
    budget_path = os.path.join(root, "budget.json")
    budget = None
    if os.path.exists(budget_path):
        with open(budget_path) as fh:
            budget = json.load(fh)
    searched = searched_params(trials) if len(trials) > 1 else []
    return Sweep(root, trials, objective, direction or direction_of(objective), searched, budget)


def default_choices(defaults: list) -> dict:
    """Group -> option of a primary config's defaults list (``configs/train.yaml``)."""
    out = {}
    for entry in defaults or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                out[key.replace("optional ", "").replace("override ", "").strip()] = value
    return out


def _implied_groups(trial: Trial, defaults: dict, skip=(), pinned=()) -> dict:
    """Config group options the trial ran with that its overrides do not spell out and the primary
    config would not pick by itself (e.g. ``model=hybrid`` set by an hparams_search config)."""
    given = trial.params
    return {group: option for group, option in trial.choices.items()
            if option is not None and not group.startswith("hydra/") and group not in given
            and group not in skip and group != "hparams_search"
            and (option != defaults.get(group) or group in pinned)}


def run_overrides(trial: Trial, defaults: dict) -> list[str]:
    """Overrides that rerun ``trial`` as a single run: no sweep or hydra settings."""
    groups = [f"{g}={o}" for g, o in _implied_groups(trial, defaults).items()]
    kept = [o for o in trial.overrides if not split_override(o)[0].startswith(("hydra", "hparams_search"))]
    return groups + kept


def command(trial: Trial, defaults: dict, script: str = "scripts/train.py") -> str:
    return " ".join(["python", script, *(shlex.quote(o) for o in run_overrides(trial, defaults))])


def _nested(pairs: dict) -> dict:
    out: dict = {}
    for dotted, value in pairs.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def experiment_yaml(sweep: Sweep, trial: Trial, defaults: dict) -> str:
    """An experiment config (``# @package _global_``, deltas only) holding the trial's searched
    parameters and the config groups that define what was trained; the other overrides the sweep
    ran with are listed in a comment."""
    groups = {g: o for g, o in {**_implied_groups(trial, defaults, skip=NOT_A_SETTING, pinned=PINNED),
                                **{k: v for k, v in trial.params.items() if "." not in k}}.items()
              if g not in NOT_A_SETTING and not g.startswith("hydra")}
    params = {k: scalar(v) for k, v in trial.params.items() if k in sweep.searched and "." in k}
    rest = [o for o in trial.overrides if split_override(o)[0] not in {*params, *groups}
            and not split_override(o)[0].startswith(("hydra", "hparams_search"))]
    body: dict = {}
    if groups:
        body["defaults"] = [{f"override /{g}": o} for g, o in groups.items()]
    body.update(_nested(params))
    value = trial.value(sweep.objective)
    header = [
        "# @package _global_",
        f"# Best of {len(sweep.trials)} trials in {sweep.root}: {sweep.objective} = {value:.4f} "
        f"({sweep.direction}); written by scripts/report.py.",
    ]
    if rest:
        header.append("# The sweep also ran with: " + " ".join(rest))
    return "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def _metric_cell(trial: Trial, key: str) -> str:
    value, std = trial.value(key), trial.value(f"{key}_std")
    if value is None:
        return "—"
    return f"{value:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def table(sweep: Sweep, limit: int | None = None) -> str:
    """Markdown table of the trials, best first: objective, its test counterpart, searched
    parameters, best epoch and seconds."""
    test_key = "test/" + sweep.objective.split("/", 1)[-1]
    head = ["rank", "trial", sweep.objective, test_key, *sweep.searched, "best epoch", "seconds"]
    rows = []
    for rank, trial in enumerate(sweep.ranked()[:limit], 1):
        done = trial.value(sweep.objective) is not None
        params = trial.params
        rows.append([
            str(rank) if done else "—", trial.name, _metric_cell(trial, sweep.objective), _metric_cell(trial, test_key),
            *(_fmt(scalar(params[k])) if k in params else "—" for k in sweep.searched),
            _fmt(trial.value("best_epoch")), f"{trial.value('total_seconds') or 0:.1f}" if done else "—",
        ])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def budget_line(sweep: Sweep) -> str:
    finished = [t for t in sweep.trials if t.value(sweep.objective) is not None]
    if sweep.budget:
        b = sweep.budget
        return (f"{b['n_trials']} trials ({b['n_completed']} completed) in {len(b['sessions'])} session(s): "
                f"{b['trial_seconds']:.0f} s in trials, {b['wall_seconds']:.0f} s wall")
    seconds = sum(t.value("total_seconds") or 0.0 for t in sweep.trials)
    return f"{len(sweep.trials)} trials ({len(finished)} completed): {seconds:.0f} s in trials"


def _event_dir(trial: Trial) -> str | None:
    """The trial's TensorBoard folder; for k-fold runs, the first fold's."""
    tb = os.path.join(trial.path, "tb")
    if not os.path.isdir(tb):
        return None
    if any(n.startswith("events.out.tfevents") for n in os.listdir(tb)):
        return tb
    folds = sorted(n for n in os.listdir(tb) if os.path.isdir(os.path.join(tb, n)))
    return os.path.join(tb, folds[0]) if folds else None


def learning_curve(trial: Trial, tag: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of a scalar the trainer logged each epoch (steps >= 1: the final metrics
    that ``add_hparams`` logs at step 0 are not part of the curve)."""
    folder = _event_dir(trial)
    if folder is None:
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder, size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    return sorted((e.step, e.value) for e in acc.Scalars(tag) if e.step >= 1)


def _figure(width: float, height: float):
    # Figure without pyplot: no global state, no GUI backend, renders PNG with Agg.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_curves(sweep: Sweep, path: str, top: int = 5) -> bool:
    """Validation objective per epoch of the ``top`` best trials; False when no trial logged it."""
    curves = [(t, learning_curve(t, sweep.objective)) for t in sweep.ranked()[:top] if t.value(sweep.objective) is not None]
    curves = [(t, c) for t, c in curves if c]
    if not curves:
        return False
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    for rank, (trial, curve) in enumerate(curves, 1):
        steps, values = zip(*curve)
        ax.plot(steps, values, marker=".", label=f"#{rank} trial {trial.name}: {trial.value(sweep.objective):.4f}")
    fold = " (first fold)" if any(_event_dir(t) != os.path.join(t.path, "tb") for t, _ in curves) else ""
    ax.set(xlabel="epoch", ylabel=sweep.objective, title=f"{sweep.objective} per epoch, best {len(curves)} trials{fold}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return True


def _search_spec(sweep: Sweep, key: str) -> str:
    for trial in sweep.trials:
        for name, spec in ((trial.hydra.get("sweeper") or {}).get("params") or {}).items():
            if split_override(name)[0] == key and spec:
                return str(spec)
    return ""


def _positions(values: list, spec: str) -> tuple[list, list | None, bool]:
    """x positions, category labels (None for a numeric axis) and whether the axis is logarithmic:
    choices are categories, ``tag(log, ...)`` intervals log, other numbers log when they span 20x."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric and not spec.startswith("choice("):
        log_x = "log" in spec or (all(v > 0 for v in values) and max(values) / min(values) > 20)
        return values, None, log_x
    labels = sorted({v for v in values}, key=lambda v: (not numeric, v if numeric else str(v)))
    return [labels.index(v) for v in values], [_fmt(v) for v in labels], False


def plot_params(sweep: Sweep, path: str) -> bool:
    """The objective against each searched parameter, the best trial in red; False without any."""
    done = [t for t in sweep.trials if t.value(sweep.objective) is not None]
    keys = [k for k in sweep.searched if any(k in t.params for t in done)]
    if not keys or len(done) < 2:
        return False
    best = sweep.best
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = _figure(3.3 * cols, 2.8 * rows)
    for n, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, n + 1)
        trials = [t for t in done if key in t.params]
        xs, labels, log_x = _positions([scalar(t.params[key]) for t in trials], _search_spec(sweep, key))
        ys = [t.value(sweep.objective) for t in trials]
        ax.scatter(xs, ys, s=18, alpha=0.7)
        if best in trials:
            i = trials.index(best)
            ax.scatter([xs[i]], [ys[i]], s=60, color="red", zorder=3, label=f"best (trial {best.name})")
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels)
        if log_x:
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=sweep.objective if n % cols == 0 else None)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{sweep.objective} ({sweep.direction}) against each searched parameter")
    fig.savefig(path)
    return True


def write_report(sweep: Sweep, out_dir: str, run_command: str, top: int = 5) -> dict[str, str]:
    """``report.md`` plus ``curves.png`` and ``params.png`` (when there is something to plot) in
    ``out_dir``; returns the paths written by name."""
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    try:
        import matplotlib  # noqa: F401  (the sweep extra)
        plots = {"curves": plot_curves(sweep, os.path.join(out_dir, "curves.png"), top),
                 "params": plot_params(sweep, os.path.join(out_dir, "params.png"))}
        note = []
    except ImportError:
        plots = {"curves": False, "params": False}
        note = ["(plots need matplotlib: `pip install -e \".[sweep]\"`)", ""]
    best = sweep.best
    lines = [
        f"# {os.path.basename(os.path.abspath(sweep.root))}: {sweep.objective} ({sweep.direction})", "",
        f"- folder: `{sweep.root}`",
        f"- budget: {budget_line(sweep)}",
        f"- best: trial {best.name}, {sweep.objective} = {_metric_cell(best, sweep.objective)}", "",
        "```", run_command, "```", "",
        table(sweep), "",
    ]
    if plots["curves"]:
        lines += [f"![{sweep.objective} per epoch of the best trials](curves.png)", ""]
    if plots["params"]:
        lines += [f"![{sweep.objective} against each searched parameter](params.png)", ""]
    lines += note
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    written["report"] = path
    written.update({name: os.path.join(out_dir, f"{name}.png") for name, made in plots.items() if made})
    return written
