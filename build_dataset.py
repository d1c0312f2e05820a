"""Pack the steelkit wheel, the TorchScript weights and the manifest into a folder for ``kaggle datasets create``.

    python build_dataset.py --runs runs/cpu-tiny --out dist/steelkit-weights --dataset-id you/steelkit-weights

Thin: the logic is :func:`steelkit.packaging.build_dataset`.
"""

import argparse
import sys
from pathlib import Path

from steelkit.manifest import MANIFEST_NAME
from steelkit.packaging import build_dataset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, help=f"a run folder; its export/{MANIFEST_NAME} is packed")
    parser.add_argument("--manifest", type=Path, help=f"pack this {MANIFEST_NAME} instead (files beside it)")
    parser.add_argument("--out", type=Path, required=True, help="the dataset folder to create")
    parser.add_argument("--dataset-id", required=True, help="owner/slug, as for the Kaggle API")
    parser.add_argument("--title", default=None, help="dataset title (default: the slug)")
    parser.add_argument("--license", default="CC0-1.0")
    args = parser.parse_args(argv)
    if (args.runs is None) == (args.manifest is None):
        parser.error("give exactly one of --runs or --manifest")
    manifest = args.manifest or args.runs / "export" / MANIFEST_NAME
    try:
        build_dataset(manifest, args.out, args.dataset_id, args.title, args.license)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"build_dataset.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
