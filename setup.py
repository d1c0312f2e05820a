"""steelkit: declarative packaging. Nothing is imported at install time."""

from setuptools import find_packages, setup

TRAIN = [
    "segmentation-models-pytorch>=0.5",
    "timm>=1.0",
    "efficientnet-pytorch>=0.7",
    "albumentations>=1.4",
    "scikit-learn>=1.3",
    "tqdm>=4.60",
    "PyYAML>=6.0",
    "matplotlib>=3.5",
    # build_dataset.py builds the steelkit wheel offline, without build isolation
    "setuptools>=64",
    "wheel",
]

setup(
    name="steelkit",
    version="0.1.0",
    description="Train, export and run Severstal steel defect segmentation inside one offline Kaggle kernel",
    python_requires=">=3.10",
    packages=find_packages(include=["steelkit", "steelkit.*"]),
    package_data={"steelkit": ["presets/*.yaml"]},
    # what the kernel needs at run time on Kaggle (all preinstalled there)
    install_requires=["numpy>=1.21", "pandas>=1.3", "opencv-python-headless>=4.5", "torch>=1.10"],
    extras_require={"train": TRAIN, "test": TRAIN + ["pytest>=7", "hypothesis>=6"]},
    entry_points={"console_scripts": ["steelkit=steelkit.cli:main"]},
)
