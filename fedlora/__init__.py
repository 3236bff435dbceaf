"""fedlora: federated personalization with private LoRA adapters on Flower."""

from fedlora.config import RunConfig
from fedlora.errors import ConfigError, DataError, FedloraError, ModelError

__all__ = ["ConfigError", "DataError", "FedloraError", "ModelError", "RunConfig", "__version__"]

__version__ = "0.1.0"
