"""Checkpoints of an nnssl trainer: nnU-Net's checkpoint plus all semi-supervised state, written atomically,
read with clear errors and a fallback on ``--c``.

``network_weights`` stays what ``nnUNetv2_predict`` loads; everything else (extra networks, their optimizers, the
step counter, hyperparameters, seed and random streams, the log's kinds, a method's own state) is under the key
``"nnssl"``.
"""

from __future__ import annotations

import glob
import os
import time
from typing import Optional, Tuple

import torch

from nnssl import seeding
from nnssl.networks.modules import unwrap_network


# ``--c`` and a checkpoint that cannot be read: start over (1) instead of failing when nothing readable is left
RESTART_ON_BAD_CHECKPOINT = "nnssl_restart_on_bad_checkpoint"
# test hook: seconds to sleep between writing a checkpoint's temporary file and renaming it (the kill tests)
SLOW_CHECKPOINT_TEST_HOOK = "nnssl_test_slow_checkpoint_s"
CONTINUE_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")  # what --c tries


def _read_checkpoint(path: str, device: torch.device) -> Tuple[Optional[dict], Optional[str]]:
    """``(checkpoint, None)``, or ``(None, what is wrong)`` for a file that is empty, truncated, garbage or no
    nnU-Net checkpoint."""
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # torch raises RuntimeError (zip), UnpicklingError, EOFError, ... for a bad file
        size = os.path.getsize(path)
        if size == 0:
            return None, "empty file"
        return None, f"truncated or not a checkpoint, {size} bytes: {type(e).__name__}: {str(e).split('. ')[0]}"
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        return None, "not an nnU-Net checkpoint (no network_weights)"
    return checkpoint, None


