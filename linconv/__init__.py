"""linconv: linear attention for Hugging Face causal language models.

Importing linconv registers its model types with transformers' Auto classes, so that
``AutoModelForCausalLM.from_pretrained(folder)`` loads converted checkpoints.
"""

__version__ = "0.1.0"

from linconv.checkpoint import load
from linconv.config import LinearizeConfig
from linconv.convert import convert
from linconv.models import hf as _hf  # noqa: F401  (registers the linconv-* model types)

__all__ = ["LinearizeConfig", "convert", "load"]
