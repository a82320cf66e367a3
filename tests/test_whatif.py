"""The what-if model's parts on constructed inputs: traffic, link fit, scaling, choices, input."""
import csv
import json

import pytest
import torch

from benchmarks import whatif as W
from horovod_gravac import compression as C
from horovod_gravac.transport import link_steps

SHAPES = (("w", torch.Size([1000, 200])), ("b", torch.Size([200])))


def test_link_steps_grow_as_n_minus_one_for_every_kind():
    for n in (2, 4, 8, 256):
        assert link_steps(C.Exchange.ALLREDUCE, n) == 2 * (n - 1)
        assert link_steps(C.Exchange.ALLGATHER, n) == link_steps(C.Exchange.ALLTOALL, n) == n - 1
        assert link_steps(None, n) == n - 1  # the decision's broadcast


@pytest.mark.parametrize("n", [2, 4, 32, 256])
def test_traffic_of_allgathered_topk_grows_with_n_and_two_stages_stay_near_two_payloads(n):
    topk = C.create("topk")
    topk.cf = 100
    gathered = W.step_traffic(SHAPES, topk, frozenset({"b"}), 100, n)
    dense_b = 2 * (n - 1) / n * 4 * 200
    assert gathered.link_bytes == pytest.approx((n - 1) * 8 * 2000 + dense_b)
    assert gathered.decoded_bytes == pytest.approx(n * 8 * 2000 + 4 * 200)
    two = W.step_traffic(SHAPES, C.create("8bit:exchange=two_stage"), frozenset(), None, n)
    n_bytes = 200_200  # one byte per element, both tensors
    assert 2 * (n - 1) / n * n_bytes <= two.link_bytes <= 2 * (n - 1) / n * n_bytes * 1.1 + 64 * n
    dense = W.step_traffic(SHAPES, C.create("none"), frozenset(), None, n)
    assert dense.link_bytes == pytest.approx(2 * (n - 1) / n * 4 * 200_200)


def test_link_fit_recovers_its_three_terms_and_never_goes_negative():
    truth = W.Link(per_round=0.002, per_step=0.0005, per_byte=8e-8)
    points = [(k, s, b, truth.wait(k, s, b)) for k, s, b in
              ((1, 6, 1e6), (2, 9, 2e5), (2, 9, 4e5), (3, 12, 1e5), (2, 12, 3e4))]
    fit = W.fit_link(points)
    assert fit.per_round == pytest.approx(0.002, rel=1e-6)
    assert fit.per_step == pytest.approx(0.0005, rel=1e-6)
    assert fit.per_byte == pytest.approx(8e-8, rel=1e-6)
    # waits that fall as rounds grow: that term is dropped, not fitted negative
    odd = [(1, 6, 1e6, 0.09), (4, 6, 1e6, 0.08), (2, 6, 2e6, 0.17)]
    fit = W.fit_link(odd)
    assert min(fit.per_round, fit.per_step, fit.per_byte) >= 0
    with pytest.raises(ValueError, match="at least one"):
        W.fit_link([])


def test_a_rounds_host_wait_holds_above_the_cores_only():
    fitted = W.Link(0.02, 1e-4, 1e-7)
    assert W.emulated_link(fitted, 4, 8, cores=2) == fitted
    assert W.emulated_link(fitted, 4, 2, cores=2) == W.Link(0.0, 1e-4, 1e-7)
    assert W.emulated_link(fitted, 2, 8, cores=2) == fitted  # measured without sharing


def test_cluster_link_prices_bytes_by_the_bandwidth():
    link = W.cluster_link(10, 1e-5, 1e-4)
    assert link.per_byte == pytest.approx(8e-10) and link.gbit_per_s == pytest.approx(10)
    with pytest.raises(ValueError, match="bandwidth"):
        W.cluster_link(0, 1e-5, 0)


