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
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    Checkpoint,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
    TQDMProgressBar,
)
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from amalgam.callbacks import ExactResume
from amalgam.checkpointing import AtomicCheckpointIO, RefusedCheckpointError, UnreadableCheckpointError


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
        # LightningCLI reads --ckpt_path's hyper-parameters first (with weights_only=True): name a refused file.
        subcommand = self.config.get("subcommand")
        before = copy.deepcopy(self.config[subcommand].get("model")) if subcommand else None
        try:
            if subcommand and self.config[subcommand].get("weights_only") is False:
                self._parse_trusted_ckpt_path()
            else:
                super()._parse_ckpt_path()
        except pickle.UnpicklingError as err:
            raise RefusedCheckpointError(self.config[self.config.subcommand].get("ckpt_path"), err) from err
        except Exception as err:  # torch.load's: a config that does not parse exits (SystemExit) instead
            raise UnreadableCheckpointError(self.config[self.config.subcommand].get("ckpt_path"), err) from err
        if subcommand:
            self._keep_given_model_args(subcommand, before)

    def _keep_given_model_args(self, subcommand: str, before: Any) -> None:
        """LightningCLI lets a checkpoint's saved arguments override the config: a moved project's teacher
        paths, or ``--model.init_args.evaluate_teachers false``, would be silently replaced. The arguments the
        user gave win; the checkpoint fills in only what they left out."""
        given = getattr(self, "_given", None)
        given = given.get(f"{subcommand}.model.init_args") if given is not None else None
        after = self.config[subcommand].get("model")
        if given is None or before is None or after is None or before.get("class_path") != after.get("class_path"):
            return
        for key in vars(given):
            saved, wanted = after["init_args"].get(key), before["init_args"][key]
            # Loss weights the user names change the run's: the checkpoint's others stay (a resumed run's
            # objective must not fall back to the defaults for every term not named).
            merge = key == "loss_weights" and isinstance(saved, dict) and isinstance(wanted, dict)
            after["init_args"][key] = {**saved, **wanted} if merge else wanted

    def _parse_trusted_ckpt_path(self) -> None:
        """LightningCLI's ``_parse_ckpt_path`` for ``--weights_only false``: it always reads with
        ``weights_only=True``, which would refuse the very file the user chose to trust."""
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        # Reached only with the user's own --weights_only false for this file; mmap: the weights stay unread.
        hparams = torch.load(ckpt_path, weights_only=False, map_location="cpu", mmap=True).get("hyper_parameters", {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

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
    except USER_ERRORS as err:
        if os.environ.get("AMALGAM_TRACEBACK"):
            raise
        print(f"amalgam: error: {user_message(err)}\n(set AMALGAM_TRACEBACK=1 for the full traceback)",
              file=sys.stderr)
        return 1
    return 0


def user_message(err: BaseException) -> str:
    """The message of the error the user should read.

    jsonargparse wraps errors raised while it builds the model or data ("Does not validate against any of the
    Union subtypes ..."): the cause is the real one. A DataLoader worker's error arrives with the worker's
    traceback in its message: its last line is the real one.
    """
    while err.__cause__ is not None and "Does not validate against any of the Union subtypes" in str(err):
        err = err.__cause__
    text = str(err).strip()
    if "Original Traceback (most recent call last)" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text or type(err).__name__


if __name__ == "__main__":
    sys.exit(entry_point())
