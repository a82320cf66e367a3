"""The settings every front-end and gravac-train build from: one dataclass, checked when made."""
import dataclasses
import inspect
import pickle

import pytest
import torch

from horovod_gravac import agents as A
from horovod_gravac import compression as C
from horovod_gravac.adam import AdamExchange
from horovod_gravac.settings import HOOK_COMPRESSION, Settings

FIELDS = {f.name for f in dataclasses.fields(Settings)}


def test_of_replaces_the_given_values_and_keeps_the_rest():
    base = Settings(compression="topk:10", agent="gravac", bucket_cap_mb=5)
    merged = Settings.of(base, agent="accordion", min_compress_numel=0)
    assert (merged.compression, merged.agent, merged.bucket_cap_mb, merged.min_compress_numel) \
        == ("topk:10", "accordion", 5, 0)
    assert Settings.of(base) is base
    assert Settings.of(compression="fp16") == Settings(compression="fp16")
    # None means the default where it has no meaning of its own
    assert Settings.of(base, compression=None, bucket_cap_mb=None) is base
    assert Settings(on_nonfinite=None, min_compress_numel=None) == Settings()
    assert Settings().or_compression("topk:100").compression == "topk:100"
    assert base.or_compression("topk:100") is base
    assert pickle.loads(pickle.dumps(merged)) == merged


@pytest.mark.parametrize("given,message", [
    ({"compresion": "topk"}, r"unknown setting\(s\) compresion; the settings are adam_exchange, "
                             "agent, bucket_cap_mb"),
    ({"compression": "nope"}, "unknown compressor 'nope'"),
    ({"on_nonfinite": "zero"}, r"on_nonfinite must be one of \('skip', 'raise'\), got 'zero'"),
    ({"bucket_cap_mb": 0}, "bucket_cap_mb must be a number > 0, got 0"),
    ({"min_compress_numel": -1}, "min_compress_numel must be an integer >= 0, got -1"),
    ({"compress_patterns": ["*.bias"]}, "compress_patterns must map name patterns"),
    ({"adam_exchange": "sometimes"}, "adam_exchange must be 'auto', 'off' or an AdamExchange, "
                                     "got 'sometimes'"),
    ({"compression": "qsgd", "agent": "gravac"}, "does not have; use one of"),
    ({"compression": "auto"}, "need an agent that chooses among them"),
])
def test_bad_settings_fail_when_made_naming_the_setting(given, message):
    with pytest.raises(ValueError, match=message):
        Settings.of(**given)


def test_settings_of_something_else_are_refused():
    with pytest.raises(ValueError, match="settings must be a horovod_gravac.Settings, got dict"):
        Settings.of({"compression": "topk"})


def test_build_runs_the_adam_exchange_only_where_it_applies():
    model = torch.nn.Linear(4, 2)
    settings = Settings(compression="topk:10", agent="gravac")
    config, exchange = settings.build(torch.optim.AdamW(model.parameters()))
    assert isinstance(exchange, AdamExchange)
    assert isinstance(config.agent, A.AdamPhases) and isinstance(config.memory, C.ResidualMemory)
    config, exchange = settings.build(torch.optim.SGD(model.parameters(), lr=0.1))
    assert exchange is None and isinstance(config.agent, A.GraVAC)
    off = dataclasses.replace(settings, adam_exchange="off")
    assert off.build(torch.optim.AdamW(model.parameters()))[1] is None
    # fp16 keeps Adam's variance as dense does: no exchange
    assert Settings(compression="fp16").build(torch.optim.AdamW(model.parameters()))[1] is None


def test_auto_under_the_adam_exchange_chooses_among_codecs_without_sparsifiers():
    model = torch.nn.Linear(4, 2)
    settings = Settings(compression="auto", agent="choice")
    adamw = torch.optim.AdamW(model.parameters())
    config, exchange = settings.build(adamw)
    assert exchange is not None and config.compressor.name == C.ADAM_CANDIDATES
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert settings.build(sgd)[0].compressor.name == C.DEFAULT_CANDIDATES
    off = dataclasses.replace(settings, adam_exchange="off")
    assert off.build(adamw)[0].compressor.name == C.DEFAULT_CANDIDATES
    # a set written out is the user's
    mine = Settings(compression="dense|powersgd:1|topk:100", agent="choice").build(adamw)[0]
    assert mine.compressor.name == "dense|powersgd:1|topk:100"


def test_no_front_end_lists_a_setting_of_its_own():
    """Every setting is written once, in Settings: the front-ends take ``settings=`` and
    ``**given`` (only ``compression`` keeps its place in Horovod's argument order)."""
    from horovod_gravac import ddp
    from horovod_gravac.optimizer import DistributedOptimizer
    front_ends = [DistributedOptimizer.__init__, ddp.DDPCompressionState.__init__,
                  ddp.register_comm_hook]
    try:
        from horovod_gravac.lightning import CompressionCallback
        front_ends.append(CompressionCallback.__init__)
    except ImportError:  # lightning is an extra
        pass
    for front_end in front_ends:
        parameters = inspect.signature(front_end).parameters
        assert "settings" in parameters and any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()), front_end
        assert set(parameters) & FIELDS <= {"compression"}, front_end


