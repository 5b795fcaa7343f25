"""titans_runtime: Titans models on a LLaMA backbone, run as a Ray pipeline."""
from titans_runtime.config import TitansConfig, load_config
from titans_runtime.model.state import StreamState
from titans_runtime.model.titans import TitanModel, TitanOutput

__all__ = ["TitansConfig", "load_config", "StreamState", "TitanModel", "TitanOutput", "create_titan_model"]


def __getattr__(name: str):
    # The converter (checkpoint readers) loads on first use, so `import titans_runtime` stays light.
    if name == "create_titan_model":
        from titans_runtime.model.convert import create_titan_model

        return create_titan_model
    raise AttributeError(f"module 'titans_runtime' has no attribute {name!r}")