def write_run(directory, ranks, compression, cf=None, begin=0.002, finish=0.004, wait=0.03):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({
        "model": "mlp", "compression": compression, "cf": cf, "min_compress_numel": 1024,
        "compress_pattern": None}))
    (directory / "summary.json").write_text(json.dumps({"ranks": ranks}))
    columns = ["step", "step_s", "send", "forward_s", "backward_s", "update_s", "begin_s",
               "finish_s", "wait_s", "link_bytes", "rounds", "link_steps"]
    with open(directory / "steps.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for step in range(20):
            writer.writerow([step, 0.05, "", 0.001, 0.01 + begin, 0.001 + wait + finish, begin,
                             finish, wait, 1e5, 2, 2 * 3 + 3])
    return directory


def test_calibration_reads_medians_and_predicts_decoding_per_gathered_payload(tmp_path):
    cal = W.Calibration.from_run(write_run(tmp_path / "r", 4, "topk", cf=100), "TopK",
                                 warmup=5)
    assert cal.ranks == 4 and cal.cf == 100 and cal.rounds == 2 and cal.link_steps == 9
    assert cal.compute_s == pytest.approx(0.012)  # forward + backward − begin + update − ...
    link = W.Link(0.0, 0.0, 0.0)
    at4, at8 = (W.predict(cal, link, n, cpu_scale=1.0) for n in (4, 8))
    assert at4.codec_s == pytest.approx(0.006)
    # TopK decodes N payloads: twice the ranks, about twice the decoding
    assert at8.codec_s - 0.002 == pytest.approx(0.004 * cal.traffic(8).decoded_bytes
                                                / cal.traffic(4).decoded_bytes)
    assert 1.8 < (at8.codec_s - 0.002) / 0.004 < 2.05
    # message steps scale as N − 1, bytes from the shapes
    link = W.Link(0.001, 0.0001, 1e-8)
    p = W.predict(cal, link, 8, cpu_scale=2.0)
    assert p.wait_s == pytest.approx(0.002 + 0.0001 * 9 * 7 / 3 + 1e-8 * cal.traffic(8).link_bytes)
    assert p.compute_s == pytest.approx(0.024) and p.step_s == pytest.approx(
        p.compute_s + p.codec_s + p.wait_s)


def test_a_run_without_the_engines_counts_is_refused(tmp_path):
    run = tmp_path / "r"
    write_run(run, 4, "none")
    rows = list(csv.DictReader(open(run / "steps.csv")))
    with open(run / "steps.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{**r, "rounds": "", "link_steps": ""} for r in rows])
    with pytest.raises(ValueError, match="rounds, link_steps"):
        W.Calibration.from_run(run, "dense", warmup=0)


def test_gravac_choice_is_the_best_gain_per_second_above_epsilon():
    gains = {10: 0.95, 20: 0.9, 40: 0.8, 80: 0.6}
    assert W.gravac_choice(gains, {10: 1.0, 20: 0.5, 40: 0.45, 80: 0.1}) == "20"  # 80: δ < ε
    assert W.gravac_choice(gains, {10: 1.0, 20: 1.0, 40: 1.0, 80: 1.0}) == "10"
    assert W.gravac_choice({10: 0.5}, {10: 1.0}) == "dense"


def test_topk_gains_fall_with_the_cf_and_are_one_for_a_single_element_per_tensor():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    x, y = torch.randn(16, 64), torch.randn(16, 32)
    gains = W.topk_gains(model, [lambda m: (m(x) - y).pow(2).mean()], frozenset({"bias"}),
                         (1.0, 10.0, 100.0))
    assert gains[1.0] == pytest.approx(1.0)
    assert gains[1.0] > gains[10.0] > gains[100.0] > 0


def test_paper_steps_decode_per_peer_only_when_gathered_and_wait_per_bucket():
    shapes = (("w", torch.Size([2048, 2048])),)  # 16 MB: one 25 MB bucket
    link = W.cluster_link(25, 1e-5, 1e-4)
    codec = [(0.001, 0.002)]
    steps = {name: W.paper_step(W.PAPER_CONFIGS[name], shapes, frozenset(), 0.05, codec, link,
                                32) for name in ("TopK 100x (allgather)", "8-bit (two-stage)",
                                                 "PowerSGD rank 1 (allreduce)")}
    assert steps["TopK 100x (allgather)"].codec_s == pytest.approx(0.001 + 32 * 0.002)
    assert steps["8-bit (two-stage)"].codec_s == pytest.approx(0.001 * (1 + 1 / 32) + 0.004)
    assert steps["PowerSGD rank 1 (allreduce)"].codec_s == pytest.approx(0.003)
    dense = W.paper_step(W.PAPER_CONFIGS["dense (allreduce)"], shapes, frozenset(), 0.05,
                         [], link, 32)
    assert dense.wait_s == pytest.approx(1e-4 + 1e-5 * 62 + 3.2e-10 * 2 * 31 / 32 * 4 * 2048 ** 2)
    # an alltoall, then an allgather: two rounds, priced from the engine's buckets (no dense
    # sum where every tensor is compressed)
    two_stage = steps["8-bit (two-stage)"]
    assert two_stage.wait_s == pytest.approx(
        2e-4 + 1e-5 * (31 + 31) + 3.2e-10 * W.step_traffic(
            shapes, C.create("8bit:exchange=two_stage"), frozenset(), None, 32).link_bytes)


def test_step_flops_count_the_forward_and_backward_of_the_papers_lstm():
    flops = W.step_flops("lstm1500")
    tokens, h, vocab = 20 * 35, 1500, 10000
    forward = tokens * (2 * 2 * 4 * h * 2 * h + 2 * h * vocab)  # two layers' gates, the decoder
    assert 2.5 * forward < flops < 3.5 * forward


@pytest.mark.parametrize("argv, match", [
    (["--validate", "--ranks", "2,x"], "--ranks"),
    (["--validate", "--bandwidths", "0"], "--bandwidths"),
    (["--validate", "--configs", "nope"], "--configs"),
    (["--paper", "--paper-models", "alexnet"], "--paper-models"),
    (["--validate", "--calibrate-at", "1"], "--calibrate-at"),
    (["--validate", "--warmup", "60"], "--warmup"),
    (["--paper", "--gpu-tflops", "0"], "--gpu-tflops"),
    (["--paper", "--step-latency-us", "-1"], "--step-latency-us"),
    ([], "nothing to do"),
])
def test_bad_settings_are_refused_naming_the_flag(argv, match):
    with pytest.raises(ValueError, match=match):
        W.parse_args(argv)


def test_missing_calibration_runs_and_steps_to_target_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--measure --ranks 4"):
        W.calibrations(tmp_path, 4, 0)
    with pytest.raises(FileNotFoundError, match="--steps-to-target"):
        W.load_steps_to_target(tmp_path / "none.csv")


def test_paper_steps_pay_every_bucket_its_rounds_as_the_engine_fuses_them():
    link = W.cluster_link(25, 1e-5, 1e-4)
    one = W.paper_step(W.PAPER_CONFIGS["dense (allreduce)"], (("w", torch.Size([2048, 2048])),),
                       frozenset(), 0.0, [], link, 8)
    # three 16 MB tensors: the engine's 25 MB buckets hold one each (three rounds); one
    # tensor of 64 MB goes alone (one round), as BucketLayout.by_size lays them out
    three = W.paper_step(W.PAPER_CONFIGS["dense (allreduce)"],
                         tuple((f"w{i}", torch.Size([2048, 2048])) for i in range(3)),
                         frozenset(), 0.0, [], link, 8)
    big = W.paper_step(W.PAPER_CONFIGS["dense (allreduce)"],
                       (("w", torch.Size([4096, 4096])),), frozenset(), 0.0, [], link, 8)
    latency = 1e-4 + 1e-5 * 14  # one bucket's round and ring steps
    assert three.wait_s - 3 * (one.wait_s - latency) == pytest.approx(3 * latency)
    assert big.wait_s - 4 * (one.wait_s - latency) == pytest.approx(latency)


def test_a_kernel_floor_is_paid_once_per_pass_not_per_gathered_payload():
    link = W.cluster_link(25, 0.0, 0.0)
    topk = W.PAPER_CONFIGS["TopK 100x (allgather)"]
    shapes = (("w", torch.Size([512, 512])),)
    tiny = W.paper_step(topk, shapes, frozenset(), 0.0, [(1e-7, 1e-7)], link, 32, floor_s=2e-5)
    assert tiny.codec_s == pytest.approx(2 * 2e-5)  # 32 × 0.1 µs decoded in one pass: floored
    big = W.paper_step(topk, shapes, frozenset(), 0.0, [(1e-7, 1e-5)], link, 32, floor_s=2e-5)
    assert big.codec_s == pytest.approx(2e-5 + 32e-5)


def test_codec_choice_prefers_dense_unless_a_candidate_is_faster_by_more_than_it_loses():
    gains = {"dense": 1.0, "TopK 100x": 0.8, "TopK 1000x": 0.5}
    assert W.codec_choice(gains, {"dense": 1.0, "TopK 100x": 0.9, "TopK 1000x": 0.1}) == "dense"
    assert W.codec_choice(gains, {"dense": 1.0, "TopK 100x": 0.5, "TopK 1000x": 0.1}) \
        == "TopK 100x"  # 0.8 / 0.5 > 1 / 1; TopK 1000x is below ε whatever its speed


def test_codec_gains_are_one_for_dense_and_below_for_lossy_candidates():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    x, y = torch.randn(16, 64), torch.randn(16, 32)
    gains = W.codec_gains(model, [lambda m: (m(x) - y).pow(2).mean()], frozenset({"bias"}),
                          C.create("none|topk:10|powersgd:1"))
    assert gains[0] == pytest.approx(1.0)
    assert 0 < gains[1] < 1 and 0 < gains[2] < 1
