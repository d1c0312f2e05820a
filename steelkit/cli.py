"""The ``steelkit`` console script: thin argument parsing over library functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _synth(args) -> None:
    from .synth import synthesize

    summary = synthesize(
        args.out, args.n_train, args.n_test, args.seed, args.height, args.width, args.mask_source, args.layout
    )
    print(
        json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict) or len(v) < 10}, indent=2, default=str)
    )


def _train(args) -> None:
    from .config import load_recipe, parse_overrides
    from .train import train_recipe

    recipe = load_recipe(args.config, parse_overrides(args.set))
    train_recipe(
        recipe,
        args.data,
        args.out,
        device=args.device,
        folds_to_train=args.folds,
        progress=not args.quiet,
        resume=not args.restart,
        jobs=args.jobs,
        skip_bad_rows=args.skip_bad_rows,
    )


def _export(args) -> None:
    from .export import export_run

    export_run(args.runs, args.data, args.out, max_oof_images=args.max_oof_images)


def _kernel(args) -> None:
    from .kernel import KernelSettings, run_kernel
    from .kernel.pseudo import PseudoSettings

    pseudo = PseudoSettings(
        rounds=args.pseudo_rounds,
        steps=args.pseudo_steps,
        lr=args.pseudo_lr,
        batch_size=args.pseudo_batch_size,
        low=args.pseudo_confidence[0],
        high=args.pseudo_confidence[1],
        label_low=args.pseudo_label_confidence[0],
        label_high=args.pseudo_label_confidence[1],
    )
    run_kernel(
        KernelSettings(
            input_root=args.input_root,
            working_dir=args.working_dir,
            competition_dir=args.competition_dir,
            dataset_dir=args.dataset_dir,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            tta=args.tta,
            reduction=args.reduction,
            temperature=args.temperature,
            device=args.device,
            fp16=not args.no_fp16,
            time_limit=args.time_limit,
            safety_margin=args.safety_margin,
            stages=tuple(args.stages),
            gate=args.gate,
            oof_images=args.oof_images,
            oof_scale=args.oof_scale,
            store_scale=args.store_scale,
            pseudo=pseudo,
            max_batch=args.max_batch,
            memory_cap=args.memory_cap,
            stage_submissions=args.stage_submissions,
            model_weights=_weights(args.model_weights),
            seed=args.seed,
            simulate_timeout=tuple(args.simulate_timeout),
        ),
        progress=not args.quiet,
    )


def _weights(items: list[str] | None) -> dict[str, float] | None:
    """``["cpu-tiny-fold0=2", ...]`` to ``{"cpu-tiny-fold0": 2.0}``."""
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--model-weights {item!r} must look like MODEL_NAME=WEIGHT")
        out[name] = float(value)
    return out


def _build_dataset(args) -> None:
    from .manifest import MANIFEST_NAME
    from .packaging import build_dataset

    if (args.runs is None) == (args.manifest is None):
        raise ValueError("give exactly one of --runs or --manifest")
    manifest = args.manifest or args.runs / "export" / MANIFEST_NAME
    build_dataset(manifest, args.out, args.dataset_id, args.title, args.license)


def _score(args) -> None:
    from .scoring import score_submission_file

    score = score_submission_file(args.submission, args.sample, args.labels, (args.height, args.width))
    print(score.summary())


def _presets(args) -> None:
    from .config import load_recipe, preset_names

    for name in preset_names():
        recipe = load_recipe(name)
        jobs = ", ".join(f"{j.name} ({j.model.kind} {j.model.arch}/{j.model.encoder})" for j in recipe.jobs)
        print(f"{name:14s} {recipe.source}\n{'':14s} jobs: {jobs}")


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(
        args.workdir,
        n_train=args.n_train,
        n_test=args.n_test,
        seed=args.seed,
        preset=args.preset,
        kernel_time_limit=args.kernel_time_limit,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steelkit", description="Severstal steel defect segmentation toolkit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic competition folder in the real layout")
    p.add_argument("out", type=Path)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--mask-source", default=None, help="borrow real mask geometry from a Severstal train.csv")
    p.add_argument("--layout", choices=["new", "old"], default="new", help="CSV layout to write")
    p.set_defaults(func=_synth)

    p = sub.add_parser("train", help="train every job and fold of a recipe (a preset or a YAML file)")
    p.add_argument("--config", required=True, help="a YAML file or a preset name (see `steelkit presets`)")
    p.add_argument("--data", type=Path, required=True, help="competition folder (train.csv, train_images/)")
    p.add_argument("--out", type=Path, required=True, help="run folder to write (one sub-folder per job)")
    p.add_argument("--device", default=None)
    p.add_argument("--folds", type=int, nargs="*", default=None, help="train only these folds")
    p.add_argument("--jobs", nargs="*", default=None, help="train only these jobs of the recipe")
    p.add_argument(
        "--set", nargs="*", default=None, metavar="KEY=VALUE", help="override config keys, e.g. optim.epochs=1"
    )
    p.add_argument("--restart", action="store_true", help="ignore fold*/last.pt and train from scratch")
    p.add_argument(
        "--skip-bad-rows", action="store_true", help="drop train.csv rows with a malformed RLE (counted), do not fail"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="TorchScript every fold of a run and write weights_manifest.json")
    p.add_argument("--runs", type=Path, required=True, help="run folder written by `steelkit train`")
    p.add_argument("--data", type=Path, required=True, help="the competition folder the run trained on")
    p.add_argument("--out", type=Path, default=None, help="default: RUNS/export")
    p.add_argument("--max-oof-images", type=int, default=2000, help="images used by the default-threshold search")
    p.set_defaults(func=_export)

    p = sub.add_parser("kernel", help="run the kernel in this process (kernels/inference.py is the Kaggle entry)")
    p.add_argument("--input-root", type=Path, default=Path("/kaggle/input"), help="where inputs are searched")
    p.add_argument("--working-dir", type=Path, default=Path("/kaggle/working"), help="where outputs go")
    p.add_argument("--competition-dir", type=Path, default=None, help="default: found under --input-root")
    p.add_argument("--dataset-dir", type=Path, default=None, help="default: found under --input-root")
    p.add_argument("--batch-size", type=int, default=8, help="test images per batch")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding JPEGs")
    p.add_argument("--tta", default="h", choices=["none", "h", "v", "hv"], help="flip TTA views")
    p.add_argument("--reduction", default="mean", choices=["mean", "sharpen"], help="how TTA views are combined")
    p.add_argument("--temperature", type=float, default=1.0, help="exponent t of --reduction sharpen (mean of p^t)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-fp16", action="store_true", help="disable float16 autocast on CUDA")
    p.add_argument("--time-limit", type=float, default=3600.0, help="seconds from start (Kaggle: 1 hour)")
    p.add_argument("--safety-margin", type=float, default=300.0, help="seconds never planned (max 10%% of the limit)")
    p.add_argument(
        "--stages",
        nargs="*",
        default=["oof", "search", "pseudo", "averaging"],
        choices=["oof", "search", "pseudo", "averaging"],
        help="optional stages to run (predict and write always run)",
    )
    p.add_argument("--gate", default="auto", choices=["auto", "none", "hard", "soft"], help="classifier gating")
    p.add_argument("--oof-images", type=int, default=1000, help="held-out training images for the search")
    p.add_argument("--oof-scale", type=float, default=0.25, help="resolution of the out-of-fold probabilities")
    p.add_argument("--store-scale", type=float, default=0.5, help="resolution of the cached test probabilities")
    p.add_argument("--pseudo-rounds", type=int, default=1, help="pseudo-label rounds")
    p.add_argument("--pseudo-steps", type=int, default=40, help="fine-tuning steps per model per round")
    p.add_argument("--pseudo-lr", type=float, default=1e-4, help="fine-tuning learning rate")
    p.add_argument("--pseudo-batch-size", type=int, default=8, help="fine-tuning batch (half pseudo-labelled)")
    for flag, what in (
        ("--pseudo-confidence", "a class is confidently absent below LOW and present above HIGH (max probability)"),
        ("--pseudo-label-confidence", "the classifier must agree: below LOW for absent, above HIGH for present"),
    ):
        p.add_argument(flag, type=float, nargs=2, default=[0.2, 0.8], metavar=("LOW", "HIGH"), help=what)
    p.add_argument("--max-batch", type=int, default=64, help="images per forward pass (halved on out-of-memory)")
    p.add_argument("--memory-cap", type=int, default=None, help="simulate out-of-memory above this many images")
    p.add_argument("--stage-submissions", action="store_true", help="keep submission_<stage>.csv after each stage")
    p.add_argument(
        "--model-weights", nargs="*", default=None, metavar="NAME=W", help="ensemble weight per model (default 1)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--simulate-timeout",
        nargs="*",
        default=[],
        metavar="STAGE[:N]",
        help="rehearse the time limit: the stage's deadline passes at its N-th check (default 1)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_kernel)

    p = sub.add_parser("build-dataset", help="pack wheel + TorchScript weights + manifest for kaggle datasets create")
    p.add_argument("--runs", type=Path, help="a run folder; its export/weights_manifest.json is packed")
    p.add_argument("--manifest", type=Path, help="pack this weights_manifest.json instead (files beside it)")
    p.add_argument("--out", type=Path, required=True, help="the dataset folder to create")
    p.add_argument("--dataset-id", required=True, help="owner/slug, as for the Kaggle API")
    p.add_argument("--title", default=None, help="dataset title (default: the slug)")
    p.add_argument("--license", default="CC0-1.0")
    p.set_defaults(func=_build_dataset)

    p = sub.add_parser("score", help="score a submission against labels with the competition metric")
    p.add_argument("submission", type=Path)
    p.add_argument("--sample", type=Path, required=True, help="the sample_submission.csv it answers")
    p.add_argument("--labels", type=Path, required=True, help="true masks (train.csv layout)")
    p.add_argument("--height", type=int, default=256, help="image height the RLE indexes into")
    p.add_argument("--width", type=int, default=1600, help="image width the RLE indexes into")
    p.set_defaults(func=_score)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=_presets)

    p = sub.add_parser("demo", help="synthesise, train, export, build the dataset, run the kernel offline, score")
    p.add_argument("--workdir", type=Path, default=Path("demo_run"))
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="cpu-tiny")
    p.add_argument("--kernel-time-limit", type=float, default=240.0, help="the kernel's budget in seconds")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # no quotes around a KeyError's text
        print(f"steelkit {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