class SSLCheckpoints:
    """Mixin of :class:`nnssl.trainers.base.nnSSLTrainer`: ``save_checkpoint`` and ``load_checkpoint``."""

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus the ``"nnssl"`` state, written atomically: to ``<filename>.tmp<pid>`` in the
        same folder (flushed to disk), then ``os.replace``. A run killed while writing leaves the previous file
        intact and at most that temporary file, which no ``--c`` reads (its name does not end in ``.pth``) and the
        next checkpoint written into the folder removes (one run per output folder, as nnU-Net assumes).

        While :meth:`train_step` is skipping non-finite steps, an existing checkpoint is not replaced, so
        ``checkpoint_latest``/``checkpoint_best`` stay the last ones from before the first skip; a checkpoint that
        does not exist yet (``checkpoint_final`` of a run that ends while skipping) is written: skipped steps
        change no weights.

        Test hook: ``$nnssl_test_slow_checkpoint_s`` seconds of sleep between writing the temporary file and the
        rename, so that the kill tests can kill the run in that window; not for normal use.
        """
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        if self._nonfinite_streak and os.path.isfile(filename):
            self.print_to_log_file(f"WARNING: {os.path.basename(filename)} kept as it is, not replaced: the last "
                                   f"{len(self._nonfinite_streak)} steps were skipped for non-finite values")
            return
        checkpoint = {
            "network_weights": self.unwrapped_network.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "nnssl": {
                "global_step": self.global_step,
                "modules": {k: unwrap_network(m)[0].state_dict() for k, m in self.ssl_modules.items()},
                "optimizers": {k: o.state_dict() for k, o in self.ssl_optimizers.items()},
                "hyperparameters": self.ssl_hyperparameters(),
                "seed": self.resolved_seed,
                "rng_state": seeding.rng_state(),
                "batch_rng_state": self.batch_rng.bit_generator.state,
                "log_kinds": dict(self.logger.local_logger.kinds),
                "extra": self.ssl_extra_state(),
            },
        }
        for leftover in glob.glob(os.path.join(glob.escape(os.path.dirname(filename)), "*.pth.tmp[0-9]*")):
            os.remove(leftover)  # of a run killed while writing
        tmp = f"{filename}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            if os.environ.get(SLOW_CHECKPOINT_TEST_HOOK):
                time.sleep(float(os.environ[SLOW_CHECKPOINT_TEST_HOOK]))
            os.replace(tmp, filename)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's restore (accepting a path or a loaded dict) plus the ``"nnssl"`` state.

        A path that cannot be read (empty, truncated, garbage, no nnU-Net checkpoint) never ends in an unpickling
        traceback. With ``--c`` (nnU-Net passes checkpoint_final, else checkpoint_latest, else checkpoint_best)
        the next readable one of that order in the same folder is used instead, and the log says which; with
        none left, ``$nnssl_restart_on_bad_checkpoint=1`` starts the training over (said in the log), otherwise a
        RuntimeError names the file, the problem and both ways out. Without ``--c`` (``--val``, ``--val_best``,
        a caller's path) that RuntimeError comes at once.
        """
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(filename_or_checkpoint, str):
            path = filename_or_checkpoint
            checkpoint, problem = _read_checkpoint(path, self.device)
            folder, name = os.path.split(path)
            resuming = bool(self.logger.resume) and name in CONTINUE_ORDER  # --c
            later = CONTINUE_ORDER[CONTINUE_ORDER.index(name) + 1:] if resuming else ()
            fallbacks = [f for f in later if os.path.isfile(os.path.join(folder, f))]
            while checkpoint is None and fallbacks:
                fallback = fallbacks.pop(0)
                checkpoint, fallback_problem = _read_checkpoint(os.path.join(folder, fallback), self.device)
                if checkpoint is None:
                    problem += f"; {fallback} cannot be read either ({fallback_problem})"
                else:
                    self.print_to_log_file(f"WARNING: {path} cannot be read ({problem}); resuming from {fallback} "
                                           f"(epoch {checkpoint['current_epoch']}) instead")
            if checkpoint is None and resuming:
                problem += f"; no readable {' or '.join(later)} to resume from" if later else ""
                if os.environ.get(RESTART_ON_BAD_CHECKPOINT) == "1":
                    self.print_to_log_file(f"WARNING: {path} cannot be read ({problem}); "
                                           f"{RESTART_ON_BAD_CHECKPOINT}=1: starting this training over")
                    return
                raise RuntimeError(f"{path} cannot be read ({problem}); to train this fold from the start, rerun "
                                   f"with {RESTART_ON_BAD_CHECKPOINT}=1 or delete the file")
            if checkpoint is None:
                raise RuntimeError(f"{path} cannot be read ({problem}); rerun the training with --c to write it "
                                   f"again (it resumes from the last readable checkpoint)")
        state = {(k[7:] if k.startswith("module.") else k): v for k, v in checkpoint["network_weights"].items()}
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.unwrapped_network.load_state_dict(state)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

        ssl = checkpoint.get("nnssl")
        if ssl is None:
            self.print_to_log_file("WARNING: this checkpoint has no nnssl state (not written by an nnssl trainer); "
                                   "extra networks start from the student and the step counter from the epoch")
            self.global_step = self.current_epoch * self.num_iterations_per_epoch
            return
        self.global_step = int(ssl["global_step"])
        for name, module in self.ssl_modules.items():
            if name not in ssl["modules"]:
                raise RuntimeError(f"checkpoint has no state for the extra network {name!r}")
            unwrap_network(module)[0].load_state_dict(ssl["modules"][name])
        for name, optimizer in self.ssl_optimizers.items():
            if name not in ssl["optimizers"]:
                raise RuntimeError(f"checkpoint has no state for the extra optimizer {name!r}")
            optimizer.load_state_dict(ssl["optimizers"][name])
        # written since the seams round (older checkpoints resume with fresh random streams and name-less kinds)
        if ssl.get("rng_state") is not None and self.resolved_seed is not None:
            seeding.set_rng_state(ssl["rng_state"])
        if ssl.get("batch_rng_state") is not None:
            self.batch_rng.bit_generator.state = ssl["batch_rng_state"]
        self.logger.local_logger.kinds.update(ssl.get("log_kinds", {}))
        self.load_ssl_extra_state(ssl.get("extra", {}))
        self._ssl_state_loaded = True
