"""Memory and time of M&N's 2D network on one 3D patch, with and without slice chunking.

    python benchmarks/mn_2d_memory.py                                    # CPU: peak RSS, Hippocampus CPU-plans patch
    python benchmarks/mn_2d_memory.py --device cuda --patch 40 56 40 --batch 9

One training step of the 2D network (forward of every slice of ``batch`` patches, backward) per setting: all slices
at once, and chunks of ``--chunks`` slices with gradient checkpointing (the trainer's default is 64 with
checkpointing). Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated``; on the CPU the growth of the peak
resident set of a fresh process over its size after building the network (each setting runs in its own process).
Random weights (no download); results in ``benchmarks/results/mn_2d_memory_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def one(args) -> dict:
    import torch

    from nnssl.networks.pretrained_2d import build_pretrained_2d_network

    torch.manual_seed(0)
    net, _ = build_pretrained_2d_network(args.architecture, args.encoder, args.classes, 1, None,
                                         chunk_slices=args.chunk, checkpoint=args.chunk > 0)
    device = torch.device(args.device)
    net = net.to(device).train()
    x = torch.randn(args.batch, 1, *args.patch, device=device)
    times = []
    for i in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            y = net(x)
        y.float().square().mean().backward()
        peak_mb = None  # on the CPU measured by the parent from this process' peak RSS
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak_mb = round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)
        times.append(time.perf_counter() - start)
        net.zero_grad(set_to_none=True)
    return {"chunk_slices": args.chunk or None, "checkpoint": args.chunk > 0, "peak_mb": peak_mb,
            "seconds_per_step": round(min(times), 3)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--patch", type=int, nargs=3, default=[40, 56, 40], help="patch (D H W); D is sliced")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--architecture", default="Segformer")
    p.add_argument("--encoder", default="mit_b2")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 64, 16], help="0 = all slices at once")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)  # one setting, in a child
    args = p.parse_args(argv)
    if args.chunk is not None:
        print("RESULT " + json.dumps(one(args)))
        return
    rows = []
    for chunk in args.chunks:
        cmd = [sys.executable, __file__, "--device", args.device, "--patch", *map(str, args.patch), "--batch",
               str(args.batch), "--architecture", args.architecture, "--encoder", args.encoder, "--classes",
               str(args.classes), "--repeats", str(args.repeats), "--chunk", str(chunk)]
        out, peak_kb = _run_child(cmd)
        r = json.loads(out.split("RESULT ", 1)[1])
        if args.device == "cpu":  # the child's peak RSS over its size once the network is built (a probe)
            built, _ = _run_child([sys.executable, "-c", _PROBE.format(
                repo=os.path.dirname(HERE), arch=args.architecture, enc=args.encoder, classes=args.classes)])
            r["peak_mb"] = round((peak_kb - float(built.split("BUILT ", 1)[1])) / 1024.0, 1)
        rows.append(r)
        print(r, flush=True)
    slices = args.batch * args.patch[0]
    result = {"device": args.device, "patch": args.patch, "batch": args.batch, "slices_per_step": slices,
              "network": f"{args.architecture} / {args.encoder}", "rows": rows,
              "command": "python benchmarks/mn_2d_memory.py " + " ".join(sys.argv[1:])}
    base = os.path.join(HERE, "results", f"mn_2d_memory_{args.device}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"M&N 2D network ({result['network']}), one training step on {args.batch} patches of "
             f"{'x'.join(map(str, args.patch))} = {slices} slices, {args.device}", "",
             "| slices per forward | gradient checkpointing | peak memory growth (MB) | s/step |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['chunk_slices'] or 'all'} | {'yes' if r['checkpoint'] else 'no'} | {r['peak_mb']} | "
                     f"{r['seconds_per_step']} |")
    lines += ["", f"Reproduce: `{result['command']}`"]
    open(base + ".md", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


_PROBE = """
import resource, sys
sys.path.insert(0, {repo!r})
import torch
from nnssl.networks.pretrained_2d import build_pretrained_2d_network
net, _ = build_pretrained_2d_network({arch!r}, {enc!r}, {classes}, 1, None)
print("BUILT", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _run_child(cmd):
    """stdout and peak RSS (KB) of one run of ``cmd`` (wait4's resource usage of that child alone)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    return out, float(usage.ru_maxrss)


if __name__ == "__main__":
    main()
