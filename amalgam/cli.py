"""``python -m amalgam fit|validate|test|predict --config x.yaml``: a thin LightningCLI.

Models and data modules are given by ``class_path`` (``amalgam.AmalgamationModule``, ``amalgam.Classifier``,
or a subclass in the user's own project), so the same entry point trains teachers and students.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI


class AmalgamCLI(LightningCLI):
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # A rich progress bar unless the config chose another bar or none: long runs should show progress.
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            config["callbacks"] = [*callbacks, RichProgressBar()]
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None, run: bool = True) -> AmalgamCLI:
    # No hub look-ups: weights come from local checkpoints, and an offline lookup retries for ~46 s.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AmalgamCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
