"""linconv: linear attention for Hugging Face causal language models.

Importing linconv registers its model types with transformers' Auto classes, so that
``AutoModelForCausalLM.from_pretrained(folder)`` loads converted checkpoints.
"""

__version__ = "0.1.0"

from linconv.checkpoint import load  # noqa: E402
from linconv.config import LinearizeConfig  # noqa: E402
from linconv.convert import convert  # noqa: E402
from linconv.models import hf as _hf  # noqa: E402, F401  (registers the linconv-* model types)

__all__ = ["LinearizeConfig", "convert", "load"]
