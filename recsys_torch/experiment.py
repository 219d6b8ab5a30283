"""An experiment in plain Python: data, a task and splits (:class:`Experiment`), and :func:`run`, which
trains a model per split with the generic trainer, evaluates it on the test part, trains the final
model where the split asks for one, and writes the run folder (``metrics.json``, ``checkpoint.pt``,
``recommend.npz``). ``recsys_torch.train`` (Hydra configs) and ``recsys_torch.api`` (Python
arguments) both put an experiment together and call :func:`run`: one code path for every way in.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from recsys_torch.checkpoint import save_checkpoint
from recsys_torch.data.dataset import Dataset
from recsys_torch.data.interactions import Interactions
from recsys_torch.errors import TrainingError
from recsys_torch.io import atomic_json
from recsys_torch.loggers import NullLogger
from recsys_torch.metrics import aggregate_folds, unknown_counts
from recsys_torch.recommend import INDEX_NAME, write_index
from recsys_torch.runfolder import METRICS_NAME, RunFolder
from recsys_torch.splits import Split, negative_parts
from recsys_torch.tasks import Task

log = logging.getLogger("recsys_torch")

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class Experiment:
    """What a run is made of, built once: the encoded data, the task, the task's view of the
    interactions (a ranking task keeps the positives) and the splits of that view."""

    dataset: Dataset
    task: Task
    interactions: Interactions
    splits: list[Split]
    seed: int


def make_experiment(dataset: Dataset, task: Task, split: Callable, seed: int) -> Experiment:
    """The task's view of the data set, split by ``split(interactions, seed=seed)``. A ranking task that
    trains on explicit negatives (:meth:`~recsys_torch.tasks.RankingTask.negatives`) gets each split
    part's own: :func:`~recsys_torch.splits.negative_parts` holds out those that belong with the
    held-out positives."""
    inter = task.prepare_data(dataset.interactions)
    kept = "" if task.threshold is None else f" (the positives: ratings >= {task.threshold:g})"
    log.info("data %s: %s%s", dataset.name, inter.describe(), kept)
    splits = split(inter, seed=seed)
    negatives = task.negatives(dataset.interactions)
    if negatives is not None and len(negatives):
        for s in splits:
            parts = torch.from_numpy(negative_parts(s, inter, negatives, seed))
            for k, part in enumerate((s.train, s.val, s.test)):
                part.negatives = negatives.subset(parts == k)
        inter.negatives = negatives  # a final fit trains on every rating
        counts = [len(p.negatives) for p in (splits[0].train, splits[0].val, splits[0].test)]
        log.info("explicit negatives (ratings below %g, task.negative_weight=%g): %d; %d in the training part, %d in "
                 "validation (a refit trains on both), %d held out with the test positives", task.threshold,
                 task.negative_weight, len(negatives), *counts)
    elif (below := below_threshold(task, dataset.interactions)) is not None and len(below):
        why = ("task.negative_weight=0" if task.loss_name == "gramian" else
               f"task.loss={task.loss_name} trains on the positives; explicit negatives are task.loss=gramian's")
        log.info("the %d ratings below %g are not trained on (%s)", len(below), task.threshold, why)
    return Experiment(dataset, task, inter, splits, seed)


def below_threshold(task: Task, inter: Interactions) -> Interactions | None:
    """A ranking run's ratings under its positive threshold: no training rows, yet items the users
    have seen, so recommend leaves them out too."""
    if task.threshold is None:
        return None
    return inter.subset(inter.ratings < float(task.threshold))


def fold_metrics(task: Task, model, split: Split, fit, trained_on: Interactions) -> dict:
    """``trained_on`` is ``split.train``, or train + val after a refit: its items are masked when
    ranking and it decides which test users and items count as unknown (cold)."""
    metrics = dict(fit.val_metrics)
    exclude = [] if trained_on is not split.train else [split.val]
    for key, value in task.evaluate(model, split.test, trained_on, exclude=exclude).items():
        metrics[f"test/{key}"] = value
    unknown = unknown_counts(trained_on, split.test)
    metrics.update(
        fit_seconds=fit.fit_seconds,
        train_ratings_per_second=fit.train_ratings_per_second,
        best_epoch=fit.best_epoch,
        n_train=len(split.train), n_val=len(split.val), n_test=len(split.test),
        n_test_unknown_users=unknown["unknown_users"], n_test_unknown_items=unknown["unknown_items"],
    )
    if trained_on.negatives is not None:  # a ranking run's explicit negatives that trained
        metrics["n_train_negatives"] = len(trained_on.negatives)
    return metrics


def check_finite(model, metrics: dict, task: Task, where: str) -> None:
    """A model or a headline metric that is not a finite number is a failed run, never a result."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainingError(f"{where}: the trained model's {name} is not finite: lower trainer.lr or raise the "
                                "regularization")
    value = metrics.get(f"test/{task.monitor}")
    if isinstance(value, float) and not math.isfinite(value) and metrics.get("n_test"):
        raise TrainingError(f"{where}: test/{task.monitor} is {value}: the model's predictions are not finite")


