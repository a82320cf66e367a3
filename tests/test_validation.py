"""Input validation audit of the public API: every bad value → ValueError naming the parameter
and the value (and the valid range), raised at construction, before any training."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from horovod_gravac import agents as A
from horovod_gravac import compression as C
from horovod_gravac.compression import memory as M

BAD_TYPE = "x"
CASES = [  # (factory, parameter, out-of-range value, valid-range text)
    (C.COMPRESSORS["topk"], "cf", 0.5, ">= 1"),
    (C.COMPRESSORS["randomk"], "cf", float("inf"), ">= 1"),
    (C.COMPRESSORS["randomk"], "seed", 1.5, "int"),
    (C.COMPRESSORS["dgc"], "sample_ratio", 0.0, "(0, 1]"),
    (C.COMPRESSORS["dgc"], "max_adjust", 0, ">= 1"),
    (C.COMPRESSORS["redsync"], "min_interval", 1.0, "(0, 1)"),
    (C.COMPRESSORS["sidco"], "stages", 0, ">= 1"),
    (C.COMPRESSORS["threshold"], "threshold", -1.0, "> 0"),
    (C.COMPRESSORS["qsgd"], "levels", 0, "[1, 32767]"),
    (C.COMPRESSORS["qsgd"], "bucket_size", 0, ">= 1"),
    (C.COMPRESSORS["terngrad"], "clip", 0.0, "> 0"),
    (C.COMPRESSORS["signum"], "momentum", 1.0, "[0, 1)"),
    (C.COMPRESSORS["powersgd"], "rank", 0, ">= 1"),
    (M.DGCMemory, "momentum", -0.1, "[0, 1)"),
    (M.DGCMemory, "clip_norm", 0.0, "> 0"),
    (M.EFSignSGDMemory, "lr", 0.0, "> 0"),
    (A.GraVAC, "theta_min", 0.5, ">= 1"),
    (A.GraVAC, "epsilon", 1.5, "(0, 1]"),
    (A.GraVAC, "omega", -0.1, "[0, 1]"),
    (A.GraVAC, "omega_throughput", 1.5, "[0, 1]"),
    (A.GraVAC, "gain_interval", 0, ">= 1"),
    (A.GraVAC, "settle_steps", -1, "[0, 499]"),
    (A.GraVAC, "window", 0, ">= 1"),
    (A.GraVAC, "theta_s", 1.0, "> 1"),
    (A.GraVAC, "ewma", 0.0, "(0, 1]"),
    (A.GraVAC, "batch_size", 0, ">= 1"),
    (A.Accordion, "low_cf", 0.5, ">= 1"),
    (A.Accordion, "interval", 0, ">= 1"),
    (A.Accordion, "steps_per_epoch", 0, ">= 1"),
    (A.Accordion, "eta", 0.0, "> 0"),
    (A.Static, "cf", 0.9, ">= 1"),
]


@pytest.mark.parametrize("factory,param,bad,valid", CASES,
                         ids=[f"{f.__name__}-{p}" for f, p, _, _ in CASES])
@pytest.mark.parametrize("kind", ["out_of_range", "wrong_type"])
def test_each_bad_value_is_named_with_its_valid_range(factory, param, bad, valid, kind):
    value = bad if kind == "out_of_range" else BAD_TYPE
    with pytest.raises(ValueError) as err:
        factory(**{param: value})
    message = str(err.value)
    assert param in message and repr(value) in message and valid in message, message


@pytest.mark.parametrize("kwargs,fragment", [
    ({"theta_min": 100, "theta_max": 10}, "theta_max (10) must be >= theta_min (100)"),
    ({"policy": "linear"}, "unknown scaling policy 'linear'"),
])
def test_gravac_relations(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        A.GraVAC(**kwargs)


def test_registry_errors_list_what_is_valid():
    with pytest.raises(ValueError, match="unknown compressor 'topq'; valid names: .*topk"):
        C.create("topq:10")
    with pytest.raises(ValueError, match="compressor 'topk' has no parameter 'levels'"):
        C.create("topk", levels=3)
    with pytest.raises(ValueError, match="unknown memory 'ef'"):
        C.create_memory("ef", C.create("topk"))
    with pytest.raises(ValueError, match="unknown agent 'x'"):
        A.create("x")
    with pytest.raises(ValueError, match="compression factor.* must be"):
        C.create("topk:abc")


def test_cf_setter_rejects_bad_values_naming_them():
    c = C.create("topk:10")
    for bad in (0, -3, float("nan"), "many"):
        with pytest.raises(ValueError, match="compression factor"):
            c.cf = bad
    assert c.cf == 10 and torch.is_tensor(c.compress(torch.ones(100))[0][0])


def test_missing_horovod_says_how_to_build_it():
    code = ("import sys; sys.modules['horovod'] = None; sys.modules['horovod.torch'] = None\n"
            "import horovod_gravac as hg\n"
            "from horovod_gravac import compression  # the pure-torch layer works without it\n"
            "try:\n    hg.DistributedOptimizer\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "built from source" in out.stdout and "make install" in out.stdout




FLAGS = [(C.COMPRESSORS["randomk"], "unbiased"), (C.COMPRESSORS["powersgd"], "warm_start"),
         (A.Accordion, "per_layer")]


@pytest.mark.parametrize("factory,param", FLAGS, ids=[f"{f.__name__}-{p}" for f, p in FLAGS])
def test_flags_are_booleans_never_coerced(factory, param):
    with pytest.raises(ValueError, match=f"{param} must be True or False, got 'false'"):
        factory(**{param: "false"})


@pytest.mark.parametrize("returned", [10.0, 5, "20", float("nan")])
def test_a_callable_scaling_policy_must_return_a_larger_cf(returned):
    agent = A.GraVAC(policy=lambda theta_s: returned)
    with pytest.raises(ValueError, match=r"policy\(10\) must be a number > 10, got"):
        agent.policy(10.0)
    assert A.GraVAC(policy=lambda theta_s: theta_s * 3).policy(10.0) == 30.0
