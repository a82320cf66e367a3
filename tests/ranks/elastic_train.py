"""Horovod elastic (``horovodrun --min-np/--max-np``) with DistributedOptimizer's state.

argv: mode steps
  fixed  a fixed-size elastic run; right after the commit at SYNC_STEP every rank calls
         state.sync() (what a reset does): residuals must stay each rank's own, the agent must become rank 0's
  fail   every rank raises HorovodInternalError at FAIL_STEPS[0] and, after the rollback to
         the commit before it, again at FAIL_STEPS[1] (before the next commit): state rolls
         back to that commit twice, the world is reset, training resumes; must end like an
         undisturbed run (a rank may also see its peer's failure first: one more rollback)
  remove at REMOVE_STEP rank 0 rewrites the host list the discovery script prints
         ($HOROVOD_GRAVAC_HOSTS_FILE) to one slot: one worker is removed, training goes on
"""
import os
import sys
import time

import horovod.torch as hvd
import torch
from horovod.common.exceptions import HorovodInternalError
from sklearn.datasets import load_digits

import horovod_gravac as hg
from tests.multirank import report

MODE, STEPS = sys.argv[1], int(sys.argv[2])
SYNC_STEP, FAIL_STEPS, REMOVE_STEP, COMMIT_EVERY = 10, (13, 12), 8, 5
hvd.init()
torch.set_num_threads(1)
x_all, y_all = load_digits(return_X_y=True)
X_ALL, Y_ALL = torch.tensor(x_all, dtype=torch.float32) / 16.0, torch.tensor(y_all)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
opt = hg.DistributedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
    named_parameters=model.named_parameters(), compression="topk",
    # no decision depends on measured time (see resume_checks.py): rollback is bit-exact
    agent=hg.agents.GraVAC(theta_min=2, theta_max=1e6, epsilon=0.3, window=5, omega=0.0,
                           omega_throughput=0.0, policy="geometric", search="throughput"))
state = hg.elastic.TorchState(model=model, optimizer=opt, step=0)
checks = {"failures": 0, "resets": 0, "sizes": []}
state.register_reset_callbacks([lambda: checks.update(resets=checks["resets"] + 1)])


def residuals():
    return {k: v.clone() for k, v in opt.memory.residuals.items()}


@hvd.elastic.run
def train(state):
    # remove: go on until the smaller world is seen (discovery is polled about once a second)
    while state.step < STEPS or (MODE == "remove" and hvd.size() > 1 and state.step < 3000):
        if MODE == "remove" and state.step > REMOVE_STEP:
            time.sleep(0.01)
        rank, size = hvd.rank(), hvd.size()
        x, y = X_ALL[rank::size], Y_ALL[rank::size]
        idx = torch.randint(0, len(x), (32,), generator=torch.Generator().manual_seed(state.step * 97 + rank))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        state.step += 1
        checks["sizes"].append(size)
        if MODE == "remove" and state.step == REMOVE_STEP and rank == 0:
            # atomically: the driver's discovery poll must never read a truncated, empty list
            hosts = os.environ["HOROVOD_GRAVAC_HOSTS_FILE"]
            with open(hosts + ".new", "w") as f:
                f.write("localhost:1\n")
            os.replace(hosts + ".new", hosts)
        if state.step % COMMIT_EVERY == 0:
            state.commit()
        if MODE == "fixed" and state.step == SYNC_STEP and "residuals_kept" not in checks:
            before = residuals()
            opt.agent.history.append({"marker": rank})  # a rank-local change sync must undo
            state.sync()
            after = residuals()
            checks["residuals_kept"] = before.keys() == after.keys() and all(
                torch.equal(before[k], after[k]) for k in before)
            checks["agent_marker"] = opt.agent.history[-1].get("marker")
            checks["residual_norm"] = float(sum(v.norm() for v in after.values()))
        if MODE == "fail" and checks["failures"] < len(FAIL_STEPS) and \
                state.step == FAIL_STEPS[checks["failures"]]:
            checks["failures"] += 1
            raise HorovodInternalError("injected failure on every rank")


train(state)
report(hvd.rank(), params={k: v.detach().clone() for k, v in model.state_dict().items()},
       decisions=[(d.cf, d.theta_min, d.send) for d in opt.decisions], size=hvd.size(),
       step_count=opt.step_count, **checks)
