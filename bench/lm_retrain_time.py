"""Time one retraining of the LM task on one thread (how the LDS plan was sized).

nice -n 10 python bench/lm_retrain_time.py 300 150   # steps to try; trains on half the documents
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from logra_dist.eval.lm_task import LMTask
from logra_dist.eval.tasks import TaskSpec

if __name__ == "__main__":
    torch.set_num_threads(1)  # as a retraining worker
    for steps in [int(s) for s in sys.argv[1:]] or [150]:
        task = LMTask(TaskSpec("lm", {"steps": steps}))
        t0 = time.perf_counter()
        model = task.train(np.arange(task.n_train // 2), seed=0)
        t1 = time.perf_counter()
        loss = task.evaluate(model)["loss"]
        print(
            f"steps={steps}: train {t1 - t0:.1f} s, evaluate {time.perf_counter() - t1:.2f} s, "
            f"query loss {loss.mean():.3f}"
        )
