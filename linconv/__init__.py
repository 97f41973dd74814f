"""linconv: linear attention for Hugging Face causal language models.

Importing linconv registers its model types with transformers' Auto classes, so that
``AutoModelForCausalLM.from_pretrained(folder)`` loads converted checkpoints.
"""

from linconv.checkpoint import load
from linconv.config import LinearizeConfig
from linconv.convert import convert
from linconv.models import hf as _hf  # noqa: F401  (registers the linconv-* model types)
from linconv.version import __version__

__all__ = ["LinearizeConfig", "__version__", "convert", "load"]
