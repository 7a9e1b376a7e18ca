"""hubquant: Hub checkpoints into canonical PyTorch models, quantized variants, measured."""

from hubquant.errors import HubquantError

__version__ = "0.1.0"
__all__ = ["HubquantError", "__version__"]
