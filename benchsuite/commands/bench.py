"""``benchsuite bench``: run :mod:`benchsuite.bench` from the command line."""

from __future__ import annotations

import argparse

import torch

from benchsuite import registry
from benchsuite.bits import BitSpec
from benchsuite.environment import resolve_device
from benchsuite.errors import BenchsuiteError


def bench(args: argparse.Namespace) -> int:
    from benchsuite.bench import print_bench, run_bench, write_json

    for name in ("calib_size", "eval_images", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise BenchsuiteError(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods or [
        name for name, reason in registry.methods.availability().items()
        if reason is None and registry.methods.get(name).quantizes
    ]
    methods = [registry.methods.entry(name).name for name in methods]
    bits = BitSpec.parse(args.bits)
    if bits.is_float:
        raise BenchsuiteError("bench measures quantization: give --bits such as w4a4")
    device = resolve_device(args.device)
    import timm

    if args.model not in timm.list_models():
        raise BenchsuiteError(f"bench takes a timm model name; {args.model!r} is not one")
    size = timm.create_model(args.model, pretrained=False).pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    peak, rows = run_bench(methods, args.model, bits, calib_size=args.calib_size, eval_images=args.eval_images,
                           batch_size=args.batch_size, iters=args.iters, budget=args.budget, repeats=args.repeats,
                           device=device, image_size=int(size))
    header = (f"{args.model} {bits.name}, {torch.get_num_threads()} threads, {args.calib_size} calibration images, "
              f"{args.iters} steps per unit ({args.budget} budget), eval {args.eval_images} images")
    print_bench(peak, rows, header)
    if args.json is not None:
        write_json(args.json, peak, rows, {k: (str(v) if v is not None else None) for k, v in vars(args).items()})
    return 0
