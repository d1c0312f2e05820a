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
    """The bootstrap's own flags; every other flag is passed on to ``steelkit kernel`` (see its ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-root", type=Path, default=Path("/kaggle/input"))
    parser.add_argument("--working-dir", type=Path, default=Path("/kaggle/working"))
    parser.add_argument("--competition-dir", type=Path, default=None, help="default: found under --input-root")
    parser.add_argument("--dataset-dir", type=Path, default=None, help="default: found under --input-root")
    parser.add_argument("--time-limit", type=float, default=3600.0, help="seconds from start (Kaggle: 1 hour)")
    return parser.parse_known_args(argv)


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


def file_signature(path):
    """(inode, size, mtime_ns) of a file, or None: a submission this run wrote differs from one left before it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def fallback_submission(args, stale):
    """Write the all-empty submission with the standard library alone, unless this run already wrote one."""
    out = args.working_dir / "submission.csv"
    now = file_signature(out)
    if now is not None and now != stale:
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
    try:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for row in body:
                writer.writerow([("" if i == encoded else value) for i, value in enumerate(row)])
        os.replace(tmp, out)
    except OSError as err:
        print(f"steelkit bootstrap: cannot write {out}: {err}", flush=True)
        if os.path.exists(tmp):
            os.unlink(tmp)
        return
    print(f"steelkit bootstrap: wrote the all-empty submission {out} from {samples[0]}", flush=True)


#: glibc malloc setting the kernel runs with: buffers from 64 KiB up are mapped, so freed ones go back to the OS
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def relaunch_with_malloc_setting(argv):
    """Re-run this script once with :data:`MALLOC_ENV` set (glibc reads it only at start-up).

    Streaming thousands of test images through the ensemble fragments glibc's heap: predicting 1,000 full-size images
    (``bench/speed.py``, memory section) peaked at 2,943 MiB resident without it and 1,543 MiB with it, in the same
    time. Anything unusual (not Linux, already set, exec refused) simply goes on in this process.
    """
    if not sys.platform.startswith("linux") or all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    try:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], {**os.environ, **MALLOC_ENV})
    except OSError as err:
        print(f"steelkit bootstrap: running without {MALLOC_ENV} ({err})", flush=True)


def main(argv=None):
    start = time.perf_counter()
    if argv is None:
        relaunch_with_malloc_setting(sys.argv[1:])
    args, rest = parse_args(argv)
    stale = file_signature(args.working_dir / "submission.csv")
    try:
        try:
            args.working_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"cannot create the working folder {args.working_dir}: {err.strerror or err}") from None
        install(find_wheel(args), args.working_dir / PACKAGES_DIR)
        import steelkit
        from steelkit.cli import main as steelkit_main

        print(f"steelkit bootstrap: steelkit {steelkit.__version__} from {Path(steelkit.__file__).parent}", flush=True)
        command = ["kernel", "--input-root", str(args.input_root), "--working-dir", str(args.working_dir)]
        for flag, value in (("--competition-dir", args.competition_dir), ("--dataset-dir", args.dataset_dir)):
            if value is not None:
                command += [flag, str(value)]
        command += ["--time-limit", str(args.time_limit - (time.perf_counter() - start))] + rest
        code = steelkit_main(command)
        if code:
            print(f"steelkit bootstrap: steelkit kernel exited with {code}", flush=True)
    except Exception as err:  # noqa: BLE001 - a Kaggle kernel must end with a submission whatever happened
        import traceback

        traceback.print_exc()
        print(f"steelkit bootstrap: FAILED: {type(err).__name__}: {err}", flush=True)
    finally:
        fallback_submission(args, stale)


if __name__ == "__main__":
    main()
