"""Emulate a multi-host cluster on one machine, for launcher tests across "hosts".

Each host is a network namespace with its own address on a bridge, its own hostname (a UTS
namespace), its own ``/etc/hosts`` (``/etc/netns/<host>/hosts``, which ``ip netns exec``
mounts) and its own ``sshd`` that accepts a key made for the cluster. The filesystem is shared,
as on a cluster with a shared home, so every host sees the same repository and venv.

Needs root, ``ip`` (iproute2), ``unshare`` (util-linux) and ``sshd`` (openssh-server):
:func:`why_unavailable` says what is missing, so a test can skip with the reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH_PORT = 2222
INTERFACE = "eth0"  # the namespace end of each veth pair is renamed to this


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def why_unavailable() -> str | None:
    """``None`` when this machine can emulate hosts, else the reason it cannot."""
    if os.geteuid() != 0:
        return "emulated hosts need root (network namespaces, sshd)"
    missing = [tool for tool, path in (("ip (iproute2)", shutil.which("ip")),
                                       ("unshare (util-linux)", shutil.which("unshare")),
                                       ("ssh (openssh-client)", shutil.which("ssh")),
                                       ("ssh-keygen", shutil.which("ssh-keygen")),
                                       ("sshd (openssh-server)", os.path.exists(SSHD) or None))
               if not path]
    if missing:
        return "emulated hosts need " + ", ".join(missing)
    probe = "hgprobe"
    made = _sh("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _sh("ip", "netns", "del", probe, check=False)
    return None


class EmulatedCluster:
    """``hosts`` emulated hosts named ``<prefix>0``, ``<prefix>1``, … on ``10.213.0.0/24``.

    Use as a context manager; everything it made (namespaces, bridge, sshd processes, host
    files, known-hosts entries) is removed on exit, also after a failure.
    """

    def __init__(self, hosts: int = 2, prefix: str = "hgnode", subnet: str = "10.213.0"):
        self.names = [f"{prefix}{i}" for i in range(hosts)]
        self.addresses = {name: f"{subnet}.{i + 1}" for i, name in enumerate(self.names)}
        self.bridge = f"{prefix}br"
        self.subnet = subnet
        self.work = Path(tempfile.mkdtemp(prefix="hvdgravac-cluster-"))
        self.key = self.work / "id_ed25519"
        self._sshd: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ set-up
    def __enter__(self) -> "EmulatedCluster":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        host_key = self.work / "host_ed25519"
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
        shutil.copy(f"{self.key}.pub", self.work / "authorized_keys")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{addr} {name}\n" for name, addr in self.addresses.items())

        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for i, name in enumerate(self.names):
            outer = f"{self.bridge[:8]}v{i}"
            _sh("ip", "netns", "add", name)
            _sh("ip", "link", "add", outer, "type", "veth", "peer", "name", f"{outer}p")
            _sh("ip", "link", "set", outer, "master", self.bridge, "up")
            _sh("ip", "link", "set", f"{outer}p", "netns", name)
            inside = ("ip", "netns", "exec", name, "ip")
            _sh(*inside, "link", "set", f"{outer}p", "name", INTERFACE)
            _sh(*inside, "addr", "add", f"{self.addresses[name]}/24", "dev", INTERFACE)
            _sh(*inside, "link", "set", INTERFACE, "up")
            _sh(*inside, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / name
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file)
            config = self.work / f"sshd_{name}.conf"
            config.write_text(
                f"Port {SSH_PORT}\nListenAddress {self.addresses[name]}\n"
                f"HostKey {host_key}\nAuthorizedKeysFile {self.work}/authorized_keys\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                "StrictModes no\nUsePAM no\nPrintMotd no\nAcceptEnv *\n"
                f"PidFile {self.work}/sshd_{name}.pid\n")
            self._sshd.append(self.popen(name, [SSHD, "-D", "-e", "-f", str(config)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for name in self.names:
            self._wait_for_ssh(name)

    def _wait_for_ssh(self, name: str, timeout: float = 20.0) -> None:
        """Wait until ``name`` answers, and trust its host key (as an admin would)."""
        deadline = time.monotonic() + timeout
        while True:
            res = subprocess.run(self.wrap(self.names[0], [
                "ssh", "-p", str(SSH_PORT), "-i", str(self.key), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=accept-new", "-o", "LogLevel=ERROR", name, "hostname"]),
                capture_output=True, text=True)
            if res.returncode == 0 and res.stdout.strip() == name:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {name} did not answer: {res.stderr.strip()}")
            time.sleep(0.2)

    # ------------------------------------------------------------------ use
    def wrap(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run on ``host``: in its namespace, under its hostname."""
        return ["ip", "netns", "exec", host, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', host, *argv]

    def popen(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.wrap(host, argv), **kwargs)

    def host_of(self, pid: int) -> str | None:
        """The emulated host whose network namespace process ``pid`` lives in."""
        res = _sh("ip", "netns", "identify", str(pid), check=False)
        return res.stdout.strip() or None

    # ------------------------------------------------------------------ tear-down
    def close(self) -> None:
        for proc in self._sshd:
            proc.kill()
            proc.wait()
        self._sshd.clear()
        for name in self.names:
            # whatever still runs in a namespace (a test's leftovers) goes with it
            pids = _sh("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _sh("ip", "netns", "del", name, check=False)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
            for addr in (self.addresses[name], name):
                _sh("ssh-keygen", "-R", f"[{addr}]:{SSH_PORT}", check=False)
        _sh("ip", "link", "del", self.bridge, check=False)
        shutil.rmtree(self.work, ignore_errors=True)
