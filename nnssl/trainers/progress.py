"""The log schema of a semi-supervised step, and nnU-Net's local logger that plots it in progress.png.

Every method's ``compute_loss`` returns a :class:`StepLog`: ``sup_loss``, ``unsup_loss`` and ``unsup_weight``
always, plus the method's extras, each with its kind. The kind, never the name, decides where a value is drawn.
"""

from __future__ import annotations

import math
from typing import Dict

from nnunetv2.training.logging.nnunet_logger import LocalLogger

# kinds of logged values
LOSS = "loss"          # a loss term (before its weight); drawn with the losses
SCHEDULE = "schedule"  # a weight, ramp, threshold or share that follows the training's progress
COUNT = "count"        # samples per step
METRIC = "metric"      # a diagnostic of the step (agreement, reliability, replaced share, ...)
TIMING = "timing"      # seconds spent in a part of the step
VAL_DICE = "val_dice"  # validation pseudo-Dice of another network (``validation_networks``)
KINDS = (LOSS, SCHEDULE, COUNT, METRIC, TIMING, VAL_DICE)
STEP_SCHEMA = ("sup_loss", "unsup_loss", "unsup_weight")  # every method's step logs these
VAL_DICE_PREFIX = "val_dice_"  # validation pseudo-Dice of a trainer's other networks (``validation_networks``)


class StepLog(dict):
    """Name -> value (tensor or float) of one training step, with each name's kind in :attr:`kinds`.

    Made by ``nnSSLTrainer.step_log(sup_loss, unsup_loss, unsup_weight)``, which fills the schema every method
    shares (:data:`STEP_SCHEMA`): ``sup_loss`` (the labeled terms), ``unsup_loss`` (the unlabeled terms before
    their weight) and ``unsup_weight`` (the unlabeled weight now). A method adds its extras with
    :meth:`loss`, :meth:`schedule`, :meth:`metric` and :meth:`timing`.
    """

    def __init__(self):
        super().__init__()
        self.kinds: Dict[str, str] = {}

    def add(self, kind: str, name: str, value) -> "StepLog":
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} for {name!r}; expected one of {KINDS}")
        self[name] = value
        self.kinds[name] = kind
        return self

    def loss(self, name: str, value) -> "StepLog":
        return self.add(LOSS, name, value)

    def schedule(self, name: str, value) -> "StepLog":
        return self.add(SCHEDULE, name, value)

    def metric(self, name: str, value) -> "StepLog":
        return self.add(METRIC, name, value)

    def timing(self, name: str, seconds: float) -> "StepLog":
        return self.add(TIMING, name, seconds)


class SSLLocalLogger(LocalLogger):
    """``LocalLogger`` that accepts new keys of a known kind (SSL terms) and draws them by kind in progress.png.

    A key first logged at epoch ``e > 0`` is back-filled with NaN for epochs ``0..e-1`` so that every list keeps
    one value per epoch (nnU-Net's plot relies on that). Keys logged without a kind (e.g. the budget variants'
    ``train_phase_seconds``) are kept but not drawn. :attr:`kinds` is checkpointed by the trainer.
    """

    def __init__(self, verbose: bool = False):
        super().__init__(verbose)
        self.kinds: Dict[str, str] = {}

    def register(self, key: str, epoch: int, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} for {key!r}; expected one of {KINDS}")
        self.kinds[key] = kind
        if key not in self.my_fantastic_logging:
            self.my_fantastic_logging[key] = [math.nan] * epoch

    def keys_of(self, kind: str) -> list:
        return [k for k in self.my_fantastic_logging if self.kinds.get(k) == kind]

    def plot_progress_png(self, output_folder: str) -> None:
        import matplotlib
        matplotlib.use("agg")
        import matplotlib.pyplot as plt
        import seaborn as sns

        log = self.my_fantastic_logging
        epoch = min(len(v) for v in log.values()) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))
        ssl = any(kind != VAL_DICE for kind in self.kinds.values())
        sns.set(font_scale=2.5)
        fig, axes = plt.subplots(6 if ssl else 3, 1, figsize=(30, 108 if ssl else 54))

        ax = axes[0]
        ax2 = ax.twinx()
        ax.plot(x, log["train_losses"][:epoch + 1], color="b", ls="-", label="loss_tr", linewidth=4)
        ax.plot(x, log["val_losses"][:epoch + 1], color="r", ls="-", label="loss_val", linewidth=4)
        ax2.plot(x, log["mean_fg_dice"][:epoch + 1], color="g", ls="dotted", label="pseudo dice", linewidth=3)
        ax2.plot(x, log["ema_fg_dice"][:epoch + 1], color="g", ls="-", label="pseudo dice (mov. avg.)", linewidth=4)
        for k in self.keys_of(VAL_DICE):
            ax2.plot(x, log[k][:epoch + 1], ls="dashdot", label=f"pseudo dice {k[len(VAL_DICE_PREFIX):]}",
                     linewidth=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax2.set_ylabel("pseudo dice")
        ax.legend(loc=(0, 1))
        ax2.legend(loc=(0.2, 1))

        ax = axes[1]
        durations = [e - s for e, s in zip(log["epoch_end_timestamps"][:epoch + 1],
                                           log["epoch_start_timestamps"][:epoch + 1])]
        ax.plot(x, durations, color="b", ls="-", label="epoch duration", linewidth=4)
        ax.set(ylim=[0, ax.get_ylim()[1]])
        ax.set_xlabel("epoch")
        ax.set_ylabel("time [s]")
        ax.legend(loc=(0, 1))

        ax = axes[2]
        ax.plot(x, log["lrs"][:epoch + 1], color="b", ls="-", label="learning rate", linewidth=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("learning rate")
        ax.legend(loc=(0, 1))

        if ssl:
            losses = self.keys_of(LOSS)
            # supervised loss on the left axis, the (often much smaller) other terms on the right
            self._panel(axes[3], x, epoch, [k for k in losses if k == "sup_loss"],
                        [k for k in losses if k != "sup_loss"], "supervised loss", "other loss terms")
            self._panel(axes[4], x, epoch, self.keys_of(SCHEDULE), self.keys_of(COUNT), "weights / schedules",
                        "samples per step")
            self._panel(axes[5], x, epoch, self.keys_of(METRIC), self.keys_of(TIMING), "diagnostics",
                        "seconds per step")

        plt.tight_layout()
        fig.savefig(f"{output_folder}/progress.png")
        plt.close(fig)

    def _panel(self, ax, x, epoch, left, right, left_label, right_label) -> None:
        log = self.my_fantastic_logging
        ax2 = ax.twinx()
        for k in left:
            ax.plot(x, log[k][:epoch + 1], ls="-", label=k, linewidth=4)
        for k in right:
            ax2.plot(x, log[k][:epoch + 1], ls="--", label=k, linewidth=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel(left_label)
        ax2.set_ylabel(right_label)
        if left:
            ax.legend(loc=(0, 1))
        if right:
            ax2.legend(loc=(0.4, 1))
