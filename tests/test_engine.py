"""The step engine's own rules, in one process: buckets, settings, what stays in compression/."""
import ast
from pathlib import Path

import pytest
import torch

from horovod_gravac import compression as C
from horovod_gravac.engine import BucketLayout, EngineConfig, StepEngine

PACKAGE = Path(__file__).resolve().parent.parent / "horovod_gravac"


def test_buckets_follow_backward_order_up_to_the_cap_and_are_a_function_of_the_model():
    tensors = [("a", 400), ("b", 100), ("c", 300), ("d", 700), ("e", 50)]
    layout = BucketLayout.by_size(tensors, cap_bytes=500)
    assert layout.buckets == (("e",), ("d",), ("c", "b"), ("a",))  # d alone: larger than cap
    assert BucketLayout.by_size(tensors, 500) == layout  # the same again, on every rank
    assert BucketLayout.by_size(tensors, 10**9).buckets == (("e", "d", "c", "b", "a"),)
    grouped = BucketLayout.by_size(tensors, 500, groups=[["a", "c"]])
    assert grouped.buckets == (("e",), ("d",), ("a", "c"), ("b",))  # by each one's last tensor


@pytest.mark.parametrize("value", [0, -1.0, "25", float("nan"), True])
def test_bucket_size_must_be_positive(value):
    with pytest.raises(ValueError, match=rf"bucket_cap_mb must be a number > 0, got {value!r}"):
        EngineConfig.create("topk", bucket_cap_mb=value)


def test_settings_are_checked_when_the_config_is_made():
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        EngineConfig.create("topk", on_nonfinite="ignore")
    with pytest.raises(ValueError, match="does not have; use one of"):
        EngineConfig.create("qsgd", agent="gravac")
    with pytest.raises(ValueError, match="unknown compressor 'topq'"):
        EngineConfig.create("topq")
    with pytest.raises(ValueError, match="gradient_predivide_factor must be a number > 0"):
        EngineConfig.create("none", predivide=0.0)


def code_outside_compression():
    """(module, identifiers and string constants of its code — docstrings left out)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        if "compression" in path.parts or "app" in path.parts:
            continue  # the application may name compressors (its baselines, its flags)
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                           ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docstrings:
                names.add(node.value.lower())
        yield path.relative_to(PACKAGE), names


def test_no_compressor_is_special_cased_outside_compression():
    """The engine, transports and front-ends know compressors only through the API (rounds,
    exchange kinds); the dense path they use for uncompressed tensors is ``NoCompression``."""
    specific = {cls.__name__ for cls in C.COMPRESSORS.values()} - {"NoCompression"}
    specific |= {"LOWRANK", "compress_second", *C.COMPRESSORS} - {"none"}
    for module, names in code_outside_compression():
        assert not names & specific, (str(module), sorted(names & specific))


def test_a_tensors_rounds_are_the_compressors_own():
    c = C.create("powersgd:cf=10")
    payload, ctx = c.compress(torch.randn(64, 32), "w")
    assert ctx.exchange is C.Exchange.ALLREDUCE and ctx.rounds == 2
    q = c.next_round(payload, ctx)
    assert q[0].shape == (32, ctx.extra["p"].shape[1])
    _, single = C.create("topk:10").compress(torch.randn(100))
    assert single.rounds == 1


def test_the_engine_gives_a_seeded_compressor_its_rank():
    class SecondOfTwo:  # only what the constructor reads
        rank, size, control_device = 1, 2, torch.device("cpu")

    config = EngineConfig.create("qsgd")
    StepEngine(config, SecondOfTwo(), [("w", (64, 64), 4)])
    assert config.compressor.process_rank == 1


def test_the_rank_given_to_a_seeded_compressor_is_not_powersgds_rank():
    class SecondOfTwo:
        rank, size, control_device = 1, 2, torch.device("cpu")

    config = EngineConfig.create("powersgd:4")
    StepEngine(config, SecondOfTwo(), [("w", (64, 64), 4)])
    assert config.compressor.rank == 4 and config.compressor.process_rank == 1


def test_the_engine_binds_its_compressor_to_the_rank_and_size_at_every_step():
    """A two-stage exchange's chunks follow the world: bound when the engine is made and
    again when a step starts (Horovod elastic changes the size under the same engine)."""
    class Resizable:
        rank, size, control_device = 1, 2, torch.device("cpu")

    transport, config = Resizable(), EngineConfig.create("8bit")
    engine = StepEngine(config, transport, [("w", (64, 64), 4)])
    assert (config.compressor.process_rank, config.compressor.world_size) == (1, 2)
    assert not config.compressor.two_stage  # "auto" below 5 ranks
    transport.rank, transport.size = 3, 6
    engine._start_step(torch.device("cpu"))
    assert (config.compressor.process_rank, config.compressor.world_size) == (3, 6)
    assert config.compressor.two_stage


@pytest.mark.parametrize("compression,shared", [("topk:10", False), ("powersgd", True)])
def test_rank_0_decides_step_agent_decision_and_a_shared_compressor_state(compression, shared):
    """One schema for checkpoints, elastic and Lightning: residuals stay each rank's own."""
    from horovod_gravac.engine import ADAM_STATE, with_rank_0_state
    compressor = C.create(compression)
    own = {"step": 7, "skipped_steps": 0, "decision": None, "agent": {"mine": 1},
           "memory": {"residual": "own"}, "compressor": {"q": "own"}, "communication": "own",
           ADAM_STATE: {"frozen": False}}
    root = {**{k: f"{k} of rank 0" for k in own}}
    merged = with_rank_0_state(own, root, compressor)
    for key in ("step", "skipped_steps", "decision", "agent", ADAM_STATE):
        assert merged[key] == f"{key} of rank 0"
    assert merged["memory"] == {"residual": "own"} and merged["communication"] == "own"
    assert merged["compressor"] == ("compressor of rank 0" if shared else {"q": "own"})


def test_an_engine_state_loads_into_a_config_not_bound_to_an_engine():
    from horovod_gravac.engine import engine_state, load_engine_state
    config = EngineConfig.create("topk:10", agent="gravac")
    progress = {"step": 5, "skipped_steps": 1, "communication": {}, "decision": {"cf": 10}}
    state = engine_state(config, progress)
    assert set(state) == {*progress, "memory", "compressor", "agent"}
    other = EngineConfig.create("topk:10", agent="gravac")
    assert load_engine_state(other, state) == progress
    assert other.agent.state_dict().keys() == config.agent.state_dict().keys()
    no_agent = {**state, "agent": None}  # a decision only means something to its agent
    assert load_engine_state(other, no_agent)["decision"] is None
