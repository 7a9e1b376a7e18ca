"""hubquant: Hub checkpoints into canonical PyTorch models, quantized variants, measured."""

from hubquant.errors import HubquantError
from hubquant.models import Decoder, KVCache, ModelConfig, Tokenizer, generate, load

__version__ = "0.1.0"
__all__ = [
    "Decoder",
    "HubquantError",
    "KVCache",
    "ModelConfig",
    "Tokenizer",
    "__version__",
    "generate",
    "load",
]
