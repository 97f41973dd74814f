"""linconv: linear attention for Hugging Face causal language models.

Importing linconv registers its model types with transformers' Auto classes, so that
``AutoModelForCausalLM.from_pretrained(folder)`` loads converted checkpoints.
"""

import os as _os
import signal as _signal
import sys as _sys

if _os.path.basename(_sys.argv[0]) == "linconv":  # the CLI: Ctrl-C during the imports below exits 130, no traceback
    _signal.signal(_signal.SIGINT, lambda *_: (_sys.stderr.write("interrupted\n"), _os._exit(130)))

from linconv.checkpoint import load
from linconv.config import LinearizeConfig
from linconv.convert import convert
from linconv.models import hf as _hf  # noqa: F401  (registers the linconv-* model types)
from linconv.version import __version__

__all__ = ["LinearizeConfig", "__version__", "convert", "load"]
