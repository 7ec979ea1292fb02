"""Federated learning: packed Paillier secure aggregation (``SecureAggregation.aggregate``)
and Flower apps (``seekdeep.fl.app``) driven by ``seekdeep fl``.

Importing this package does not import Flower; only ``seekdeep.fl.app`` does."""

from seekdeep.fl.aggregation import SecureAggregation, ServerAggregator, UpdateLayout
from seekdeep.fl.config import FLConfig
from seekdeep.fl.keys import generate_keypair, load_private_key, load_public_key
from seekdeep.fl.paillier import PackingSpec, UpdateRejected

__all__ = ["FLConfig", "PackingSpec", "SecureAggregation", "ServerAggregator", "UpdateLayout", "UpdateRejected",
           "generate_keypair", "load_private_key", "load_public_key"]
