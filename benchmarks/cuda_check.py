"""The CUDA paths of nnssl's trainers in one short run, for a GPU machine: AMP, the GradScaler, torch.compile.

    python benchmarks/cuda_check.py --out OUT                       # on a GPU (default: MEDL and CAD, 3d + 2d)
    python benchmarks/cuda_check.py --out /tmp/cc --device cpu --trainers nnSSL_MEDLTrainer \\
        --configurations 2d --plans cpu                             # the same chain on the CPU (a dry run)

In a fresh workspace (``--work``, default a temporary folder), each step a real console script run as a child
process: the synthetic dataset (:mod:`nnssl.dataset_conversion.synthetic`, ``--shape`` voxels per case),
``nnUNetv2_plan_and_preprocess`` (nnU-Net's own plans; ``--plans cpu`` adds and uses ``nnssl_make_cpu_plans``),
``nnssl_preprocess_unlabeled``, ``nnssl_make_split --labeled 25%``; then for each configuration and trainer
``nnUNetv2_train ... -tr <Trainer>_<E>epochs_<I>iters_<V>valiters -device cuda`` with ``nnUNet_compile=t``
(``--no-compile`` for f) and ``nnUNetv2_predict`` of the test images. Per run it records: exit status (and the
output's tail when it failed), wall seconds of training and prediction, seconds per iteration (median epoch,
so the compiling first epoch does not count when E >= 3), the last epoch's loss terms, validation pseudo-Dice,
steps the GradScaler (CUDA) or the CPU path skipped for non-finite gradients, the GradScaler's final scale, the
GPU's peak memory in use (``nvidia-smi``, whole device), and whether every test image got a prediction whose
labels are the dataset's. Before the runs it checks MEDL's evidential maths in fp16 autocast on the device
(finite losses and gradients for tiny and huge logits).

Results: ``OUT/cuda_check.json`` (rewritten after every step, so a run stopped at its time limit still leaves
what it finished), ``OUT/cuda_check.md`` and every step's output in ``OUT/cuda_check_log.txt``. ``--budget-s``
starts no new run after that many seconds.

On the lent GPU machine of this workplace (Python 3.12, torch there, nnU-Net not), ``benchmarks/device_site.sh``
first packs nnU-Net and the other missing packages into ``.device_site/site312.tar.xz``; the device call is

    tar -xJf .device_site/site312.tar.xz -C /tmp/site && PYTHONPATH=/tmp/site python3 benchmarks/cuda_check.py --out $OUT

(see ``benchmarks/device_site.sh`` for the whole command).
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from nnssl.trainers.registry import trainer_names  # noqa: E402
from nnssl.utils import UserInputError, run_command  # noqa: E402
from nnssl.workflow import Workspace, nnunet_env, planner_env  # noqa: E402

DATASET_ID = 991
DATASET = f"Dataset{DATASET_ID}_nnsslCudaCheck"


def setup_py_scripts() -> Dict[str, str]:
    """nnssl's console scripts (name -> entry point) as setup.py declares them: the fallback where nnssl runs
    from the source tree, without the installed metadata that has them (the GPU machine)."""
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            return dict((part.strip() for part in line.split("=", 1))
                        for line in ast.literal_eval(node.value)["console_scripts"])
    raise UserInputError(f"{os.path.join(REPO, 'setup.py')} declares no entry_points")


def python_c(name: str, entry_point: str) -> List[str]:
    """The command that runs the entry point ``module:function`` as the console script ``name`` would."""
    module, func = entry_point.split(":")
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; "
                                  f"sys.exit({func}())"]


def console(name: str) -> List[str]:
    """A console script as ``python -c ...`` from its entry point: the installed one, else setup.py's (works where
    the packages are only on PYTHONPATH and their scripts were not installed)."""
    found = [e.value for e in importlib.metadata.entry_points(group="console_scripts") if e.name == name]
    entry_point = found[0] if found else setup_py_scripts().get(name)
    if entry_point is None:
        raise UserInputError(f"console script {name} not found: is nnunetv2 importable (PYTHONPATH)?")
    return python_c(name, entry_point)


class GpuMemoryPeak:
    """Peak memory in use on the GPU (MiB, all processes) while the block runs, polled with nvidia-smi."""

    def __init__(self, period_s: float = 0.5):
        self.period_s, self.peak, self._stop = period_s, None, threading.Event()
        self.available = shutil.which("nvidia-smi") is not None

    def _poll(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                used = max(float(v) for v in out.split())
                self.peak = used if self.peak is None else max(self.peak, used)
            except Exception:  # noqa: BLE001 - a failed poll only loses one sample
                pass
            self._stop.wait(self.period_s)

    def __enter__(self):
        if self.available:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()


def evidential_fp16_check(device: str) -> dict:
    """MEDL's fusion, reliability and Fisher loss on fp16 logits inside autocast: finite values and gradients."""
    import torch

    from nnssl.losses.evidential import caef_fusion, dirichlet_alpha, fisher_evidential_loss, opinion, reliability

    out = {}
    for scale in (1e-3, 1.0, 1e4):
        logits = (torch.randn(2, 3, 8, 8, 8, device=device) * scale).half().requires_grad_(True)
        target = torch.randint(0, 3, (2, 8, 8, 8), device=device)
        with torch.autocast(device, enabled=device == "cuda"):
            with torch.autocast(device, enabled=False):  # as the trainer: evidential maths in fp32
                alpha = dirichlet_alpha(logits.float())
                b, u = opinion(alpha)
                b_f, u_f = caef_fusion(b.detach(), u.detach(), b.flip(0).detach(), u.flip(0).detach())
                loss = fisher_evidential_loss(alpha, target, 0.01) + reliability(b_f, u_f).mean()
        loss.backward()
        out[f"logit_scale_{scale:g}"] = {"loss": loss.detach().item(), "finite": bool(torch.isfinite(loss)),
                                         "grad_finite": bool(torch.isfinite(logits.grad).all())}
    return out


