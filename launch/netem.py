#!/usr/bin/env python3
"""Run a Horovod (Gloo) job with each rank behind its own emulated network link, on one machine.

    sudo .venv/bin/python launch/netem.py --np 2 --rate 100mbit --delay 1ms -- \\
        .venv/bin/gravac-train --model lstm200 --steps 50

Each rank gets a network namespace joined to a bridge by a veth pair; both ends of every
pair are shaped with ``tc netem`` (rate and delay), so rank-to-rank traffic crosses two
shaped links, as between machines behind a switch. Horovod's own ``RendezvousServer`` runs
here on the bridge address, and each rank gets the environment ``horovodrun --gloo`` would
give it, with ``HOROVOD_GLOO_IFACE`` set to its veth. Because Horovod 0.28.1's process-set
Gloo context binds to the address the hostname resolves to, each namespace gets an
``/etc/netns/<ns>/hosts`` mapping the hostname to that rank's address.

Everything (namespaces, bridge, veths, hosts files) is removed afterwards, also when a rank
fails or on Ctrl-C/SIGTERM; a network left by an emulator that was killed outright (SIGKILL) is
removed by the next run. Needs root (CAP_NET_ADMIN) and iproute2's ``ip`` and ``tc``.
Only Gloo is supported (MPI would need its own TCP interface selection).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SUBNET = "10.231.{}.{}"
OWNERS = Path("/run/horovod-gravac-netem")  # one file per network: its tag, holding the owner's pid
NAME = re.compile(r"^hg(\d+)(br|[hv]\d+|r\d+)$")


class NetemError(RuntimeError):
    pass


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise NetemError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
    return res


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise NetemError("network emulation needs root (it creates network namespaces and "
                         "shapes links with tc): run it with sudo or as root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetemError(f"'{tool}' not found: install iproute2 (apt-get install iproute2)")


RATE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps)$")
DELAY = re.compile(r"^\d+(\.\d+)?(us|ms|s)$")


def rate_bits(rate: str) -> float:
    """'100mbit' → 1e8 bits/s; tc's units (bit, kbit, mbit, gbit, tbit; bps = bytes/s)."""
    number, unit = re.match(r"^(\d+(?:\.\d+)?)(\w+)$", rate).groups()
    scale = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
             "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}[unit]
    return float(number) * scale


class Network:
    """The namespaces, bridge and shaped veth pairs of one emulated cluster."""

    def __init__(self, ranks: int, rate: str | None, delay: str | None, tag: str) -> None:
        self.ranks, self.rate, self.delay, self.tag = ranks, rate, delay, tag
        self.subnet = int(tag) % 200 + 20
        self.bridge = f"hg{tag}br"
        self.namespaces: list[str] = []
        self.created_bridge = False
        self.netem_missing = False

    def address(self, rank: int | None) -> str:
        return SUBNET.format(self.subnet, 1 if rank is None else 10 + rank)

    def iface(self, rank: int, side: str) -> str:
        return f"hg{self.tag}{side}{rank}"

    def _shape(self, dev: str, ns: str | None = None) -> None:
        """netem (delay + rate) where the kernel has it, else tbf (rate only, with a warning)."""
        prefix = ["ip", "netns", "exec", ns] if ns else []
        if self.delay and not self.netem_missing:
            spec = ["delay", self.delay] + (["rate", self.rate] if self.rate else [])
            res = sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "netem", *spec,
                     "limit", "100000", check=False)
            if res.returncode == 0:
                return
            if "unknown" not in res.stderr:
                raise NetemError(f"tc netem on {dev} failed: {res.stderr.strip()}")
            self.netem_missing = True
            print(f"[netem] this kernel has no netem qdisc: --delay {self.delay} is NOT emulated, "
                  "links are only rate-limited (tbf)", file=sys.stderr)
        if self.rate:
            burst = max(64 * 1024, int(rate_bits(self.rate) / 8 / 100))  # ≥ 10 ms of traffic
            sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
               "burst", str(burst), "latency", "100ms")

    def up(self) -> None:
        OWNERS.mkdir(parents=True, exist_ok=True)
        (OWNERS / self.tag).write_text(str(os.getpid()))  # before any name with this tag exists
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.created_bridge = True
        sh("ip", "addr", "add", f"{self.address(None)}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        hostname = socket.gethostname()
        for rank in range(self.ranks):
            ns = f"hg{self.tag}r{rank}"
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            host_side, rank_side = self.iface(rank, "h"), self.iface(rank, "v")
            sh("ip", "link", "add", host_side, "type", "veth", "peer", "name", rank_side)
            sh("ip", "link", "set", rank_side, "netns", ns)
            sh("ip", "link", "set", host_side, "master", self.bridge)
            sh("ip", "link", "set", host_side, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.address(rank)}/24",
               "dev", rank_side)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", rank_side, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            self._shape(host_side)
            self._shape(rank_side, ns)
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{self.address(rank)} {hostname}\n")

    def down(self) -> None:
        for rank, ns in enumerate(self.namespaces):
            # Deleting one end removes the pair at once; a namespace's deletion does it later.
            sh("ip", "link", "del", self.iface(rank, "h"), check=False)
            sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        if self.created_bridge:
            sh("ip", "link", "del", self.bridge, check=False)
        self.namespaces.clear()
        self.created_bridge = False
        (OWNERS / self.tag).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale_networks() -> list[str]:
    """Remove the networks of emulators that died without cleaning up (SIGKILL, power loss).

    A network is stale when no owner file names a running process for its tag: ``up`` writes
    the file before it creates anything, so a network being built by a live emulator is never
    taken. Returns the tags removed.
    """
    namespaces = sh("ip", "netns", "list").stdout.split("\n")
    links = sh("ip", "-o", "link").stdout.split("\n")
    names = [line.split()[0] for line in namespaces if line.strip()]
    names += [line.split(":")[1].strip().split("@")[0] for line in links if line.count(":") > 1]
    by_tag: dict[str, list[str]] = {}
    for name in names:
        match = NAME.match(name)
        if match:
            by_tag.setdefault(match.group(1), []).append(name)
    reaped = []
    for tag, members in sorted(by_tag.items()):
        owner = OWNERS / tag
        if owner.exists() and owner.read_text().strip().isdigit() and _alive(int(owner.read_text())):
            continue
        for name in sorted(members, key=lambda n: n.endswith("br")):  # the bridge last
            kind = NAME.match(name).group(2)[0]
            if kind == "r":  # a rank's namespace, with the veth end inside it
                sh("ip", "netns", "del", name, check=False)
                shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
            elif kind in "hb":  # a host-side veth (its pair goes with it) or the bridge
                sh("ip", "link", "del", name, check=False)
        owner.unlink(missing_ok=True)
        reaped.append(tag)
    return reaped


