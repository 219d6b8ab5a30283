"""The one error path of every script, and what the command lines share.

A user error (a :class:`~recsys_torch.errors.RecsysError`, also when Hydra's ``instantiate`` wraps
it, or a config value a component rejected) ends with one ``error: ...`` line on stderr and exit
status 2; an interrupt with 128 + the signal number. Scripts parse their arguments with
:func:`parse_key_values` or :class:`ArgumentParser` and run their body through :func:`run`.

Hydra and OmegaConf are imported only inside the functions that need them, so that a script such as
``recommend.py`` starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import math
import os
import re
import signal
import sys
from collections.abc import Callable

from recsys_torch.errors import ConfigError, TrainingInterrupted, user_error
from recsys_torch.signals import install as install_signal_handlers
from recsys_torch.signals import signal_name

log = logging.getLogger("recsys_torch")

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
ENTRY_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
GROUPS = ("data", "split", "model", "task", "trainer")
# constructor arguments the experiment passes itself, never set in a config
SUPPLIED = {"n_users", "n_items", "item_features", "user_features", "seed", "logger", "callbacks",
            "checkpoint_path", "checkpoint_meta", "inter"}


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def instantiation_error(exc: BaseException) -> str | None:
    """One line for a config value a component rejected (``model.embedding_dim=abc``), which Hydra
    reports as an InstantiationException over several lines. HYDRA_FULL_ERROR=1 keeps the traceback."""
    try:
        from hydra.errors import InstantiationException
    except ImportError:
        return None
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


def error_line(exc: BaseException) -> tuple[str, int] | None:
    """``(message, exit status)`` for an error a user caused, or None for a bug (let it raise)."""
    if isinstance(exc, KeyboardInterrupt):
        signum = int(getattr(exc, "signum", signal.SIGINT))
        return ("interrupted" if signum == signal.SIGINT else f"terminated ({signal_name(signum)})"), 128 + signum
    found = user_error(exc)
    if isinstance(found, TrainingInterrupted):
        return str(found), 128 + found.signum
    if found is not None:
        return str(found), 2
    message = instantiation_error(exc)
    if message is None:
        from_omegaconf = _omegaconf_error(exc)
        return (from_omegaconf, 2) if from_omegaconf else None
    return message, 2


def _omegaconf_error(exc: BaseException) -> str | None:
    """A missing mandatory value (``???``) or a bad interpolation, as one line."""
    try:
        from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
    except ImportError:
        return None
    if isinstance(exc, MissingMandatoryValue):
        key = getattr(exc, "full_key", None) or "a setting"
        if key == "data.ratings":
            return "data=csv needs data.ratings=PATH (the ratings file)"
        return f"{key} has no value: set it on the command line ({key}=...)"
    if isinstance(exc, OmegaConfBaseException):
        return " ".join(str(exc).split())[:300]
    return None


@contextlib.contextmanager
def errors():
    """Turn a user error inside the block into one ``error:`` line and its exit status."""
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 -- classified just below
        if isinstance(exc, SystemExit):
            raise
        found = error_line(exc)
        if found is None:
            raise
        fail(*found)


def run(body: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run a script's ``body(argv)`` under the one error path; its exit status (2 after a user error,
    whose one line went to stderr)."""
    if argv is None:  # a script's own process: SIGTERM stops it like SIGINT, with one line
        install_signal_handlers()
        logging.raiseExceptions = False  # a log line whose reader went away is dropped, not a traceback
    try:
        return int(body(sys.argv[1:] if argv is None else list(argv)) or 0)
    except SystemExit:
        raise
    except BrokenPipeError:  # the reader went away (``... | head``): stop quietly, as a shell tool does
        return stdout_closed()
    except BaseException as exc:  # noqa: BLE001 -- classified just below
        found = error_line(exc)
        if found is None:
            raise
        print(f"error: {found[0]}", file=sys.stderr)
        return found[1]


def stdout_closed() -> int:
    """Standard output's reader has gone: point stdout at /dev/null (so that the interpreter's last
    flush cannot fail again with a traceback) and give the shell's status for SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 128 + signal.SIGPIPE


# ---- arguments -------------------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes end like every other user error: one ``error:`` line, exit 2."""

    def error(self, message: str) -> None:
        fail(f"{message} (see {self.prog} --help)")


