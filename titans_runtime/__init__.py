"""titans_runtime: Titans models on a LLaMA backbone, run as a Ray pipeline."""
from titans_runtime.config import TitansConfig, load_config
from titans_runtime.model.state import StreamState
from titans_runtime.model.titans import TitanModel, TitanOutput

__all__ = ["TitansConfig", "load_config", "StreamState", "TitanModel", "TitanOutput"]
