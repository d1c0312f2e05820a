"""steelkit: train, export and run Severstal steel defect segmentation inside one offline Kaggle kernel."""

__version__ = "0.1.0"