@pytest.fixture
def world_of_one(tmp_path):
    import torch.distributed as dist
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", rank=0, world_size=1,
                            store=dist.FileStore(str(tmp_path / "store"), 1))
    yield
    dist.destroy_process_group()


def test_the_ddp_hook_defaults_to_topk_and_takes_one_settings_object(world_of_one):
    from horovod_gravac import ddp
    model = torch.nn.Linear(4, 2)
    assert ddp.DDPCompressionState(model).settings.compression == HOOK_COMPRESSION
    assert ddp.DDPCompressionState(model, settings=Settings(bucket_cap_mb=2)) \
        .settings.compression == HOOK_COMPRESSION
    state = ddp.DDPCompressionState(model, settings=Settings(compression="fp16"),
                                    bucket_cap_mb=2)
    assert state.settings == Settings(compression="fp16", bucket_cap_mb=2)
    assert state.config.compressor.name == "fp16" and state.config.bucket_cap_mb == 2
    with pytest.raises(ValueError, match="unknown setting"):
        ddp.DDPCompressionState(model, bucket_size=2)
    with pytest.raises(ValueError, match="process_group must be a torch.distributed "
                                         "ProcessGroup or None, got 'powersgd'"):
        ddp.DDPCompressionState(model, "powersgd")


def test_a_hook_state_saved_before_the_settings_were_kept_loads(world_of_one):
    """A state pickled by the release before (its config, no settings) goes on."""
    from horovod_gravac import ddp
    model = torch.nn.Linear(64, 32)
    state = ddp.DDPCompressionState(model, compression="topk:10", memory="residual",
                                    agent="gravac", bucket_cap_mb=2)
    old = state.__getstate__()
    del old["settings"]
    old["_memory_given"] = True
    loaded = ddp.DDPCompressionState.__new__(ddp.DDPCompressionState)
    loaded.__setstate__(pickle.loads(pickle.dumps(old)))
    assert loaded.settings.memory is loaded.config.memory and loaded.settings.bucket_cap_mb == 2
    loaded.attach(model)
    assert loaded.state_dict()["step"] == 0 and pickle.dumps(loaded)


def test_the_adam_wrapper_binds_a_copy_and_the_settings_stay_unbound(world_of_one):
    from horovod_gravac import ddp
    model = torch.nn.Linear(64, 32)
    rule = AdamExchange(warmup=3)
    state = ddp.DDPCompressionState(model, compression="topk:10", adam_exchange=rule)
    opt = ddp.AdamExchangeOptimizer(torch.optim.AdamW(model.parameters()), state)
    assert opt.exchange is not rule and opt.exchange.rule == rule.rule
    assert b"AdamW" not in pickle.dumps(state)  # the optimizer is not part of the state
    shared = Settings(compression="topk:10", adam_exchange=rule)
    first = shared.build(torch.optim.AdamW(model.parameters()))[1]
    second = shared.build(torch.optim.AdamW(model.parameters()))[1]
    assert first is not second and first is not rule


def test_the_ddp_hook_under_the_adam_exchange_chooses_among_codecs_without_sparsifiers(
        world_of_one):
    from horovod_gravac import ddp
    model = torch.nn.Linear(64, 32)
    state = ddp.DDPCompressionState(model, compression="auto", agent="choice")
    assert state.compressor.name == C.DEFAULT_CANDIDATES
    ddp.AdamExchangeOptimizer(torch.optim.AdamW(model.parameters()), state)
    assert state.compressor.name == C.ADAM_CANDIDATES
    assert isinstance(state.agent, A.AdamPhases)
    assert state.agent.agent.names == tuple(C.ADAM_CANDIDATES.split("|"))


def test_gravac_train_builds_its_settings_from_its_flags():
    from horovod_gravac.app.train import exchange_settings, parse_args
    args = parse_args(["--compression", "topk:10", "--min-compress-numel", "0",
                       "--compress-pattern", "*.bias=false", "--steps", "2"])
    settings = exchange_settings(args, None)
    assert settings.min_compress_numel == 0 and settings.compress_patterns == {"*.bias": False}
    assert settings.bucket_cap_mb == Settings.bucket_cap_mb  # not given: the library's
    assert settings.on_nonfinite == Settings.on_nonfinite
    assert settings.compression.name == "topk" and settings.adam_exchange == "off"
    adamw = exchange_settings(parse_args(["--compression", "auto", "--agent", "choice",
                                          "--optimizer", "adamw", "--steps", "2"]), "choice")
    assert adamw.compression.name == C.ADAM_CANDIDATES and adamw.adam_exchange != "off"
    sgd = exchange_settings(parse_args(["--compression", "auto", "--agent", "choice",
                                        "--steps", "2"]), "choice")
    assert sgd.compression.name == C.DEFAULT_CANDIDATES
