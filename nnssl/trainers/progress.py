"""nnU-Net's local logger with the semi-supervised terms: one value per epoch, plotted in progress.png."""

from __future__ import annotations

import math

from nnunetv2.training.logging.nnunet_logger import LocalLogger

NNUNET_KEYS = ("mean_fg_dice", "ema_fg_dice", "dice_per_class_or_region", "train_losses", "val_losses", "lrs",
               "epoch_start_timestamps", "epoch_end_timestamps")
# SSL keys are plotted by kind: counts (``n_*``), schedules (names with these markers) and losses (the rest)
SCHEDULE_MARKERS = ("weight", "decay", "ratio", "threshold", "share")
VAL_DICE_PREFIX = "val_dice_"  # validation pseudo-Dice of a trainer's other networks (``validation_networks``)


class SSLLocalLogger(LocalLogger):
    """``LocalLogger`` that accepts new keys (SSL terms) and adds a panel for them to progress.png.

    A key first logged at epoch ``e > 0`` is back-filled with NaN for epochs ``0..e-1`` so that every list keeps
    one value per epoch (nnU-Net's plot relies on that).
    """

    def register(self, key: str, epoch: int) -> None:
        if key not in self.my_fantastic_logging:
            self.my_fantastic_logging[key] = [math.nan] * epoch

    def ssl_keys(self) -> list:
        # timings (e.g. the budget variants' train_phase_seconds) are not semi-supervised terms, and the extra
        # networks' validation pseudo-Dice (val_dice_<name>) is drawn beside nnU-Net's
        return [k for k in self.my_fantastic_logging if k not in NNUNET_KEYS and not k.endswith("_seconds")
                and not k.startswith(VAL_DICE_PREFIX)]

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
        ssl = self.ssl_keys()
        sns.set(font_scale=2.5)
        fig, axes = plt.subplots(5 if ssl else 3, 1, figsize=(30, 90 if ssl else 54))

        ax = axes[0]
        ax2 = ax.twinx()
        ax.plot(x, log["train_losses"][:epoch + 1], color="b", ls="-", label="loss_tr", linewidth=4)
        ax.plot(x, log["val_losses"][:epoch + 1], color="r", ls="-", label="loss_val", linewidth=4)
        ax2.plot(x, log["mean_fg_dice"][:epoch + 1], color="g", ls="dotted", label="pseudo dice", linewidth=3)
        ax2.plot(x, log["ema_fg_dice"][:epoch + 1], color="g", ls="-", label="pseudo dice (mov. avg.)", linewidth=4)
        for k in (k for k in log if k.startswith(VAL_DICE_PREFIX)):
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
            counts = [k for k in ssl if k.startswith("n_")]
            schedules = [k for k in ssl if k not in counts and any(m in k for m in SCHEDULE_MARKERS)]
            losses = [k for k in ssl if k not in counts and k not in schedules]
            # supervised loss on the left axis, the (much smaller) unlabeled terms on the right
            self._panel(axes[3], x, epoch, [k for k in losses if k == "sup_loss"],
                        [k for k in losses if k != "sup_loss"], "supervised loss", "unlabeled terms")
            self._panel(axes[4], x, epoch, schedules, counts, "weights / schedules", "samples per step")

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
