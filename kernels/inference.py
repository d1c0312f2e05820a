"""steelkit's Kaggle kernel: install the steelkit wheel offline, then run ``steelkit.kernel``.

On Kaggle this file runs as is, with no arguments: the competition data and the steelkit dataset are found under
``/kaggle/input`` by their marker files, and ``/kaggle/working/submission.csv`` is written. Locally every path can be
overridden, e.g.::

    python kernels/inference.py --input-root sim/input --working-dir sim/working --device cpu --tta h

Only the bootstrap lives here (standard library only, because steelkit is not installed yet): find the wheel,
``pip install --no-index --no-deps`` it into the working folder, import it. Whatever fails, a submission that
answers the sample submission is left in place: the all-empty one if nothing better could be written.
"""

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

#: sub-folder of the working directory that receives the installed wheel
PACKAGES_DIR = ".steelkit_packages"
#: how deep below the input root the wheel and the competition data are searched
MAX_DEPTH = 6


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-root", type=Path, default=Path("/kaggle/input"))
    parser.add_argument("--working-dir", type=Path, default=Path("/kaggle/working"))
    parser.add_argument("--competition-dir", type=Path, default=None, help="default: found under --input-root")
    parser.add_argument("--dataset-dir", type=Path, default=None, help="default: found under --input-root")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--tta", default="h", choices=["none", "h", "v", "hv"])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--no-fp16", action="store_true", help="disable float16 autocast on CUDA")
    parser.add_argument("--time-limit", type=float, default=3300.0, help="seconds from start (Kaggle: 1 hour)")
    return parser.parse_args(argv)


def walk(root, max_depth=MAX_DEPTH):
    """Yield (folder, file names) under root, at most max_depth levels deep, skipping image folders."""
    root = Path(root)
    for current, dirs, files in os.walk(root, followlinks=True):
        if len(Path(current).relative_to(root).parts) >= max_depth:
            dirs[:] = []
        dirs[:] = sorted(d for d in dirs if d not in ("train_images", "test_images") and not d.startswith("."))
        yield Path(current), files


def find_wheel(args):
    roots = [args.dataset_dir] if args.dataset_dir else [args.input_root]
    wheels = sorted(
        folder / f
        for root in roots
        for folder, files in walk(root)
        for f in files
        if f.startswith("steelkit-") and f.endswith(".whl")
    )
    if not wheels:
        raise FileNotFoundError(f"no steelkit-*.whl under {roots[0]}")
    return wheels[-1]


def install(wheel, target):
    """pip install the wheel offline into target and put it first on sys.path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-deps",
        "--upgrade",
        "--quiet",
        "--target",
        str(target),
        "--find-links",
        str(wheel.parent),
        str(wheel),
    ]
    print("steelkit bootstrap:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    sys.path.insert(0, str(target))


def fallback_submission(args):
    """Write the all-empty submission with the standard library alone, unless a submission already exists."""
    out = args.working_dir / "submission.csv"
    if out.exists():
        return
    if args.competition_dir:
        samples = [args.competition_dir / "sample_submission.csv"]
    else:
        samples = [
            folder / "sample_submission.csv"
            for folder, files in walk(args.input_root)
            if "sample_submission.csv" in files
        ]
    if not samples:
        print(
            f"steelkit bootstrap: no sample_submission.csv under {args.input_root}; cannot write a submission",
            flush=True,
        )
        return
    with open(samples[0], newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    encoded = header.index("EncodedPixels")
    tmp = out.with_name(".submission.csv.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in body:
            writer.writerow([("" if i == encoded else value) for i, value in enumerate(row)])
    os.replace(tmp, out)
    print(f"steelkit bootstrap: wrote the all-empty submission {out} from {samples[0]}", flush=True)


def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    args.working_dir.mkdir(parents=True, exist_ok=True)
    try:
        install(find_wheel(args), args.working_dir / PACKAGES_DIR)
        import steelkit
        from steelkit.kernel import KernelSettings, run_kernel

        print(f"steelkit bootstrap: steelkit {steelkit.__version__} from {Path(steelkit.__file__).parent}", flush=True)
        settings = KernelSettings(
            input_root=args.input_root,
            working_dir=args.working_dir,
            competition_dir=args.competition_dir,
            dataset_dir=args.dataset_dir,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            tta=args.tta,
            device=args.device,
            fp16=not args.no_fp16,
            time_limit=args.time_limit - (time.perf_counter() - start),
        )
        run_kernel(settings)
    except Exception as err:  # noqa: BLE001 - a Kaggle kernel must end with a submission whatever happened
        import traceback

        traceback.print_exc()
        print(f"steelkit bootstrap: FAILED: {type(err).__name__}: {err}", flush=True)
    finally:
        fallback_submission(args)


if __name__ == "__main__":
    main()
