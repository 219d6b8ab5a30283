"""Data: loaders return a RawDataset; `encode` turns it into Interactions and Features."""

from recsys_torch.data.dataset import Dataset, encode
from recsys_torch.data.features import Features
from recsys_torch.data.interactions import Interactions
from recsys_torch.data.raw import RawDataset

__all__ = ["Dataset", "encode", "Features", "Interactions", "RawDataset"]
