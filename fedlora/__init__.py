"""fedlora: federated personalization with private LoRA adapters on Flower."""

from fedlora.api import Results, Sweep, load_results, resume, run, session, sweep
from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError, DataError, FedloraError, ModelError

__all__ = [
    "ConfigError",
    "DataError",
    "FedloraError",
    "ModelError",
    "Results",
    "RunConfig",
    "Sweep",
    "__version__",
    "load_results",
    "resume",
    "run",
    "session",
    "sweep",
]

__version__ = "0.1.0"