def parse_key_values(argv: list[str], keys: dict, required: tuple[str, ...] = ()) -> dict:
    """``key=value`` arguments over ``keys`` (name -> default); unknown keys and missing required
    ones are ConfigErrors that name the valid keys."""
    args = dict(keys)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"arguments are key=value, got {arg!r} (keys: {', '.join(keys)})")
        if key not in keys:
            raise ConfigError(f"unknown argument {key!r}{_did_you_mean(key, keys)} (keys: {', '.join(keys)})")
        args[key] = value
    for key in required:
        if args.get(key) in (None, ""):
            raise ConfigError(f"{key}= is required (keys: {', '.join(keys)})")
    return args


def parse_int(key: str, value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be an integer, got {value!r}") from None


BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    flag = str(value).lower()
    if flag not in BOOLEANS:
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return BOOLEANS[flag]


def _did_you_mean(key: str, candidates) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


# ---- configs ---------------------------------------------------------------------------------------
def compose(overrides: list[str]):
    """``configs/train.yaml`` composed with ``overrides`` (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def _settings(target) -> set[str]:
    import inspect

    return {n for n, p in inspect.signature(target).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def check_keys(cfg) -> None:
    """Refuse a key that no component takes (e.g. ``+model.embeding_dim=8``), naming the closest real
    key: constructors that swallowed ``**kwargs`` would otherwise ignore a typo silently."""
    from hydra.utils import get_object
    from omegaconf import DictConfig

    for group in GROUPS:
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        try:
            target = get_object(node._target_)
        except Exception:
            raise ConfigError(f"{group}._target_: cannot import {node._target_!r}") from None
        named = _settings(target)
        extra = set(node.keys()) - named - ENTRY_KEYS
        if extra:
            valid = sorted(named - SUPPLIED)
            key = sorted(extra)[0]
            raise ConfigError(f"{group}.{key} is not a setting of {target.__name__}{_did_you_mean(key, valid)}; "
                              f"its settings are: {', '.join(valid)}")


def precheck(argv: list[str]) -> None:
    """Compose the config once before Hydra runs, so an override naming a key, group or option that
    does not exist ends with one ``error:`` line and exit 2 rather than Hydra's multi-line report
    (a misspelled key also gets the closest real one), and a run folder in use is refused before
    Hydra writes into it. Sweeps (``-m``) and Hydra's own flags are left to Hydra."""
    install_signal_handlers()  # SIGTERM stops a run like SIGINT (one line, run.json failed), sweeps too
    logging.raiseExceptions = False  # a log line whose reader went away (train.py | head) is dropped, not a traceback
    if any(a.startswith("-") for a in argv):
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), None)
    # under torchrun only rank 0 holds the run folder: the other ranks would find it held by their own job
    if run_dir and int(os.environ.get("RANK", "0") or 0) == 0:
        from recsys_torch.runfolder import holder

        who = holder(run_dir)
        if who is not None:
            fail(f"{os.path.abspath(run_dir)} is in use by another run ({who}): wait for it to finish, or choose "
                 "another hydra.run.dir")
    # Hydra's own settings are Hydra's, except the search path, which decides where configs are found
    overrides = [a for a in argv if not a.lstrip("+~").startswith("hydra") or a.lstrip("+~").startswith("hydra.searchpath")]
    try:
        compose(overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        options = [line for line in lines[1:] if not line.endswith(":") and " " not in line]
        if any(line.startswith("Available options") for line in lines):
            fail(f"{lines[0].removeprefix('In ' + repr('train') + ': ')} (options: {', '.join(options)})")
        missing = re.search(r"Could not override '([\w.]+)'", lines[0]) if lines else None
        if missing:
            fail(_unknown_key(missing.group(1), overrides))
        fail(" ".join(lines[:2]))
    except Exception as exc:  # noqa: BLE001 -- a config file that is no YAML (yaml.YAMLError); else a bug
        message = _yaml_error(exc)
        if message is None:
            raise
        fail(message)


def _yaml_error(exc: BaseException) -> str | None:
    """A config file with a YAML syntax error, as one line naming the file and the line."""
    import yaml

    if not isinstance(exc, yaml.YAMLError):
        return None
    mark = getattr(exc, "problem_mark", None)
    where = f"{mark.name}, line {mark.line + 1}" if mark is not None else "a config file"
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    return f"{where}: not valid YAML ({context + ': ' if context else ''}{problem})"


def _unknown_key(dotted: str, overrides: list[str]) -> str:
    """``model.embeding_dim`` -> the closest real key of its group, and the group's keys."""
    group, _, key = dotted.partition(".")
    try:
        cfg = compose([o for o in overrides if not o.startswith(dotted + "=")])
    except Exception:  # noqa: BLE001 -- the message below still helps
        cfg = None
    node = cfg.get(group) if cfg is not None and group in GROUPS else None
    if node is None:
        top = [] if cfg is None else [k for k in cfg.keys() if k != "hydra"]
        return f"{dotted} is not a key of the config{_did_you_mean(dotted, top)}"
    keys = sorted(k for k in node.keys() if k not in ENTRY_KEYS)
    return f"{dotted} is not a setting of {group}{_did_you_mean(key, keys)}; its settings are: {', '.join(keys)}"


# ---- the printed summary ---------------------------------------------------------------------------
def summary(metrics: dict, output_dir: str) -> str:
    """The one-screen summary printed at the end of a run."""
    lines = ["", "=" * 64, "recsys_torch run summary", "-" * 64]
    counts = ("n_users", "n_ratings")
    keys = [k for k in metrics if k.startswith("test/") and not k.endswith("_std")]
    for key in keys:
        std, value = metrics.get(f"{key}_std"), metrics[key]
        if not isinstance(value, float) or math.isnan(value) or key.rsplit("/", 1)[-1] in counts:
            continue
        line = f"  {key:<28} {value:.4f}" + (f" ± {std:.4f}" if std is not None else "")
        segment = key.split("/")[1] if key.count("/") == 2 else None
        if segment in ("cold", "warm") and f"test/{segment}/n_ratings" in metrics:
            n = metrics[f"test/{segment}/n_ratings"]
            line += f"   ({n:,.0f} ratings{' of unknown users or items' if segment == 'cold' else ''})"
        lines.append(line)
    if "test/n_users" in metrics:
        lines.append(f"  {'test users ranked':<28} {metrics['test/n_users']:,.0f}")
    if "folds" in metrics:
        lines.append(f"  (mean ± std over {len(metrics['folds'])} folds)")
    lines.append(f"  train / val / test ratings  {metrics['n_train']:,.0f} / {metrics['n_val']:,.0f} / {metrics['n_test']:,.0f}")
    lines.append(f"  unknown in test             {metrics['n_test_unknown_users']:.0f} users, "
                 f"{metrics['n_test_unknown_items']:.0f} items")
    if metrics.get("best_epoch") or metrics.get("train_ratings_per_second"):
        lines.append(f"  fit time                    {metrics['fit_seconds']:.2f} s"
                     + (" per fold" if "folds" in metrics else "")
                     + f" ({metrics['train_ratings_per_second'] / 1e6:.2f} M ratings/s in the training steps;"
                       " the fit time also counts validation)")
    else:
        lines.append(f"  fit time                    {metrics['fit_seconds']:.3f} s (no gradient steps: computed from "
                     "the training counts)")
    if "final_fit_epochs" in metrics:
        lines.append(f"  saved model                 trained on all {metrics['n_final_fit']:,} ratings for "
                     f"{metrics['final_fit_epochs']} epochs ({metrics['final_fit_seconds']:.2f} s)")
    if metrics.get("num_threads"):
        lines.append(f"  threads                     {metrics['num_threads']}")
    lines.append(f"  outputs                     {output_dir}")
    lines.append(f"  tensorboard                 tensorboard --logdir {os.path.join(output_dir, 'tb')}")
    lines.append("=" * 64)
    return "\n".join(lines)
