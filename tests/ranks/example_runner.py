"""Run one of examples/*.py on this rank (as ``python examples/X.py`` would) and report what
it ended with: parameters, optimizer state, counters."""
import runpy
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

from tests.multirank import report

torch.set_num_threads(1)
example = Path(__file__).resolve().parents[2] / "examples" / sys.argv[1]
result = runpy.run_path(str(example), run_name="__main__")
model, opt = result["model"], result["opt"]
report(hvd.rank(), params={k: v.detach().clone() for k, v in model.state_dict().items()},
       skipped=opt.skipped_steps, exchanges=opt.communication.steps,
       scale=result["scaler"].get_scale() if "scaler" in result else None,
       residuals_finite=all(bool(torch.isfinite(r).all())
                            for r in getattr(opt.memory, "residuals", {}).values()),
       optimizer_state=opt.state_dict()["state"], uncompressed=sorted(opt.uncompressed),
       residual_names=sorted(getattr(opt.memory, "residuals", {})),
       bytes_by_tensor=dict(opt.communication.last_step))
