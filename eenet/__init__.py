"""eenet: early-exit neural networks on PyTorch, Lightning and Hydra.

Layers, bottom to top (nothing imports upward):

- ``eenet.models``: staged backbones, exit blocks, exit placement and the
  early-exit network (plain PyTorch);
- ``eenet.cost`` and ``eenet.losses``: per-exit MAC tables (fvcore) and the
  EENets / BranchyNet / SDN training losses (plain PyTorch);
- ``eenet.data`` and ``eenet.training``: Lightning data and training modules;
- ``eenet.train``: the Hydra entry point.
"""

from eenet.errors import EENetError

__version__ = "0.1.0"
__all__ = ["EENetError", "__version__"]
