"""Pack the steelkit wheel, the TorchScript weights and the manifest into a folder for ``kaggle datasets create``.

    python build_dataset.py --runs runs/cpu-tiny --out dist/steelkit-weights --dataset-id you/steelkit-weights

Thin: the same as ``steelkit build-dataset``; the logic is :func:`steelkit.packaging.build_dataset`.
"""

import sys

from steelkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-dataset", *sys.argv[1:]]))
