"""logra_dist: LoGra data valuation for models trained with DeepSpeed ZeRO-3, FSDP and DDP.

logger = logra_dist.attach(model_or_engine, LoGraConfig(k_in=16, k_out=16), "index/")
for ids, batch in loader:
    with logger.capture(ids, mask=batch["attention_mask"]):
        loss = summed_loss(logger.model(**batch), batch["labels"])
        logger.backward(loss)
logger.finalize()                      # collective: every rank calls it

scorer = logra_dist.Scorer(model_or_engine, "index/")
... capture queries the same way ...
top = scorer.topk(10)
"""

from logra_dist.config import ConfigError, LoGraConfig
from logra_dist.index.format import IndexFormatError
from logra_dist.index.reader import GradientStore
from logra_dist.logger import Logger, attach
from logra_dist.scoring.kernels import TopKResult
from logra_dist.scoring.scorer import Scorer
from logra_dist.version import __version__

__all__ = [
    "ConfigError",
    "GradientStore",
    "IndexFormatError",
    "LoGraConfig",
    "Logger",
    "Scorer",
    "TopKResult",
    "__version__",
    "attach",
]
