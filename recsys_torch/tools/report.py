"""Read a run or a sweep folder and summarize it for people.

A sweep: trials ranked by the objective with their searched parameters and metrics, learning curves
of the best trials and the objective against each parameter (PNG), the best trial as a command line
and as an experiment config. A single run (:func:`load_run`, :func:`write_run_report`): its headline
metrics, loss and validation per epoch with the early-stopping point, and where the errors are (rating
runs: test RMSE by user activity and item popularity) or what gets recommended (ranking runs: the
popularity of the top-K items against the catalog, coverage), from its model rebuilt from
``checkpoint.pt`` and its split rebuilt from the config inside it.

A trial folder is what ``scripts/train.py`` writes: ``metrics.json``, ``.hydra/{overrides,config,
hydra}.yaml`` and TensorBoard events under ``tb/`` (``tb/<fold>/`` for k-fold); a run made through the
Python API has no ``.hydra/``. A sweep folder holds trial folders and, for the hparams_search configs,
``budget.json``. PyYAML for Hydra's files, TensorBoard's event reader for curves, torch only to rebuild
a run, matplotlib (the ``sweep`` extra) only when plotting.
"""

from __future__ import annotations

import json
import math
import os
import re
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
    try:
        with open(path) as fh:
            return yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ReportError(f"cannot read {path}: {reason}") from None


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
        overrides = _read_yaml(os.path.join(hydra_dir, "overrides.yaml"), [])
        config = _read_yaml(os.path.join(hydra_dir, "config.yaml"), {})
        hydra = _read_yaml(os.path.join(hydra_dir, "hydra.yaml"), {})
        hydra = hydra.get("hydra") if isinstance(hydra, dict) else None
        return cls(
            name=name, path=path,
            overrides=[str(o) for o in overrides] if isinstance(overrides, list) else [],
            config=config if isinstance(config, dict) else {},
            hydra=hydra if isinstance(hydra, dict) else {},
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
    budget_unreadable: bool = False  # a budget.json that is there but cannot be read

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
    named = (name for t in trials for name in (t.config.get("optimized_metric"), (t.metrics or {}).get("optimized_metric")))
    objective = objective or next((name for name in named if isinstance(name, str) and name), None)
    if not objective:
        raise ReportError(f"no optimized_metric in {root}'s .hydra/config.yaml or metrics.json: pass the objective "
                          "explicitly (--objective)")
    direction = next((str(t.hydra["sweeper"]["direction"]) for t in trials
                      if isinstance((t.hydra.get("sweeper") or {}).get("direction"), str)), None)
    budget_path = os.path.join(root, "budget.json")
    budget = read_budget(budget_path) if os.path.exists(budget_path) else None
    searched = searched_params(trials) if len(trials) > 1 else []
    return Sweep(root, trials, objective, direction or direction_of(objective), searched, budget,
                 budget_unreadable=os.path.exists(budget_path) and budget is None)


def read_budget(path: str) -> dict | None:
    """``budget.json`` of an hparams_search sweep; None when it is unreadable or not a budget record
    (the report then counts the trial folders instead)."""
    try:
        with open(path) as fh:
            budget = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(budget, dict) or not isinstance(budget.get("sessions"), list):
        return None
    numbers = ("n_trials", "n_completed", "trial_seconds", "wall_seconds")
    if not all(isinstance(budget.get(k), (int, float)) and not isinstance(budget.get(k), bool) for k in numbers):
        return None
    return budget


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
    return (f"{len(sweep.trials)} trials ({len(finished)} completed): {seconds:.0f} s in trials"
            + (" (budget.json unreadable)" if sweep.budget_unreadable else ""))


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


_INTERVAL = re.compile(r"interval\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)")
_CHOICE = re.compile(r"^\s*choice\((.*)\)\s*$")


def _spec_interval(spec: str) -> tuple[float, float] | None:
    """The bounds of an ``interval(a, b)`` search range (inside ``tag(log, ...)`` too)."""
    found = _INTERVAL.search(spec or "")
    if not found:
        return None
    try:
        low, high = float(found.group(1)), float(found.group(2))
    except ValueError:
        return None
    return (low, high) if math.isfinite(low) and math.isfinite(high) and low < high else None


def _spec_choices(spec: str) -> list:
    """The options of a ``choice(a, b, ...)`` search space of scalars ([] for anything else)."""
    found = _CHOICE.match(spec or "")
    if not found or any(c in found.group(1) for c in "[]{}()"):
        return []
    try:
        return [scalar(part.strip()) for part in found.group(1).split(",") if part.strip()]
    except yaml.YAMLError:
        return []


def _positions(values: list, spec: str) -> tuple[list, list | None, bool]:
    """x positions, category labels (None for a numeric axis) and whether the axis is logarithmic:
    choices are categories (every choice of the search space, tried or not), ``tag(log, ...)``
    intervals log, other numbers log when they span 20x."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric and not spec.lstrip().startswith("choice("):
        log_x = "log" in spec or (all(v > 0 for v in values) and max(values) / min(values) > 20)
        return values, None, log_x and all(v > 0 for v in values)
    options = {repr(v): v for v in [*values, *_spec_choices(spec)]}  # lists too (unhashable)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in options.values())
    order = sorted(options, key=lambda k: (not numeric, options[k] if numeric else str(options[k])))
    return [order.index(repr(v)) for v in values], [_fmt(options[k]) for k in order], False


def _tick_label(value: float, _pos=None) -> str:
    return f"{value:.6g}"


def log_ticks(low: float, high: float, max_ticks: int = 5) -> list[float]:
    """Major ticks for a log axis from ``low`` to ``high``, at most ``max_ticks`` of them (so their
    labels fit): 1, 2, 3 ... 9 times a power of ten on a short axis, 1-2-5 or 1-3 steps on a longer
    one, powers of ten (every n-th) across many decades. Fewer than two within the axis: []."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    for subs in ((1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 5), (1, 3), (1,)):
        ticks = [m * 10.0 ** e for e in range(first, last + 1) for m in subs]
        ticks = [float(f"{t:.12g}") for t in ticks if low * (1 - 1e-9) <= t <= high * (1 + 1e-9)]
        if len(ticks) <= max_ticks:
            return ticks if len(ticks) >= 2 else []
    step = math.ceil(len(ticks) / max_ticks)
    return ticks[::step]


def _style_log_axis(ax, low: float, high: float) -> None:
    """Tick labels that never run into each other on a log x axis, however short its span: chosen
    ticks (:func:`log_ticks`) with plain labels, unlabeled minor ticks; a span too short for two
    such ticks gets three evenly spaced plain numbers."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    ticks = log_ticks(low, high)
    ax.xaxis.set_major_locator(FixedLocator(ticks) if ticks else MaxNLocator(nbins=3, min_n_ticks=2))
    ax.xaxis.set_major_formatter(FuncFormatter(_tick_label))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs="auto"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def params_figure(sweep: Sweep):
    """The figure of :func:`plot_params`, or None when there is nothing to plot."""
    done = [t for t in sweep.trials if t.value(sweep.objective) is not None]
    keys = [k for k in sweep.searched if any(k in t.params for t in done)]
    if not keys or len(done) < 2:
        return None
    best = sweep.best
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = _figure(3.3 * cols, 2.8 * rows + 0.35)
    handles = {}
    for n, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, n + 1)
        trials = [t for t in done if key in t.params]
        spec = _search_spec(sweep, key)
        xs, labels, log_x = _positions([scalar(t.params[key]) for t in trials], spec)
        ys = [t.value(sweep.objective) for t in trials]
        handles["trial"] = ax.scatter(xs, ys, s=18, alpha=0.7, color="tab:blue")
        if best in trials:
            i = trials.index(best)
            handles["best"] = ax.scatter([xs[i]], [ys[i]], s=60, color="red", zorder=3)
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            # the searched range, when the search config gives one: where the trials fell within it
            bounds = _spec_interval(spec)
            low, high = min(xs), max(xs)
            if bounds and (not log_x or bounds[0] > 0):
                low, high = min(low, bounds[0]), max(high, bounds[1])
            if log_x:
                pad = (high / low) ** 0.04 if high > low else 1.5
                ax.set_xscale("log")
                ax.set_xlim(low / pad, high * pad)
                _style_log_axis(ax, low / pad, high * pad)
            elif high > low:
                pad = 0.04 * (high - low)
                ax.set_xlim(low - pad, high + pad)
        ax.set(xlabel=key, ylabel=sweep.objective if n % cols == 0 else None)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{sweep.objective} ({sweep.direction}) against each searched parameter")
    labels = {"trial": f"one trial ({len(done)} finished)",
              "best": f"the best: trial {best.name}, {sweep.objective} = {best.value(sweep.objective):.4f}"}
    fig.legend([handles[k] for k in handles], [labels[k] for k in handles], loc="outside lower center",
               ncols=len(handles), frameon=False, fontsize=9)
    return fig


def plot_params(sweep: Sweep, path: str) -> bool:
    """The objective against each searched parameter, the best trial in red; False without any."""
    fig = params_figure(sweep)
    if fig is None:
        return False
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


# ---- a single run: learning curves, where the errors are, what gets recommended ------------------
CHECKPOINT_NAME = "checkpoint.pt"
RUN_MARKERS = ("metrics.json", "run.json", CHECKPOINT_NAME, ".hydra")


def is_run_folder(path: str) -> bool:
    """A folder that ``train.train`` wrote (or began to write): not a sweep folder holding runs."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name)) for name in RUN_MARKERS)


@dataclass
class Run:
    """One run folder: its metrics (a complete set only), config and checkpoint."""
    path: str
    metrics: dict
    config: dict                   # the resolved config (checkpoint.pt, else .hydra/config.yaml)
    checkpoint: dict | None        # checkpoint.pt, loaded; None when absent or unreadable
    trial: Trial
    notes: list[str] = field(default_factory=list)   # what the report could not do, and why

    @property
    def task(self) -> str:
        target = str(((self.config.get("task") or {}).get("_target_")) or "")
        return "ranking" if target.endswith("RankingTask") else "rating"

    @property
    def first_fold(self) -> dict:
        """The metrics of the split the checkpoint holds (the first fold of k-fold runs)."""
        folds = self.metrics.get("folds")
        return folds[0] if isinstance(folds, list) and folds and isinstance(folds[0], dict) else self.metrics

    @property
    def monitor(self) -> str:
        """The validation metric early stopping watched."""
        task = self.config.get("task") or {}
        if self.task == "ranking":
            ks = task.get("ks") or [10]
            return "val/" + str(task.get("monitor") or f"ndcg@{sorted(int(k) for k in ks)[0]}")
        return "val/rmse"

    @property
    def k(self) -> int:
        ks = sorted(int(k) for k in (self.config.get("task") or {}).get("ks") or [10])
        return 10 if 10 in ks else ks[0]

    @property
    def refit(self) -> bool:
        """Whether the model was retrained on train + val (``trainer.refit``; metrics.json has no flag
        for it). The checkpoint's training rows say it for sure: a model that cannot be trained (the
        popularity baseline) is never refit."""
        n_train, n_val = self.first_fold.get("n_train"), self.first_fold.get("n_val")
        users = ((self.checkpoint or {}).get("train") or {}).get("users")
        if users is not None and hasattr(users, "__len__") and n_val:
            return len(users) == n_train + n_val
        return bool((self.config.get("trainer") or {}).get("refit")) and bool(n_val)


def _why_incomplete(path: str) -> str:
    from recsys_torch.runfolder import read_manifest

    manifest = read_manifest(path)
    if manifest is not None and manifest.get("status") == "failed":
        return f"run.json says it failed: {manifest.get('error') or 'no reason recorded'}"
    if manifest is not None and manifest.get("status") != "complete":
        return f"run.json says {manifest.get('status')!r}: still running, or killed"
    if not os.path.exists(os.path.join(path, "metrics.json")):
        return "it has no metrics.json"
    return "its metrics.json is unreadable, not a JSON object, or from another run than run.json names"


def load_run(path: str) -> Run:
    """The run in ``path``; :class:`ReportError` (one line) when it is not a run or not complete."""
    if not os.path.isdir(path):
        raise ReportError(f"no such folder: {path}")
    if not is_run_folder(path):
        raise ReportError(f"{path} is not a run folder (no metrics.json, run.json, checkpoint.pt or .hydra/)")
    metrics = complete_metrics(path)
    if metrics is None:
        raise ReportError(f"{path} holds no complete run: {_why_incomplete(path)}")
    trial = Trial.read(path, ".")
    notes: list[str] = []
    checkpoint = None
    if os.path.exists(os.path.join(path, CHECKPOINT_NAME)):
        from recsys_torch.checkpoint import load_checkpoint

        try:
            checkpoint = load_checkpoint(os.path.join(path, CHECKPOINT_NAME))
        except RecsysError as exc:
            notes.append(f"checkpoint.pt unreadable ({exc}): no analysis of predictions")
    else:
        notes.append("no checkpoint.pt: no analysis of predictions")
    config = (checkpoint or {}).get("config") or trial.config or {}
    return Run(path, metrics, config if isinstance(config, dict) else {}, checkpoint, trial, notes)


# -- learning curves
def _scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard folder as ``(step, value)`` for steps >= 1 (the final metrics
    that ``add_hparams`` logs at step 0 are not part of a curve); a step logged twice (a resumed
    run) keeps its last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder, size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        points = {e.step: e.value for e in acc.Scalars(tag) if e.step >= 1}
        out[tag] = sorted(points.items())
    return out


def _history_file(run: Run, refit: bool) -> str | None:
    """The finished training state of the first fit (or its refit): ``last.pt``, ``last-<fold>.pt``."""
    names = sorted(n for n in os.listdir(run.path) if n.startswith("last") and n.endswith(".pt")
                   and n.endswith("-refit.pt") == refit)
    return os.path.join(run.path, names[0]) if names else None


def _saved_history(path: str | None) -> list[dict]:
    if path is None:
        return []
    from recsys_torch.io import safe_torch_load

    try:
        state = safe_torch_load(path)
    except RecsysError:
        return []
    history = (state.get("result") or {}).get("history") if isinstance(state, dict) else None
    return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []


def run_curves(run: Run) -> tuple[dict[str, list[tuple[int, float]]], str]:
    """``train/loss``, the monitored ``val/...`` metric and, after a refit, ``refit/train/loss`` per
    epoch, and where they came from: the run's TensorBoard events (the first fold's for k-fold), else
    the finished training states (``last*.pt``) a run without a logger keeps."""
    wanted = ("train/loss", run.monitor, "refit/train/loss")
    folder = _event_dir(run.trial)
    if folder is not None:
        try:
            scalars = _scalars(folder)
        except Exception as exc:  # noqa: BLE001 -- a damaged event file: say so, fall back
            run.notes.append(f"TensorBoard events in {folder} unreadable ({type(exc).__name__})")
            scalars = {}
        curves = {tag: scalars[tag] for tag in wanted if scalars.get(tag)}
        if curves:
            return curves, os.path.relpath(folder, run.path)
    curves = {}
    sources = ((False, {"train/loss": "train/loss", run.monitor: run.monitor}),
               (True, {"refit/train/loss": "train/loss"}))
    for refit, tags in sources:
        for record in _saved_history(_history_file(run, refit)):
            for tag, key in tags.items():
                value = record.get(key)
                if isinstance(value, (int, float)) and isinstance(record.get("epoch"), int):
                    curves.setdefault(tag, []).append((record["epoch"], float(value)))
    return curves, "last*.pt"


def _best_epoch(run: Run, curves: dict) -> int | None:
    best = run.first_fold.get("best_epoch")
    if isinstance(best, (int, float)) and best >= 1 and float(best).is_integer():
        return int(best)
    val = curves.get(run.monitor)
    if not val:
        return None
    pick = min if direction_of(run.monitor) == "minimize" else max
    return pick(val, key=lambda point: point[1])[0]


def _zoom_on_tail(ax, values: list[float], direction: str) -> None:
    """When the first epochs dwarf the rest (a validation curve that falls fast, then flattens), cut
    the y axis so that the flat part where early stopping decides stays readable; the cut-off epochs
    leave through the top (bottom, for a maximized metric) and the title says so."""
    if len(values) < 6:
        return
    tail = values[len(values) // 3:]
    full = max(values) - min(values)
    part = max(tail) - min(tail)
    if full <= 0 or part >= 0.25 * full:
        return
    part = max(part, 1e-3 * max(abs(min(tail)), 1e-9))
    low, high = min(tail) - 0.4 * part, max(tail) + 0.4 * part
    if direction == "minimize":
        high = max(high, min(tail) + 3 * part)
    else:
        low = min(low, max(tail) - 3 * part)
    outside = [i + 1 for i, v in enumerate(values) if not low <= v <= high]
    if not outside:
        return
    ax.set_ylim(low, high)
    where = "above" if direction == "minimize" else "below"
    span = f"{outside[0]}–{outside[-1]}" if len(outside) > 1 else f"{outside[0]}"
    ax.set_title(f"{ax.get_title()}\nzoomed: epoch{'s' if len(outside) > 1 else ''} {span} {where} the axis",
                 fontsize=10)


def plot_learning(run: Run, curves: dict, path: str) -> bool:
    """Training loss (and the refit's) and the monitored validation metric per epoch, the epoch early
    stopping kept marked on both; False when the run logged neither."""
    loss = [(tag, curves[tag]) for tag in ("train/loss", "refit/train/loss") if curves.get(tag)]
    val = curves.get(run.monitor)
    if not loss and not val:
        return False
    best = _best_epoch(run, curves)
    fig = _figure(9.0, 3.6)
    axes = fig.subplots(1, 2)
    styles = {"train/loss": dict(color="tab:blue", marker="."), "refit/train/loss": dict(color="tab:green", ls="--")}
    names = {"train/loss": "training loss (train)", "refit/train/loss": "refit loss (train + val)"}
    for tag, curve in loss:
        axes[0].plot(*zip(*curve), label=names[tag], **styles[tag])
    axes[0].set(xlabel="epoch", ylabel="loss", title="training loss per epoch")
    if val:
        axes[1].plot(*zip(*val), color="tab:orange", marker=".", label=run.monitor)
        at = dict(val).get(best) if best else None
        if at is not None:
            axes[1].scatter([best], [at], s=70, color="red", zorder=3, label=f"kept: epoch {best}, {at:.4f}")
    axes[1].set(xlabel="epoch", ylabel=run.monitor, title=f"{run.monitor} per epoch (early stopping)")
    if val:
        _zoom_on_tail(axes[1], [v for _, v in val], direction_of(run.monitor))
    for ax in axes:
        if best:
            ax.axvline(best, color="red", ls=":", lw=1, label=None if ax is axes[1] else f"best epoch {best}")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fold = " (first fold)" if isinstance(run.metrics.get("folds"), list) else ""
    fig.suptitle(f"learning curves{fold}: {_what(run)}")
    fig.savefig(path)
    return True


# -- predictions: rebuild the run's model, data and split
@dataclass
class Rebuilt:
    model: object
    test: object                   # Interactions: the test part of the first split
    val: object
    trained_on: object             # what the model learned from: train, or train + val after a refit
    refit: bool


def rebuild(run: Run) -> Rebuilt:
    """The run's model from checkpoint.pt and its split from its config (``train.build``, as the run
    built it); :class:`ReportError` when the data no longer gives the split the model was trained on."""
    from omegaconf import OmegaConf

    from recsys_torch.checkpoint import model_from_checkpoint
    from recsys_torch.train import build

    state = run.checkpoint
    if state is None or not isinstance(state.get("config"), dict):
        raise ReportError("checkpoint.pt holds no config")
    split = build(OmegaConf.create(state["config"])).splits[0]
    refit = run.refit
    trained_on = split.train.concat(split.val) if refit and len(split.val) else split.train
    saved = len((state.get("train") or {}).get("users", []))
    if (trained_on.n_users, trained_on.n_items) != (state["n_users"], state["n_items"]) or len(trained_on) != saved:
        raise ReportError(f"the run's data no longer gives its split ({len(trained_on)} training rows now, "
                          f"{saved} in checkpoint.pt)")
    return Rebuilt(model_from_checkpoint(state), split.test, split.val, trained_on, refit)


def count_buckets(largest: int) -> list[tuple[int, int]]:
    """Inclusive ranges of training counts: 0, 1-2, 3-5, 6-10, 11-20, 21-50, ... up to ``largest``."""
    out, low = [(0, 0)], 1
    bounds = [2, 5, 10]
    while low <= largest:
        high = bounds.pop(0)
        bounds.append(high * 10)
        out.append((low, high))
        low = high + 1
    return out


def _bucket_label(low: int, high: int) -> str:
    return "0 (unseen)" if high == 0 else f"{low}–{high}"


def rating_errors(rebuilt: Rebuilt) -> dict:
    """Test RMSE by the user's and by the item's number of training ratings (what the model learned
    from), with the number of test ratings in each bucket."""
    import torch

    from recsys_torch.metrics import predict

    test = rebuilt.test
    pred = predict(rebuilt.model, test.users, test.items, test.rating_scale, times=test.timestamps)
    sq = (pred.double() - test.ratings.double().cpu()) ** 2
    out = {"n": len(test), "rmse": float(torch.sqrt(sq.mean())) if len(test) else math.nan}
    for side, counts, ids in (("users", rebuilt.trained_on.user_counts(), test.users),
                              ("items", rebuilt.trained_on.item_counts(), test.items)):
        per_row = counts.cpu()[ids.cpu()]
        rows = []
        for low, high in count_buckets(int(per_row.max()) if len(per_row) else 0):
            mask = (per_row >= low) & (per_row <= high)
            n = int(mask.sum())
            if n:
                rows.append({"bucket": _bucket_label(low, high), "low": low, "high": high, "n": n,
                             "rmse": float(torch.sqrt(sq[mask].mean()))})
        out[side] = rows
    return out


def _compact(n: int) -> str:
    return f"{n:,}" if n < 1000 else f"{n / 1000:.1f}k" if n < 100_000 else f"{n / 1000:.0f}k"


def plot_rating_errors(errors: dict, path: str) -> bool:
    """Test RMSE per bucket of training count, users left and items right; each point is labeled
    with its number of test ratings, the dashed line is the RMSE of all test ratings."""
    if not errors.get("users") and not errors.get("items"):
        return False
    fig = _figure(10.0, 3.9)
    axes = fig.subplots(1, 2, sharey=True)
    titles = {"users": "by user activity", "items": "by item popularity"}
    xlabels = {"users": "training ratings of the user", "items": "training ratings of the item"}
    for ax, side in zip(axes, ("users", "items")):
        rows = errors[side]
        xs = list(range(len(rows)))
        ys = [r["rmse"] for r in rows]
        ax.plot(xs, ys, marker="o", color="tab:blue")
        for x, y, r in zip(xs, ys, rows):
            ax.annotate(_compact(r["n"]), (x, y), textcoords="offset points", xytext=(0, 7), ha="center",
                        fontsize=7, color="dimgray", bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none"))
        ax.axhline(errors["rmse"], color="black", ls="--", lw=1)
        ax.set_xticks(xs, [r["bucket"] for r in rows], rotation=30, ha="right", rotation_mode="anchor")
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set(xlabel=xlabels[side], title=titles[side])
        ax.grid(alpha=0.3)
    low = min(min(r["rmse"] for r in errors[s]) for s in ("users", "items") if errors[s])
    high = max(max(r["rmse"] for r in errors[s]) for s in ("users", "items") if errors[s])
    span = max(high - low, 0.01)
    axes[0].set_ylim(min(low, errors["rmse"]) - 0.08 * span, high + 0.15 * span)
    axes[0].set_ylabel("test RMSE")
    fig.suptitle(f"test RMSE by training count; dashed: all {errors['n']:,} test ratings ({errors['rmse']:.4f}); "
                 "numbers: test ratings per point", fontsize=10)
    fig.savefig(path)
    return True


def _item_rows(parts: list, n_users: int):
    """Per user, the items of ``parts`` (CSR: row pointers and item codes, users in code order)."""
    import torch

    users = torch.cat([p.users.cpu() for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
    items = torch.cat([p.items.cpu() for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
    order = torch.argsort(users, stable=True)
    indptr = torch.zeros(n_users + 1, dtype=torch.long)
    indptr[1:] = torch.cumsum(torch.bincount(users, minlength=n_users), 0)
    return indptr, items[order]


def top_recommendations(rebuilt: Rebuilt, k: int, cells: int = 1 << 24):
    """The top ``k`` items of every test user, as evaluation ranks them: every candidate item (those
    seen in training, or all for models that score unseen items), the user's training items (and
    validation items unless the model was refit on them) masked. Returns ``(items [n, k], real [n, k])``."""
    import torch

    from recsys_torch.metrics import top_k, user_entries

    model, trained_on = rebuilt.model, rebuilt.trained_on
    candidates = trained_on.known_items().cpu()
    if getattr(model, "scores_unknown_items", False):
        candidates = torch.ones_like(candidates)
    parts = [trained_on] if rebuilt.refit else [trained_on, rebuilt.val]
    indptr, items = _item_rows(parts, trained_on.n_users)
    users = torch.unique(rebuilt.test.users.cpu())
    tops, reals = [], []
    for chunk in users.split(max(1, cells // max(trained_on.n_items, 1))):
        top, values = top_k(model, chunk, k, user_entries(indptr, items, chunk), candidates)
        tops.append(top)
        reals.append(torch.isfinite(values))
    if not tops:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k, dtype=torch.bool), candidates
    return torch.cat(tops), torch.cat(reals), candidates


def ranking_popularity(rebuilt: Rebuilt, k: int) -> dict:
    """Training counts of the items recommended (top ``k`` of each test user) against the catalog's,
    and coverage (share of the candidate items recommended to anyone)."""
    import torch

    top, real, candidates = top_recommendations(rebuilt, k)
    counts = rebuilt.trained_on.item_counts().cpu()
    shown = top[real]
    catalog = counts[candidates]
    distinct = int(torch.unique(shown).numel())
    return {
        "k": k, "n_users": int(top.shape[0]), "n_recommendations": int(shown.numel()),
        "n_candidates": int(candidates.sum()), "n_recommended_items": distinct,
        "coverage": distinct / max(int(candidates.sum()), 1),
        "recommended_counts": counts[shown].numpy(), "catalog_counts": catalog.numpy(),
        "avg_popularity": float(counts[shown].double().mean()) if shown.numel() else 0.0,
        "median_recommended": float(counts[shown].double().median()) if shown.numel() else 0.0,
        "median_catalog": float(catalog.double().median()) if catalog.numel() else 0.0,
        # how much of all recommendations the most popular tenth of the catalog takes, and of training
        "top_decile_share": _top_share(counts, candidates, shown),
    }


def _top_share(counts, candidates, shown) -> dict:
    import torch

    catalog = torch.nonzero(candidates).squeeze(1)
    order = catalog[torch.argsort(counts[catalog], descending=True, stable=True)]
    head = order[: max(1, len(order) // 10)]
    in_head = torch.zeros(len(counts), dtype=torch.bool)
    in_head[head] = True
    total = float(counts[catalog].sum())
    return {"recommendations": float(in_head[shown].double().mean()) if shown.numel() else 0.0,
            "training": float(counts[head].sum()) / total if total else 0.0}


def plot_popularity(pop: dict, path: str) -> bool:
    """Left: how the recommended items and the catalog spread over training counts (log bins);
    right: the share of all recommendations (and of all training interactions) taken by the most
    popular items, the catalog sorted from most to least popular."""
    import numpy as np

    rec, cat = pop["recommended_counts"], pop["catalog_counts"]
    if not len(rec) or not len(cat):
        return False
    fig = _figure(10.0, 3.9)
    left, right = fig.subplots(1, 2)
    largest = max(int(cat.max()), 1)
    # log-spaced bins whose edges fall between integers: no bin is empty for want of a whole count
    edges = np.unique(np.round(np.geomspace(1, largest + 1, 16))) - 0.5
    left.hist(np.clip(cat, 0.5, None), bins=edges, weights=np.full(len(cat), 100 / len(cat)), alpha=0.55,
              color="tab:gray", label=f"catalog ({len(cat):,} items)")
    left.hist(np.clip(rec, 0.5, None), bins=edges, weights=np.full(len(rec), 100 / len(rec)), histtype="step",
              lw=2, color="tab:red", label=f"top-{pop['k']} recommendations ({len(rec):,})")
    left.set_xscale("log")
    _style_log_axis(left, edges[0], edges[-1])
    left.set(xlabel="training interactions of the item (log scale)", ylabel="% of items / of recommendations",
             title="popularity of what is recommended")
    left.legend(fontsize=8)
    counts_sorted = np.sort(cat)[::-1]
    share_items = np.arange(1, len(cat) + 1) / len(cat) * 100
    rec_sorted = np.sort(rec)[::-1]
    # cumulative share of recommendations going to items at least as popular as the i-th most popular
    rec_share = np.searchsorted(-rec_sorted, -counts_sorted, side="right") / len(rec) * 100
    train_share = np.cumsum(counts_sorted) / max(counts_sorted.sum(), 1) * 100
    right.plot(share_items, rec_share, color="tab:red", lw=2, label=f"top-{pop['k']} recommendations")
    right.plot(share_items, train_share, color="tab:gray", lw=1.5, label="training interactions")
    right.plot([0, 100], [0, 100], color="black", ls=":", lw=1, label="every item alike")
    right.set(xlabel="most popular items, % of the catalog", ylabel="cumulative share, %",
              title="concentration on popular items", xlim=(0, 100), ylim=(0, 101))
    right.legend(fontsize=8, loc="lower right")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"coverage@{pop['k']} {pop['coverage']:.3f}: {pop['n_recommended_items']:,} of "
                 f"{pop['n_candidates']:,} items recommended to {pop['n_users']:,} test users")
    fig.savefig(path)
    return True


# -- report.md of a run
def headline_metrics(run: Run) -> list[tuple[str, str, str]]:
    """``(metric, test, validation)`` rows: RMSE / MAE (and cold / warm) for rating runs, the ranking
    metrics at K for ranking runs, mean ± std over folds for k-fold."""
    def cell(key):
        value, std = run.trial.value(key), run.trial.value(f"{key}_std")
        if value is None:
            return "—"
        return f"{value:.4f}" + (f" ± {std:.4f}" if std is not None else "")

    if run.task == "ranking":
        names = [f"{m}@{run.k}" for m in ("precision", "recall", "ndcg", "hr", "map", "mrr", "coverage",
                                          "avg_popularity")]
    else:
        names = ["rmse", "mae", *(f"{seg}/{m}" for seg in ("warm", "cold") for m in ("rmse", "mae"))]
    rows = [(name, cell(f"test/{name}"), cell(f"val/{name}")) for name in names]
    return [row for row in rows if row[1] != "—" or row[2] != "—"]


def _what(run: Run) -> str:
    def name(group):
        node = run.config.get(group) or {}
        target = str(node.get("_target_") or "?") if isinstance(node, dict) else "?"
        return target.rsplit(".", 1)[-1]

    return f"{name('model')} on {name('data')} ({name('split')}), {run.task} task"


def _scalar_metric(run: Run, key: str) -> float | None:
    value = run.first_fold.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def write_run_report(run: Run, out_dir: str, run_command: str | None = None) -> dict[str, str]:
    """``report.md`` and the run's PNGs in ``out_dir``: ``learning.png`` (loss and validation per
    epoch, the early-stopping point marked), ``errors.png`` (rating runs: test RMSE by user activity
    and item popularity) or ``popularity.png`` (ranking runs: popularity of the recommended items
    against the catalog, coverage). Without matplotlib the tables alone; a part that cannot be made
    (no events, no checkpoint, data that no longer rebuilds) is named in the report instead."""
    os.makedirs(out_dir, exist_ok=True)
    try:
        import matplotlib  # noqa: F401  (the sweep extra)
        can_plot = True
    except ImportError:
        can_plot = False
        run.notes.append("plots need matplotlib: `pip install -e \".[sweep]\"`")
    written: dict[str, str] = {}
    curves, source = run_curves(run)
    best = _best_epoch(run, curves)
    analysis, plotted = None, False
    if run.checkpoint is not None:
        try:
            rebuilt = rebuild(run)
            analysis = ranking_popularity(rebuilt, run.k) if run.task == "ranking" else rating_errors(rebuilt)
        except RecsysError as exc:
            run.notes.append(f"no analysis of predictions: {exc}")
    lines = [f"# Run report: {os.path.basename(os.path.abspath(run.path))}", "",
             f"- folder: `{run.path}`", f"- {_what(run)}"]
    epochs = max((e for e, _ in curves.get("train/loss") or curves.get(run.monitor) or []), default=None)
    if best:
        line = f"- early stopping on {run.monitor}: epoch {best} kept" + (f" of {epochs} trained" if epochs else "")
        if run.refit:
            line += f"; then refit on train + val for {best} epochs (test metrics are the refit model's)"
        lines.append(line)
    sizes = [_scalar_metric(run, k) for k in ("n_train", "n_val", "n_test")]
    if all(v is not None for v in sizes):
        lines.append("- {:,.0f} / {:,.0f} / {:,.0f} train / validation / test rows".format(*sizes)
                     + (" (first fold)" if run.first_fold is not run.metrics else ""))
    if _scalar_metric(run, "fit_seconds") is not None:
        lines.append(f"- fit: {_scalar_metric(run, 'fit_seconds'):.1f} s")
    if run_command:
        lines += ["", "```", run_command, "```"]
    lines += ["", "| metric | test | validation |", "|---|---|---|"]
    lines += [f"| {m} | {t} | {v} |" for m, t, v in headline_metrics(run)]
    lines.append("")
    if curves and can_plot and plot_learning(run, curves, os.path.join(out_dir, "learning.png")):
        written["learning"] = os.path.join(out_dir, "learning.png")
        what = " and ".join(["training loss"] + (["the refit's loss"] if "refit/train/loss" in curves else []))
        lines += ["![learning curves](learning.png)", "",
                  f"*learning.png: {what} (left) and {run.monitor} (right) per epoch, from {source}"
                  + (f"; the red dot and dotted line mark epoch {best}, the one early stopping kept.*" if best else ".*"),
                  ""]
    elif not curves:
        run.notes.append("no learning curves: the run has no TensorBoard events (logger=none) nor a finished last.pt")
    if analysis is not None and run.task == "rating":
        if can_plot:
            plotted = plot_rating_errors(analysis, os.path.join(out_dir, "errors.png"))
        if plotted:
            written["errors"] = os.path.join(out_dir, "errors.png")
            lines += ["![test RMSE by user activity and item popularity](errors.png)", "",
                      f"*errors.png: test RMSE of users (left) and items (right) grouped by how many training "
                      f"ratings they have; overall {analysis['rmse']:.4f} on {analysis['n']:,} test ratings.*", ""]
        for side, title in (("users", "user's training ratings"), ("items", "item's training ratings")):
            lines += [f"| {title} | test ratings | RMSE |", "|---|---|---|"]
            lines += [f"| {r['bucket']} | {r['n']:,} | {r['rmse']:.4f} |" for r in analysis[side]]
            lines.append("")
    if analysis is not None and run.task == "ranking":
        if can_plot:
            plotted = plot_popularity(analysis, os.path.join(out_dir, "popularity.png"))
        if plotted:
            written["popularity"] = os.path.join(out_dir, "popularity.png")
            lines += ["![popularity of the recommended items](popularity.png)", "",
                      f"*popularity.png: training interactions of the top-{analysis['k']} items recommended to the "
                      f"{analysis['n_users']:,} test users against the catalog (left), and the share of "
                      "recommendations the most popular items take (right).*", ""]
        share = analysis["top_decile_share"]
        lines += [f"- coverage@{analysis['k']}: {analysis['coverage']:.4f} ({analysis['n_recommended_items']:,} of "
                  f"{analysis['n_candidates']:,} candidate items recommended at least once)",
                  f"- median training interactions of a recommended item: {analysis['median_recommended']:.0f} "
                  f"(catalog median {analysis['median_catalog']:.0f}; mean of the recommended "
                  f"{analysis['avg_popularity']:.1f})",
                  f"- the most popular 10% of the catalog take {share['recommendations']:.0%} of the recommendations "
                  f"and {share['training']:.0%} of the training interactions", ""]
    if run.notes:
        lines += ["Not in this report:", ""] + [f"- {note}" for note in run.notes] + [""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    return {"report": path, **written}
