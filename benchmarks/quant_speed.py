"""Speed of a method's calibration and of fake-quant evaluation, as ratios to the float forward.

Prints, for one method on one timm model (random weights: timing does not depend on them):

- calibration ratio  = time of ``method.quantize`` on N calibration images
                       / time of one float forward over the same N images;
- evaluation ratio   = time of the fake-quant model over M evaluation images
                       / time of the float model over the same M images.

Both ratios are measured in one run, alternating float and quantized timings, and the median of
``--repeats`` is reported, because these machines are noisy. Goals for repq-vit (issue 4):
calibration <= 5x, evaluation <= 1.5x.

    python benchmarks/quant_speed.py --method repq-vit --model deit_small_patch16_224
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from benchsuite import registry
from benchsuite.api import CalibrationSet
from benchsuite.bits import BitSpec
from benchsuite.quant.adapters import adapt


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_all(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> None:
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="repq-vit")
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--bits", default="w4a4")
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--eval-images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    calib = torch.randn(args.calib_size, 3, 224, 224, generator=generator)
    evaluation = torch.randn(args.eval_images, 3, 224, 224, generator=generator)
    method = registry.methods.get(args.method)()
    config = method.default_config()
    bits = BitSpec.parse(args.bits)

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return timm.create_model(args.model, pretrained=False).eval()

    float_model = fresh_model()
    forward_all(float_model, calib[:2], 2)  # warm-up

    calib_float, calib_method, eval_float, eval_quant = [], [], [], []
    for _ in range(args.repeats):
        calib_float.append(timed(lambda: forward_all(float_model, calib, len(calib))))
        canonical = adapt(fresh_model())
        calibration = CalibrationSet.from_tensor(calib, [str(i) for i in range(len(calib))], "random", 0)
        calib_method.append(timed(lambda: method.quantize(canonical, calibration, bits, config)))
        eval_float.append(timed(lambda: forward_all(float_model, evaluation, args.batch_size)))
        eval_quant.append(timed(lambda: forward_all(canonical, evaluation, args.batch_size)))

    def report(name: str, numerator: list[float], denominator: list[float], goal: float) -> None:
        ratio = statistics.median(n / d for n, d in zip(numerator, denominator))
        verdict = "meets" if ratio <= goal else "misses"
        print(
            f"{name:<12} {statistics.median(numerator):8.2f} s vs float {statistics.median(denominator):8.2f} s"
            f"  ratio {ratio:5.2f}x  (goal <= {goal}x: {verdict})"
        )

    print(
        f"{args.method} {bits} on {args.model}, {torch.get_num_threads()} threads, "
        f"calibration {args.calib_size} images, evaluation {args.eval_images} images "
        f"(batch {args.batch_size}), median of {args.repeats}"
    )
    report("calibration", calib_method, calib_float, 5.0)
    report("evaluation", eval_quant, eval_float, 1.5)


if __name__ == "__main__":
    main()
