"""Models: every family in the factorization form of :mod:`recsys_torch.models.base`."""

from recsys_torch.models.base import FactorizationModel, Side
from recsys_torch.models.content import ContentModel
from recsys_torch.models.hybrid import HybridModel
from recsys_torch.models.mf import BaselineModel, MFModel
from recsys_torch.models.popularity import PopularityModel

__all__ = ["FactorizationModel", "Side", "BaselineModel", "MFModel", "PopularityModel", "ContentModel",
           "HybridModel"]
