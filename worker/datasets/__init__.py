"""Built-in datasets (numpy only, no torch): ``load_dataset("mnist5k" | "digits")``."""

from worker.datasets.builtin import DATASETS, BuiltinDataset, load_dataset

__all__ = ["DATASETS", "BuiltinDataset", "load_dataset"]