class Check:
    def __init__(self, args):
        self.a = args
        self.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="nnssl_cuda_check_"))
        os.makedirs(args.out, exist_ok=True)
        env = nnunet_env(self.work, nnUNet_compile="f" if args.no_compile or args.device == "cpu" else "t",
                         PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        if args.device == "cpu":
            env.update(nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1")
        # every step's output in OUT/cuda_check_log.txt, so that it comes back from the GPU machine
        self.ws = Workspace(self.work, env, log=os.path.join(args.out, "cuda_check_log.txt"), echo="cuda_check")
        self.plans = "nnUNetPlans_cpu" if args.plans == "cpu" else "nnUNetPlans"
        self.start = time.time()
        self.results = {"device": args.device, "command": "python benchmarks/cuda_check.py " + " ".join(sys.argv[1:]),
                        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
                        "nnUNet_compile": env["nnUNet_compile"], "steps": [], "runs": []}

    def save(self) -> None:
        with open(os.path.join(self.a.out, "cuda_check.json"), "w") as f:
            json.dump(self.results, f, indent=1)

    def sh(self, cmd: List[str], title: str, env: Optional[dict] = None, timeout: Optional[float] = None) -> dict:
        """Run a step, recording its failure instead of raising it."""
        with GpuMemoryPeak() as mem:
            step = self.ws.run(cmd, title, env=env, timeout=timeout, check=False)
        return {"step": title, "ok": step.ok, "returncode": "timeout" if step.timed_out else step.returncode,
                "seconds": round(step.seconds, 1), "gpu_peak_memory_mib": mem.peak,
                **({} if step.ok else {"output_tail": step.tail()})}

    def prepare(self) -> bool:
        from nnssl.dataset_conversion.synthetic import make_synthetic_dataset

        a = self.a
        make_synthetic_dataset(self.ws.raw, DATASET_ID, "nnsslCudaCheck", n_labeled=16, n_unlabeled=8,
                               n_test=3, shape=tuple(a.shape))
        steps = [(console("nnUNetv2_plan_and_preprocess") + ["-d", str(DATASET_ID), "-c", *a.configurations,
                                                              "-np", "4", "-npfp", "2"], "plan and preprocess",
                  planner_env(self.ws.env))]
        if self.plans == "nnUNetPlans_cpu":
            steps.append((console("nnssl_make_cpu_plans") + ["-d", str(DATASET_ID), "--batch-size", "2"],
                          "cpu plans", None))
        steps += [(console("nnssl_preprocess_unlabeled") + ["-d", str(DATASET_ID), "-c", *a.configurations, "-p",
                                                            self.plans, "--no-progress"], "preprocess unlabeled",
                   None),
                  (console("nnssl_make_split") + ["-d", str(DATASET_ID), "--labeled", "25%"], "split", None)]
        for cmd, title, env in steps:
            r = self.sh(cmd, title, env)
            self.results["steps"].append(r)
            self.save()
            if not r["ok"]:
                return False
        return True

    def run_one(self, configuration: str, trainer: str) -> dict:
        import torch

        a = self.a
        variant = f"{trainer}_{a.epochs}epochs_{a.iters}iters_{a.val_iters}valiters"
        run = {"configuration": configuration, "trainer": trainer}
        remaining = a.budget_s - (time.time() - self.start)
        train = self.sh(console("nnUNetv2_train") + [str(DATASET_ID), configuration, "0", "-tr", variant, "-p",
                                                     self.plans, "-device", a.device],
                        f"train {trainer} {configuration}", timeout=max(60.0, remaining + 120.0))
        run["train"] = train
        if not train["ok"]:
            return run
        out = os.path.join(self.ws.results, DATASET, f"{variant}__{self.plans}__{configuration}", "fold_0")
        ckpt = torch.load(os.path.join(out, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
        log = ckpt["logging"]
        phase = log.get("train_phase_seconds", [])
        terms = {k: float(v[-1]) for k, v in log.items() if isinstance(v, list) and v and k.endswith("_loss")}
        scaler = ckpt.get("grad_scaler_state")
        run.update({
            "seconds_per_iteration": float(np.median(phase)) / a.iters if phase else None,
            "train_losses": [float(v) for v in log["train_losses"]],
            "val_losses": [float(v) for v in log["val_losses"]],
            "losses_finite": bool(np.all(np.isfinite(log["train_losses"] + log["val_losses"]))),
            "last_epoch_terms": terms,
            "ema_pseudo_dice": [float(v) for v in log["ema_fg_dice"]],
            "nonfinite_grad_skips_per_epoch": [float(v) for v in log.get("n_nonfinite_grad_skips", [])],
            "grad_scaler_scale": None if not scaler else float(scaler.get("scale", float("nan"))),
        })
        preds = os.path.join(self.work, "preds", f"{trainer}_{configuration}")
        images = os.path.join(self.ws.raw, DATASET, "imagesTs")
        pred = self.sh(console("nnUNetv2_predict") + ["-i", images, "-o", preds, "-d", str(DATASET_ID), "-c",
                                                      configuration, "-f", "0", "-tr", variant, "-p", self.plans,
                                                      "-device", a.device, "-npp", "1", "-nps", "1"],
                       f"predict {trainer} {configuration}")
        run["predict"] = pred
        if pred["ok"]:
            import SimpleITK as sitk

            files = sorted(f for f in os.listdir(preds) if f.endswith(".nii.gz"))
            labels = set()
            for f in files:
                labels |= set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(preds, f)))).tolist())
            run["predictions"] = {"files": len(files), "expected": len(os.listdir(images)),
                                  "labels": sorted(int(v) for v in labels)}
            run["predictions_ok"] = len(files) == len(os.listdir(images)) and labels <= {0, 1, 2}
        return run

    def run(self) -> None:
        import torch

        a = self.a
        self.results.update(torch=torch.__version__, cuda=torch.version.cuda,
                            gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
        if a.device == "cuda" and not torch.cuda.is_available():
            raise UserInputError("--device cuda but torch sees no GPU")
        self.results["evidential_fp16"] = evidential_fp16_check(a.device)
        self.save()
        if self.prepare():
            for configuration in a.configurations:
                for trainer in a.trainers:
                    if time.time() - self.start > a.budget_s:
                        self.results["runs"].append({"configuration": configuration, "trainer": trainer,
                                                     "skipped": f"time budget of {a.budget_s} s spent"})
                    else:
                        self.results["runs"].append(self.run_one(configuration, trainer))
                    self.save()
        self.results["seconds"] = round(time.time() - self.start, 1)
        self.save()
        self.write_md()
        if not a.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    def write_md(self) -> None:
        r = self.results
        lines = [f"# CUDA check ({r['device']}, {r.get('gpu')}, torch {r.get('torch')}, CUDA {r.get('cuda')}, "
                 f"nnUNet_compile={r['nnUNet_compile']})", "", f"`{r['command']}`", "",
                 "| configuration | trainer | train | s/it | losses finite | skipped steps | scaler scale | "
                 "pseudo-Dice | GPU peak MiB | predict |", "|---|---|---|---|---|---|---|---|---|---|"]
        for run in r["runs"]:
            if "skipped" in run:
                lines.append(f"| {run['configuration']} | {run['trainer']} | {run['skipped']} |||||||| ")
                continue
            t = run["train"]
            if not t["ok"]:
                lines.append(f"| {run['configuration']} | {run['trainer']} | FAILED ({t['returncode']}) |||||||| ")
                continue
            spi = run["seconds_per_iteration"]
            skips = sum(run["nonfinite_grad_skips_per_epoch"]) if run["nonfinite_grad_skips_per_epoch"] else "-"
            dice = run["ema_pseudo_dice"][-1] if run["ema_pseudo_dice"] else float("nan")
            pred = run.get("predict", {})
            lines.append(f"| {run['configuration']} | {run['trainer']} | {t['seconds']} s | "
                         f"{'-' if spi is None else f'{spi:.3f}'} | {run['losses_finite']} | {skips} | "
                         f"{run['grad_scaler_scale']} | {dice:.3f} | {t['gpu_peak_memory_mib']} | "
                         f"{'ok' if run.get('predictions_ok') else 'FAILED'} ({pred.get('seconds')} s) |")
        lines += ["", "fp16 evidential maths: " + ", ".join(
            f"{k}: loss {v['loss']:.4g}, finite {v['finite']}, grad finite {v['grad_finite']}"
            for k, v in r.get("evidential_fp16", {}).items()), ""]
        with open(os.path.join(self.a.out, "cuda_check.md"), "w") as f:
            f.write("\n".join(lines))
        print("\n".join(lines), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for cuda_check.json and cuda_check.md")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--trainers", nargs="+", default=["nnSSL_MEDLTrainer", "nnSSL_CADTrainer"],
                   choices=trainer_names(), metavar="TRAINER", help="nnSSL trainers (default: MEDL and CAD)")
    p.add_argument("--configurations", nargs="+", default=["3d_fullres", "2d"])
    p.add_argument("--plans", choices=("default", "cpu"), default="default",
                   help="default: nnU-Net's plans; cpu: nnssl_make_cpu_plans (features x0.25, batch 2)")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64], help="voxels per synthetic case")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (3: the median skips compilation)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--val-iters", type=int, default=4)
    p.add_argument("--no-compile", action="store_true", help="nnUNet_compile=f on CUDA too")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no run after this many seconds")
    p.add_argument("--work", default=None, help="workspace (default: a temporary folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the workspace")
    args = p.parse_args(argv)
    run_command(lambda: Check(args).run())


if __name__ == "__main__":
    main()