def run(args: argparse.Namespace) -> int:
    def terminate(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, terminate)  # first: cleanup must cover everything below
    net = Network(args.np, args.rate, args.delay, tag=str(os.getpid() % 10000))
    procs: list[subprocess.Popen] = []
    try:
        from horovod.runner.common.util.hosts import SlotInfo
        from horovod.runner.http.http_server import RendezvousServer

        check_prerequisites()
        for tag in reap_stale_networks():
            print(f"[netem] removed network hg{tag}, left by an emulator that is no longer running",
                  file=sys.stderr)
        net.up()
        plan = [SlotInfo(hostname=f"rank{r}", rank=r, local_rank=0, cross_rank=r, size=args.np,
                         local_size=1, cross_size=args.np) for r in range(args.np)]
        server = RendezvousServer(verbose=0)
        port = server.start()
        server.init(plan)
        for slot in plan:
            env = dict(os.environ, PYTHONUNBUFFERED="1",
                       HOROVOD_GLOO_RENDEZVOUS_ADDR=net.address(None),
                       HOROVOD_GLOO_RENDEZVOUS_PORT=str(port), HOROVOD_CONTROLLER="gloo",
                       HOROVOD_CPU_OPERATIONS="gloo", HOROVOD_GLOO_IFACE=net.iface(slot.rank, "v"),
                       HOROVOD_HOSTNAME=slot.hostname, HOROVOD_RANK=str(slot.rank),
                       HOROVOD_SIZE=str(slot.size), HOROVOD_LOCAL_RANK="0", HOROVOD_LOCAL_SIZE="1",
                       HOROVOD_CROSS_RANK=str(slot.cross_rank), HOROVOD_CROSS_SIZE=str(slot.size),
                       GRAVAC_NETEM_ADDRESSES=",".join(net.address(r) for r in range(args.np)),
                       GLOO_SOCKET_IFNAME=net.iface(slot.rank, "v"))
            procs.append(subprocess.Popen(["ip", "netns", "exec", net.namespaces[slot.rank],
                                           *args.command], env=env))
        print(f"[netem] {args.np} ranks running in network hg{net.tag}, links "
              f"{args.rate or 'unshaped'} {args.delay or ''}".rstrip(), file=sys.stderr, flush=True)
        deadline = time.monotonic() + args.timeout if args.timeout else None
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                print(f"[netem] a rank exited with {failed[0]}: stopping the others", file=sys.stderr)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            if deadline and time.monotonic() > deadline:
                print(f"[netem] job exceeded --timeout {args.timeout}s", file=sys.stderr)
                return 124
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("[netem] interrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        net.down()
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--np", type=int, default=2, help="ranks, one namespace each")
    parser.add_argument("--rate", default="1gbit", help="per-link bandwidth, e.g. 100mbit, 1gbit; "
                        "'none' for unshaped")
    parser.add_argument("--delay", default="1ms", help="per-link one-way delay, e.g. 1ms; 'none'")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before the job is stopped")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every rank runs")
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        parser.error("give the command to run after --")
    if not 1 <= args.np <= 200:
        parser.error(f"--np must be in [1, 200], got {args.np}")
    args.rate = None if args.rate == "none" else args.rate
    args.delay = None if args.delay == "none" else args.delay
    if args.rate and not RATE.match(args.rate):
        parser.error(f"--rate must look like 100mbit or 1gbit, got {args.rate!r}")
    if args.delay and not DELAY.match(args.delay):
        parser.error(f"--delay must look like 1ms or 500us, got {args.delay!r}")
    try:
        return run(args)
    except NetemError as exc:
        print(f"[netem] {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
