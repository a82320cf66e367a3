"""The network emulator: ranks in namespaces behind shaped links, cleaned up on every exit."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NETEM = ROOT / "launch" / "netem.py"
sys.path.insert(0, str(NETEM.parent))
import netem  # noqa: E402

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="network emulation needs root and iproute2 (ip, tc)")


def names() -> list[str]:
    """The namespaces and links there are now."""
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found = [line.split()[0] for line in namespaces.splitlines() if line.strip()]
    return found + [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]


def leftovers(stderr: str) -> list[str]:
    """What is left of the network the emulator that printed ``stderr`` built (others may run)."""
    tag = re.search(r"ranks running in network (hg\d+)", stderr)
    assert tag, stderr[-3000:]
    return [n for n in names() if netem.NAME.match(n) and n.startswith(tag.group(1))]


def emulate(*command, rate="100mbit", timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(NETEM), "--np", "2", "--rate", rate, "--delay",
                           "1ms", "--", *command], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_refuses_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(netem.NetemError, match="needs root"):
        netem.check_prerequisites()


def test_rate_units():
    assert netem.rate_bits("100mbit") == 1e8 and netem.rate_bits("1gbps") == 8e9


@needs_root
def test_training_through_shaped_links_and_cleanup(tmp_path):
    res = emulate(sys.executable, "-m", "horovod_gravac.app.train", "--model", "mlp", "--data", "digits",
                  "--steps", "10", "--eval-interval", "10", "--compression", "topk:10",
                  "--agent", "gravac", "--window", "3", "--settle-steps", "1", "--no-progress",
                  "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "10 steps" in res.stdout
    assert not leftovers(res.stderr)


@needs_root
def test_link_is_actually_shaped():
    code = ("import time, horovod.torch as hvd, torch; hvd.init(); x = torch.ones(1_250_000);"
            "hvd.allreduce(x, name='warm'); t = time.time(); hvd.allreduce(x, name='m');"
            "print('seconds', time.time() - t, flush=True)")
    res = emulate(sys.executable, "-c", code, rate="50mbit")
    assert res.returncode == 0, res.stderr[-3000:]
    seconds = max(float(l.split()[-1]) for l in res.stdout.splitlines() if l.startswith("seconds"))
    assert seconds > 0.5  # 5 MB each way at 50 Mbit/s is ≥ 0.8 s; unshaped it is ~0.03 s


@needs_root
def test_failing_rank_stops_the_job_and_cleans_up():
    code = ("import os, horovod.torch as hvd, torch; hvd.init();"
            "hvd.rank() == 1 and os._exit(3); hvd.allreduce(torch.ones(1), name='x')")
    start = time.time()
    res = emulate(sys.executable, "-c", code)
    assert res.returncode == 3 and time.time() - start < 120
    assert not leftovers(res.stderr)


@needs_root
def test_sigterm_cleans_up():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(NETEM), "--np", "2", "--", "sleep", "60"],
                            env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # wait until the ranks run, however slow the machine is
        lines.append(line)
        if "ranks running" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "cleaning up" in err, "".join(lines) + err
    assert not leftovers("".join(lines) + err)


@needs_root
def test_network_of_a_killed_emulator_is_removed_by_the_next_run():
    stale = "hg99999r0"  # a tag no pid modulo 10000 gives, with no owner file: left by a SIGKILL
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        res = emulate(sys.executable, "-c", "pass")
        assert res.returncode == 0, res.stderr[-3000:]
        assert "removed network hg99999" in res.stderr
        assert stale not in names()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)
