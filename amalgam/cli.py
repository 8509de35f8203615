"""``python -m amalgam fit|validate|test|predict --config x.yaml``: a thin LightningCLI.

Models and data modules are given by ``class_path`` (``amalgam.AmalgamationModule``, ``amalgam.Classifier``,
or a subclass in the user's own project), so the same entry point trains teachers and students.
``python -m amalgam export --ckpt run.ckpt --out DIR`` writes the student alone (``amalgam.export``).
Every run gets, unless its config chose otherwise: a progress bar, atomic checkpoint files that load with
``weights_only=True`` (``AtomicCheckpointIO``), a ``last.ckpt`` to resume from (``ModelCheckpoint(save_last=True)``)
and exact mid-epoch resume (``ExactResume``). Arguments given in the config or on the command line outrank
those a ``--ckpt_path`` checkpoint saved.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    Callback,
    Checkpoint,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
    TQDMProgressBar,
)
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from amalgam.callbacks import ExactResume
from amalgam.checkpointing import AtomicCheckpointIO, checkpoint_error


class UntrainedModelCheck(Callback):
    """Without a checkpoint (no --ckpt_path, or `--ckpt_path last` where there is none yet) the model is as
    built: an untrained student (or teacher). Scoring it may be meant (a baseline); writing its predictions
    never is. Checked once Lightning has resolved the checkpoint path."""

    def __init__(self, subcommand: str) -> None:
        self.subcommand = subcommand

    def _check(self, trainer: Trainer) -> None:
        if trainer.ckpt_path:
            return
        message = (f"{self.subcommand} without a checkpoint uses the model as built, untrained; give the one that "
                   f"fit wrote: --ckpt_path .../checkpoints/last.ckpt")
        if self.subcommand == "predict":
            raise ValueError(message)
        rank_zero_warn(message)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check(trainer)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check(trainer)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check(trainer)


class AmalgamCLI(LightningCLI):
    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        # What the user wrote (config files, command line), without the defaults: it outranks the
        # hyper-parameters a --ckpt_path checkpoint saved (_parse_ckpt_path).
        self._given = None
        if not isinstance(args, (dict, Namespace)):
            exit_on_error, parser.exit_on_error = parser.exit_on_error, False
            try:
                self._given = parser.parse_args(args, defaults=False)
            except Exception:  # nothing to tell apart: the checkpoint's arguments win, as in LightningCLI
                pass
            finally:
                parser.exit_on_error = exit_on_error

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's: a ``--ckpt_path`` checkpoint's saved hyper-parameters fill in the model's arguments.
        Here the file is read once, lazily (mmap: the weights stay unread), with ``--weights_only`` as given
        (LightningCLI always reads with ``weights_only=True``, which would refuse the very file the user chose
        to trust); a file that is not a Lightning checkpoint, or holds another kind of model than the config
        names, is refused with what to do instead; and the arguments the user gave outrank the saved ones."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():  # "last", "best": Lightning resolves them later
            return
        weights_only = self.config[subcommand].get("weights_only") is not False
        try:
            ckpt = load_lazily(ckpt_path, weights_only)
        except (ImportError, AttributeError) as err:
            if weights_only:
                raise checkpoint_error(ckpt_path, err) from err
            raise ValueError(f"--ckpt_path {ckpt_path!r} pickles objects of code that cannot be loaded here ({err}): "
                             f"install the package that wrote it") from err
        except Exception as err:
            raise checkpoint_error(ckpt_path, err) from err
        if not (isinstance(ckpt, dict) and "state_dict" in ckpt and "pytorch-lightning_version" in ckpt):
            raise ValueError(
                f"--ckpt_path {ckpt_path!r} is not a checkpoint written by a Lightning run (a .ckpt from `fit`): "
                f"it holds {describe(ckpt)}. Teacher weights go in model.init_args.teachers[i].checkpoint; a "
                f"student exported by `python -m amalgam export` loads with amalgam.export.load_student.")
        hparams = ckpt.get("hyper_parameters", {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        before = copy.deepcopy(self.config[subcommand].get("model"))
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise
        self._check_model_class(subcommand, before, ckpt_path)
        self._keep_given_model_args(subcommand, before)

    def _check_model_class(self, subcommand: str, before: Any, ckpt_path: str) -> None:
        """The checkpoint's model class replaces the config's (LightningCLI): a subclass of it is the user's
        own model, anything else a wrong file (a teacher's checkpoint given as the student's run)."""
        given = getattr(self, "_given", None)
        given_class = given.get(f"{subcommand}.model.class_path") if given is not None else None
        saved_class = self.config[subcommand]["model"].get("class_path")
        if given_class and saved_class and not same_or_subclass(saved_class, given_class):
            raise ValueError(
                f"--ckpt_path {ckpt_path!r} holds a {saved_class} but the config's model is a {given_class}. "
                f"Give the checkpoint of a run of the config's model (its checkpoints/last.ckpt); teacher "
                f"checkpoints go in model.init_args.teachers[i].checkpoint.")

    def _keep_given_model_args(self, subcommand: str, before: Any) -> None:
        """LightningCLI lets a checkpoint's saved arguments override the config: a moved project's teacher
        paths, or ``--model.init_args.evaluate_teachers false``, would be silently replaced. The arguments the
        user gave win; the checkpoint fills in only what they left out."""
        given = getattr(self, "_given", None)
        given = given.get(f"{subcommand}.model.init_args") if given is not None else None
        after = self.config[subcommand].get("model")
        if given is None or before is None or after is None or not same_or_subclass(after.get("class_path"),
                                                                                     before.get("class_path")):
            return
        for key in vars(given):
            saved, wanted = after["init_args"].get(key), before["init_args"][key]
            # Loss weights the user names change the run's: the checkpoint's others stay (a resumed run's
            # objective must not fall back to the defaults for every term not named).
            merge = key == "loss_weights" and isinstance(saved, dict) and isinstance(wanted, dict)
            after["init_args"][key] = {**saved, **wanted} if merge else wanted

    def before_validate(self) -> None:
        self.trainer.callbacks.append(UntrainedModelCheck("validate"))

    def before_test(self) -> None:
        self.trainer.callbacks.append(UntrainedModelCheck("test"))

    def before_predict(self) -> None:
        self.trainer.callbacks.append(UntrainedModelCheck("predict"))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # A rich progress bar unless the config chose another bar or none: long runs should show progress.
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks = config["callbacks"] = [*callbacks, progress_bar()]
        if not any(isinstance(c, ExactResume) for c in callbacks):
            callbacks = config["callbacks"] = [*callbacks, ExactResume()]
        if config.get("enable_checkpointing") is not False and not any(isinstance(c, Checkpoint) for c in callbacks):
            # Lightning's default, plus a last.ckpt: what `--ckpt_path last` resumes from after a crash.
            config["callbacks"] = [*callbacks, ModelCheckpoint(save_last=True)]
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)


def load_lazily(path: str, weights_only: bool) -> Any:
    """``torch.load`` with the tensors memory-mapped, not read; files of torch's pre-zip format cannot be
    mapped and are read whole."""
    try:
        return torch.load(path, weights_only=weights_only, map_location="cpu", mmap=True)
    except RuntimeError as err:
        if "mmap can only be used with files saved with" not in str(err):
            raise
        return torch.load(path, weights_only=weights_only, map_location="cpu")


def describe(obj: Any) -> str:
    """A few words on what a loaded file holds, for an error message."""
    if isinstance(obj, dict):
        keys = list(obj)[:4]
        return f"a dict with keys {keys}{' ...' if len(obj) > 4 else ''}"
    return f"a {type(obj).__name__}"


def import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def same_or_subclass(class_path: str | None, base_path: str | None) -> bool:
    """Whether ``class_path`` names ``base_path``'s class or a subclass of it (however either is spelt:
    ``amalgam.AmalgamationModule`` is ``amalgam.module.AmalgamationModule``)."""
    if not class_path or not base_path:
        return False
    return class_path == base_path or issubclass(import_class(class_path), import_class(base_path))


DESCRIPTION = ("Knowledge amalgamation: one student learns the tasks of several frozen teachers from unlabeled "
               "images (fit, validate, test, predict: Lightning's CLI on a YAML config). `python -m amalgam "
               "export --ckpt RUN.ckpt --out DIR` writes the trained student alone.")


def progress_bar() -> ProgressBar:
    """Rich's bar in a terminal. Written to a file or a pipe (SLURM, nohup, ``| tee``), Rich shows nothing until
    the run ends, so there a tqdm bar, written out every 20 steps."""
    if sys.stdout.isatty():
        return RichProgressBar()
    return TQDMProgressBar(refresh_rate=20)


def main(args: list[str] | None = None, run: bool = True) -> AmalgamCLI:
    # No hub look-ups: weights come from local checkpoints, and an offline lookup retries for ~46 s.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AmalgamCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "python -m amalgam", "description": DESCRIPTION},
        args=args,
        run=run,
    )


# Errors a user can cause and fix (a path, a config value, a checkpoint, a diverging loss, an optional package
# not installed): one readable line.
USER_ERRORS = (ValueError, OSError, FloatingPointError, MisconfigurationException, ImportError)


def entry_point(args: list[str] | None = None) -> int:
    """``python -m amalgam`` and the ``amalgam`` script. Returns the exit status.

    A user error ends in ``amalgam: error: <message>`` on stderr and status 1, not in a traceback to decode
    (``AMALGAM_TRACEBACK=1`` shows it). Config typos and wrong types are jsonargparse's (status 2).
    """
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv[:1] == ["export"]:
            from amalgam.export import export_main

            export_main(argv[1:])
        else:
            main(args)  # None: LightningCLI reads sys.argv itself (and warns if given both)
    except SIGTERMException:
        print("amalgam: stopped by SIGTERM after the current step; resume with --ckpt_path last (a run whose "
              "ModelCheckpoint keeps a last checkpoint, save_last: true)", file=sys.stderr)
        return 143
    except (*USER_ERRORS, RuntimeError) as err:
        if os.environ.get("AMALGAM_TRACEBACK") or not (isinstance(err, USER_ERRORS) or is_mismatched_checkpoint(err)):
            raise
        print(f"amalgam: error: {user_message(err)}\n(set AMALGAM_TRACEBACK=1 for the full traceback)",
              file=sys.stderr)
        return 1
    return 0


def is_mismatched_checkpoint(err: BaseException) -> bool:
    """``load_state_dict``'s error: the model the config builds is not the one the checkpoint holds."""
    return isinstance(err, RuntimeError) and str(err).startswith("Error(s) in loading state_dict")


def user_message(err: BaseException) -> str:
    """The message of the error the user should read.

    jsonargparse wraps errors raised while it builds the model or data ("Does not validate against any of the
    Union subtypes ..."): the cause is the real one. A DataLoader worker's error arrives with the worker's
    traceback in its message: its last line is the real one.
    """
    while err.__cause__ is not None and "Does not validate against any of the Union subtypes" in str(err):
        err = err.__cause__
    text = str(err).strip()
    if is_mismatched_checkpoint(err):
        first = next((line.strip() for line in text.splitlines()[1:] if line.strip()), "")
        return (f"the model this config builds differs from the one in the checkpoint ({first[:300]}): run "
                f"with the config of the run that wrote it (LightningCLI saved it as config.yaml in that run's log "
                f"folder), changing only what does not change the model's shape")
    if "Original Traceback (most recent call last)" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text or type(err).__name__


if __name__ == "__main__":
    sys.exit(entry_point())
