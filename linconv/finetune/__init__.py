"""Fine-tuning a linearized model back toward the original: attention transfer, LoRA, draft heads.

The stages (``stages.py``, one class each) run in order, each optional: attention transfer (the new
attention imitates the original softmax layer by layer), LoRA (peft, on the chosen projections plus
the new attention parameters), Medusa and EAGLE draft heads (on the frozen fine-tuned model). The loop
(``loop.py``) trains a stage data-parallel without a DDP wrapper (``distributed.py``), with the same
results in one process or several; Ctrl-C leaves a resume state (``resume.py``) from which the run
continues exactly as the uninterrupted one would have. ``run.py`` ties them together and writes the
checkpoint with its card (``card.py``).
"""

from linconv.finetune.config import PRECISIONS, FinetuneConfig, FinetuneResult, StageResult
from linconv.finetune.lora_targets import lora_projections, lora_target_modules
from linconv.finetune.resume import resume_folder
from linconv.finetune.run import finetune
from linconv.finetune.stages import STAGES, Stage

__all__ = [
    "PRECISIONS",
    "STAGES",
    "FinetuneConfig",
    "FinetuneResult",
    "Stage",
    "StageResult",
    "finetune",
    "lora_projections",
    "lora_target_modules",
    "resume_folder",
]
