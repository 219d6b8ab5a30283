"""The experiment: a pure ``train(cfg) -> metrics`` and the thin ``@hydra.main`` entry around it.

Hydra and OmegaConf stay in this module and ``scripts/``; everything it calls is plain Python.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import re
import signal
import sys
import time

import hydra
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recsys_torch.data.dataset import Dataset, encode
from recsys_torch.checkpointing import TrainingInterrupted
from recsys_torch.data.interactions import Interactions
from recsys_torch.errors import ConfigError, RecsysError
from recsys_torch.io import atomic_json, remove_stale_temporaries, save_checkpoint
from recsys_torch.loggers import NullLogger
from recsys_torch.metrics import unknown_counts

log = logging.getLogger("recsys_torch")

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_data(cfg: DictConfig) -> Dataset:
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    duplicates = data_cfg.pop("duplicates", "last")
    raw = instantiate(data_cfg, _convert_="all")
    return encode(raw, duplicates=duplicates)


def _logger_for(cfg: DictConfig, output_dir: str, fold: str | None):
    if cfg.get("logger") is None or not cfg.logger.get("_target_"):
        return NullLogger()
    log_dir = os.path.join(output_dir, "tb", fold) if fold else os.path.join(output_dir, "tb")
    return instantiate(cfg.logger, log_dir=log_dir)


def _flat_hparams(cfg: DictConfig) -> dict:
    out = {}
    for group in ("model", "trainer", "split", "task"):
        node = OmegaConf.to_container(cfg.get(group) or {}, resolve=True)
        for key, value in node.items():
            if key != "_target_" and not isinstance(value, (dict, list)):
                out[f"{group}.{key}"] = value
    out["seed"] = cfg.seed
    return out


def _aggregate(folds: list[dict]) -> dict:
    """Mean over folds under the plain key and the standard deviation beside it."""
    if len(folds) == 1:
        return dict(folds[0])
    out: dict = {}
    for key in folds[0]:
        values = [f[key] for f in folds if isinstance(f.get(key), (int, float))]
        if len(values) != len(folds):
            continue
        t = torch.tensor(values, dtype=torch.float64)
        out[key] = float(t.mean())
        if key.startswith(("val/", "test/")):
            out[f"{key}_std"] = float(t.std(unbiased=True)) if len(values) > 1 else 0.0
    out["folds"] = folds
    return out


# Settings that change neither the numbers nor the saved state: a run may resume with other values.
RESUME_FREE_KEYS = {"trainer": ("resume", "progress", "num_threads", "eval_batch_size"), "logger": None}


def run_meta(cfg: DictConfig) -> dict:
    """The resolved config a saved training state must match to be resumed."""
    meta = OmegaConf.to_container(cfg, resolve=True)
    for group, keys in RESUME_FREE_KEYS.items():
        if keys is None:
            meta.pop(group, None)
        elif isinstance(meta.get(group), dict):
            for key in keys:
                meta[group].pop(key, None)
    return meta


def _prepare_run_folder(output_dir: str, resume: bool) -> None:
    """Clear what killed runs leave behind; refuse to silently start over an unfinished run."""
    os.makedirs(output_dir, exist_ok=True)
    remove_stale_temporaries(output_dir)
    saved = sorted(glob.glob(os.path.join(output_dir, "last.pt")) + glob.glob(os.path.join(output_dir, "last-*.pt")))
    if not saved or resume:
        return
    if os.path.exists(os.path.join(output_dir, "metrics.json")):  # a finished run, run again
        for path in saved:
            os.unlink(path)
        return
    names = ", ".join(os.path.basename(p) for p in saved)
    raise ConfigError(
        f"{output_dir} holds the saved state of an unfinished run ({names}): add trainer.resume=true to "
        "continue it, or delete it or choose another hydra.run.dir to start over"
    )


def _below_threshold(task, inter: Interactions) -> Interactions | None:
    """A ranking run's ratings under its positive threshold: no training rows, yet items the users
    have seen, so recommend leaves them out too."""
    threshold = getattr(task, "threshold", None)
    if threshold is None:
        return None
    return inter.subset(inter.ratings < float(threshold))


def _val_metrics(task, model, split) -> dict:
    """The validation metrics of the model that early stopping chose (before any refit)."""
    if not len(split.val):
        return {}
    return {f"val/{key}": value for key, value in task.evaluate(model, split.val, split.train).items()}


def _fold_metrics(task, model, split, fit, val_metrics: dict, trained_on: Interactions) -> dict:
    """``trained_on`` is ``split.train``, or train + val after a refit: its items are masked when
    ranking and it decides which test users and items count as unknown (cold)."""
    metrics = dict(val_metrics)
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
    return metrics


def _refit(cfg, build_model, split, task, fit, k: int, output_dir: str, fold: str | None, main_rank: bool,
           meta: dict):
    """``trainer.refit=true``: train a fresh model (same seed, same initial weights) on train + val for
    the number of epochs early stopping chose. Validation chose that number and nothing else, and
    the final model learns from every rating outside test (as peers that tune by hand do)."""
    epochs = fit.best_epoch or len(fit.history)
    torch.manual_seed(int(cfg.seed) + k)
    model = build_model()
    name = f"{fold}-refit" if fold else "refit"
    logger = _logger_for(cfg, output_dir, name) if main_rank else NullLogger()
    trainer = instantiate(_trainer_node(cfg), _partial_=True)(
        seed=int(cfg.seed) + k, logger=logger, checkpoint_path=os.path.join(output_dir, f"last-{name}.pt"),
        checkpoint_meta=meta, epochs=epochs, patience=None)
    merged = split.train.concat(split.val)
    again = trainer.fit(model, merged, None, task)
    logger.close()
    log.info("%s: refit on train + val (%d ratings) for %d epochs", split.name, len(merged), epochs)
    again.best_epoch = fit.best_epoch
    again.fit_seconds += fit.fit_seconds
    return model, merged, again


ENTRY_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
# handled by train.py itself, not passed to the component
EXTRA_KEYS = {"data": {"duplicates"}, "trainer": {"refit"}}


def _trainer_node(cfg: DictConfig) -> dict:
    """``cfg.trainer``, resolved, without the keys train.py handles (``refit``)."""
    node = OmegaConf.to_container(cfg.trainer, resolve=True)
    return {key: value for key, value in node.items() if key not in EXTRA_KEYS["trainer"]}


def check_keys(cfg: DictConfig) -> None:
    """Refuse a key that no component takes (e.g. ``+model.embeding_dim=8``): constructors that
    swallow ``**kwargs`` would otherwise ignore a typo silently."""
    import inspect

    from hydra.utils import get_object

    for group in ("data", "split", "model", "task", "trainer"):
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        try:
            target = get_object(node._target_)
        except Exception:
            raise ConfigError(f"{group}._target_: cannot import {node._target_!r}") from None
        named = {n for n, p in inspect.signature(target).parameters.items()
                 if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        extra = set(node.keys()) - named - ENTRY_KEYS - EXTRA_KEYS.get(group, set())
        if extra:
            valid = sorted(named - {"n_users", "n_items", "item_features", "user_features", "seed", "logger",
                                    "callbacks", "checkpoint_path", "checkpoint_meta", "inter"})
            raise ConfigError(f"{group}.{sorted(extra)[0]} is not a setting of {target.__name__}; "
                              f"its settings are: {', '.join(valid)}")


def train(cfg: DictConfig, output_dir: str | None = None) -> dict:
    """Run one experiment as configured; write ``metrics.json``, ``checkpoint.pt`` and TensorBoard
    events into ``output_dir``; return the metrics.

    The training state of each fit is kept in ``last.pt`` (``last-<fold>.pt`` for k folds) and
    ``trainer.resume=true`` continues a killed run from it; folds that had finished are not trained
    again."""
    check_keys(cfg)
    output_dir = output_dir or os.getcwd()
    resume = bool(cfg.trainer.get("resume", False))
    # under torchrun (trainer=ddp) every rank trains; rank 0 alone writes the run's outputs
    main_rank = not cfg.trainer.get("distributed", False) or int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        _prepare_run_folder(output_dir, resume)
    torch.manual_seed(int(cfg.seed))
    t_start = time.perf_counter()

    dataset = load_data(cfg)
    task = instantiate(cfg.task)
    inter = task.prepare_data(dataset.interactions)
    log.info("data %s: %s", dataset.name, inter.describe())
    splits = instantiate(cfg.split, _partial_=True)(inter, seed=int(cfg.seed))
    meta = run_meta(cfg)

    fold_metrics, first = [], None
    for k, split in enumerate(splits):
        fold = split.name if len(splits) > 1 else None
        # Each fold's initial weights come from its own seed, not from what earlier folds drew, so a
        # resumed run that skips finished folds builds the same models.
        torch.manual_seed(int(cfg.seed) + k)
        # partial, then called: instantiate would turn the Features objects into config nodes
        build = instantiate(cfg.model, _partial_=True)

        def build_model():
            try:
                return build(n_users=inter.n_users, n_items=inter.n_items,
                             item_features=dataset.item_features, user_features=dataset.user_features)
            except (TypeError, ValueError) as exc:  # a setting of the wrong type, e.g. model.embedding_dim=abc
                raise ConfigError(f"model: {type(exc).__name__}: {exc} (building {cfg.model._target_})") from None

        model = build_model()
        logger = _logger_for(cfg, output_dir, fold) if main_rank else NullLogger()
        # every rank reads it to resume; the trainer lets rank 0 alone write it
        checkpoint = os.path.join(output_dir, f"last-{fold}.pt" if fold else "last.pt")
        # partial: Hydra would try to instantiate the _target_ entries inside the meta dict
        trainer = instantiate(_trainer_node(cfg), _partial_=True)(
            seed=int(cfg.seed) + k, logger=logger, checkpoint_path=checkpoint, checkpoint_meta=meta)
        fit = trainer.fit(model, split.train, split.val, task)
        val_metrics = _val_metrics(task, model, split)
        trained_on = split.train
        if cfg.trainer.get("refit", False) and len(split.val) and model.trainable:
            model, trained_on, fit = _refit(cfg, build_model, split, task, fit, k, output_dir, fold, main_rank, meta)
        metrics = _fold_metrics(task, model, split, fit, val_metrics, trained_on)
        logger.hparams(_flat_hparams(cfg), {k2: v for k2, v in metrics.items() if "/" in k2})
        logger.close()
        fold_metrics.append(metrics)
        if first is None:
            first = (model, trained_on)
        log.info("%s: %s", split.name, ", ".join(f"{key}={value:.4f}" for key, value in metrics.items()
                                                  if key.startswith("test/") and "@" not in key[5:] or key.endswith("@10")))

    result = _aggregate(fold_metrics)
    result.update(dataset.report)  # rows the data had to drop: n_duplicates_dropped, ...
    result["total_seconds"] = time.perf_counter() - t_start
    model, trained_on = first
    if main_rank:
        save_checkpoint(os.path.join(output_dir, "checkpoint.pt"), model, cfg, dataset, trained_on, result,
                        seen=_below_threshold(task, dataset.interactions))
        atomic_json(os.path.join(output_dir, "metrics.json"), result)
    return result


def summary(metrics: dict, output_dir: str) -> str:
    """The one-screen summary printed at the end of a run."""
    lines = ["", "=" * 64, "recsys_torch run summary", "-" * 64]
    keys = [k for k in metrics if k.startswith("test/") and not k.endswith("_std")]
    for key in keys:
        std = metrics.get(f"{key}_std")
        value = metrics[key]
        if isinstance(value, float) and not math.isnan(value):
            lines.append(f"  {key:<28} {value:.4f}" + (f" ± {std:.4f}" if std is not None else ""))
    if "folds" in metrics:
        lines.append(f"  (mean ± std over {len(metrics['folds'])} folds)")
    lines.append(f"  train / val / test ratings  {metrics['n_train']:.0f} / {metrics['n_val']:.0f} / {metrics['n_test']:.0f}")
    lines.append(f"  unknown in test             {metrics['n_test_unknown_users']:.0f} users, "
                 f"{metrics['n_test_unknown_items']:.0f} items")
    lines.append(f"  fit time                    {metrics['fit_seconds']:.2f} s"
                 + (" per fold" if "folds" in metrics else "")
                 + f" ({metrics['train_ratings_per_second'] / 1e6:.2f} M ratings/s)")
    lines.append(f"  outputs                     {output_dir}")
    lines.append(f"  tensorboard                 tensorboard --logdir {os.path.join(output_dir, 'tb')}")
    lines.append("=" * 64)
    return "\n".join(lines)


def _user_error(exc: BaseException) -> RecsysError | None:
    """The RecsysError behind ``exc``, if any (Hydra's instantiate wraps what a target raises)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, RecsysError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _instantiation_error(exc: BaseException) -> str | None:
    """One line for a config value a component rejected (``model.embedding_dim=abc``), which Hydra
    reports as an InstantiationException over several lines. HYDRA_FULL_ERROR=1 keeps the traceback."""
    if not isinstance(exc, InstantiationException) or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return None
    text = str(exc)
    key = re.search(r"full_key: (\S+)", text)
    target = re.search(r"target '([^']+)'", text)
    cause = exc.__cause__
    detail = f"{type(cause).__name__}: {cause}" if cause is not None else text.splitlines()[0]
    where = key.group(1) if key else (target.group(1) if target else "config")
    built = f" (building {target.group(1)})" if key and target else ""
    return f"{where}: {' '.join(detail.split())}{built}"


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def precheck(argv: list[str]) -> None:
    """Compose the config once before Hydra runs, so an override naming a key, group or option that
    does not exist ends with one ``error:`` line and exit 2 rather than Hydra's multi-line report.
    Sweeps (``-m``) and Hydra's own flags are left to Hydra."""
    if any(a.startswith("-") for a in argv):
        return
    overrides = [a for a in argv if not a.lstrip("+~").startswith("hydra")]
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            compose(config_name="train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        options = [line for line in lines[1:] if not line.endswith(":") and " " not in line]
        if any(line.startswith("Available options") for line in lines):
            fail(f"{lines[0].removeprefix('In ' + repr('train') + ': ')} (options: {', '.join(options)})")
        fail(" ".join(lines[:2]))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    output_dir = HydraConfig.get().runtime.output_dir
    try:
        metrics = train(cfg, output_dir)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training
        fail("interrupted", 128 + signal.SIGINT)
    except Exception as exc:
        user_error = _user_error(exc)
        if isinstance(user_error, TrainingInterrupted):
            fail(str(user_error), 128 + user_error.signum)
        if user_error is not None:
            from hydra.types import RunMode

            if HydraConfig.get().mode == RunMode.MULTIRUN:
                # in a sweep a bad trial (e.g. a diverging learning rate) fails alone: the sweeper
                # records it and goes on, where exiting would end the whole sweep
                log.error("trial failed: %s", user_error)
                raise user_error from None
            fail(str(user_error))
        message = _instantiation_error(exc)
        if message is None:
            raise
        fail(message)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(metrics, output_dir))
    if cfg.trainer.get("distributed", False):
        from recsys_torch.distributed import teardown

        teardown()
    objective = cfg.get("optimized_metric")
    if objective:
        value = metrics.get(objective)
        if value is None:
            fail(f"optimized_metric {objective!r} is not among the metrics: {sorted(k for k in metrics if '/' in k)}")
        return float(value)
    return None


if __name__ == "__main__":
    main()