def warn_about_features(model, dataset: Dataset, split: Split, task: Task | None = None) -> None:
    """Say so when a model built for features gets none, or a cold split tests what the model cannot score."""
    if model.wants_features and dataset.item_features is None and dataset.user_features is None:
        log.warning("%s uses item and user features, and this data set has none: it trains on the ids alone "
                    "(add data.items=... / data.users=... with their features)", type(model).__name__)
    ranking = task is not None and task.implicit
    if split.name == "cold_item" and not model.scores_unknown_items:
        log.warning("split=cold_item tests items training never saw, and %s has no item features to score them: %s",
                    type(model).__name__, "they are not ranked (the candidates are the items training saw), so each "
                    "test positive counts as a miss" if ranking else "they get the global mean plus the user's bias")
    if split.name == "cold_user" and not model.scores_unknown_users:
        log.warning("split=cold_user tests users training never saw, and %s has no user features to score them: %s",
                    type(model).__name__, "each gets the same ranking, by the item biases (all 0 under "
                    "task.loss=gramian); scripts/foldin_eval.py ranks them folded in from a few ratings" if ranking
                    else "they get the global mean plus the item's bias")


def run(experiment: Experiment, make_model: Callable, make_trainer: Callable, output_dir: str, config: dict,
        folder: RunFolder | None = None, make_logger: Callable | None = None, hparams: dict | None = None,
        extra: dict | None = None) -> dict:
    """Train and evaluate every split; return the metrics (and write the run's outputs when ``folder``).

    ``make_model()`` builds a fresh model; ``make_trainer(seed=, logger=, checkpoint_path=, **settings)``
    a :class:`~recsys_torch.trainer.Trainer` (extra ``settings`` override the run's: the final fit's
    epochs); ``make_logger(fold)`` a metric writer (TensorBoard) per fold; ``config``: the run's
    settings as a plain dict, stored in the checkpoint so that serving can rebuild model and task;
    ``extra``: more entries for metrics.json (the objective of a sweep)."""
    t_start = time.perf_counter()
    task, dataset, seed = experiment.task, experiment.dataset, experiment.seed
    make_logger = make_logger or (lambda fold: NullLogger())
    per_fold, first = [], None
    for k, split in enumerate(experiment.splits):
        fold = split.name if len(experiment.splits) > 1 else None
        # Each fold's initial weights come from its own seed, not from what earlier folds drew, so a
        # resumed run that skips finished folds builds the same models.
        torch.manual_seed(seed + k)
        model = make_model()
        if k == 0:
            warn_about_features(model, dataset, split, task)
        logger = make_logger(fold) if folder is not None else NullLogger()
        # every rank reads it to resume; the trainer lets rank 0 alone write it
        checkpoint = os.path.join(output_dir, f"last-{fold}.pt" if fold else "last.pt")
        trainer = make_trainer(seed=seed + k, logger=logger, checkpoint_path=checkpoint)
        fit = trainer.fit(model, split.train, split.val, task)
        trained_on = split.train.concat(split.val) if fit.refit else split.train
        metrics = fold_metrics(task, model, split, fit, trained_on)
        check_finite(model, metrics, task, split.name)
        logger.hparams(hparams or {}, {key: v for key, v in metrics.items() if "/" in key})
        logger.close()
        per_fold.append(metrics)
        if first is None:
            first = (model, trained_on)
        log.info("%s: %s", split.name, ", ".join(f"{key}={value:.4f}" for key, value in metrics.items()
                                                  if key.startswith("test/") and "@" not in key[5:] or key.endswith("@10")))
    result = aggregate_folds(per_fold)
    if experiment.splits[0].final_fit:  # k-fold: the folds estimated the error; now the model to keep
        first = final_fit(experiment, make_model, make_trainer, per_fold, output_dir, result, trainer.epochs)
    result.update(dataset.report)  # rows the data had to drop: n_duplicates_dropped, ...
    result["total_seconds"] = time.perf_counter() - t_start
    result["num_threads"] = torch.get_num_threads()
    result.update(extra or {})
    if folder is not None:
        model, trained_on = first
        result["run_id"] = folder.run_id
        path = os.path.join(output_dir, CHECKPOINT_NAME)
        state = save_checkpoint(path, model, config, dataset, trained_on, result,
                                seen=below_threshold(task, dataset.interactions))
        write_index(path, state, model, task)
        atomic_json(os.path.join(output_dir, METRICS_NAME), result)
        folder.finish([CHECKPOINT_NAME, INDEX_NAME, METRICS_NAME])
    return result


def final_fit(experiment: Experiment, make_model: Callable, make_trainer: Callable, per_fold: list[dict],
              output_dir: str, result: dict, planned_epochs: int) -> tuple:
    """One model on every rating of the experiment, for the folds' mean number of epochs (without
    validation there is nothing to stop early on): what the run saves."""
    epochs = max(1, round(sum(m["best_epoch"] or planned_epochs for m in per_fold) / len(per_fold)))
    everything = experiment.interactions
    torch.manual_seed(experiment.seed)
    model = make_model()
    trainer = make_trainer(seed=experiment.seed, logger=NullLogger(), checkpoint_path=os.path.join(output_dir, "last-final.pt"),
                           epochs=epochs, patience=None, refit=False)
    fit = trainer.fit(model, everything, None, experiment.task)
    check_finite(model, {}, experiment.task, "final fit")
    result.update(final_fit_epochs=epochs, final_fit_seconds=fit.fit_seconds, n_final_fit=len(everything))
    log.info("final fit: %d ratings, %d epochs (the folds' mean), %.1f s", len(everything), epochs, fit.fit_seconds)
    return model, everything
