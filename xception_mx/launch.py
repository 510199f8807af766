"""Launch a distributed job and watch it until every process has ended.

    python -m xception_mx.launch -n 2 -s 1 -- train_xception.py --kv-store dist_sync ...
    python -m xception_mx.launch -n 4 -s 2 --hosts hosts.txt -- train_xception.py --kv-store dist_sync ...
    python -m xception_mx.launch --horovod -n 2 -- train_xception.py --kv-store horovod ...

``dist_sync`` (default): the ps-lite scheduler, ``-s`` servers and ``-n`` workers. ``--horovod``: ``-n`` Horovod
processes on this machine over gloo, with Horovod's rendezvous server bound to 127.0.0.1 (``horovodrun`` binds its
rendezvous server to every address; use ``horovodrun`` for several machines).

One host (no ``--hosts``): every process runs here and binds to 127.0.0.1 only (``DMLC_PS_ROOT_URI``,
``DMLC_NODE_HOST`` and ``DMLC_INTERFACE=lo``; MXNet's bundled ``tools/launch.py`` binds the machine's external
address and crashes on Python 3.11 with ``Thread.isAlive``). Several hosts: ``--hosts FILE`` (one address per line,
``#`` comments) runs each process over ssh in the same working directory; the scheduler goes to the first host,
servers and workers round-robin over the hosts.

ps-lite never notices a dead process: one crashed worker leaves the others blocked forever. So the launcher watches
every child: when a worker fails (or a server or the scheduler ends before the workers), it stops all the others and
exits non-zero; ``--timeout`` bounds the whole job; Ctrl-C (SIGINT) or SIGTERM is forwarded to the workers, which
write a checkpoint and stop together, and a second one kills everything. Every child runs in its own process group,
which is killed at the end, so nothing is left behind.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from .console import OneLineParser, run_cli
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, RunFailed, UserError

__all__ = ["Child", "plan_local", "plan_hosts", "plan_horovod", "read_hosts", "run_job", "main"]

PROG = "python -m xception_mx.launch"
#: Exit codes: 1 = a process failed, 2 = bad input, 124 = --timeout reached, 130 = stopped by a signal.
EXIT_TIMEOUT = 124

@dataclass
class Child:
    """One process of the job: its role, where it runs and the command line that starts it."""
    role: str  # scheduler, server, worker
    index: int
    host: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    returncode: int | None = None

    @property
    def name(self) -> str:
        return self.role if self.role == "scheduler" else f"{self.role} {self.index}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (bound to port 0 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def command_argv(command: list[str]) -> list[str]:
    """The user's command; a leading ``something.py`` runs with this interpreter (train_xception.py need not be
    executable or on PATH)."""
    if not command:
        raise UserError("no command to run: put it after --, e.g. -- train_xception.py --kv-store dist_sync ...")
    return [sys.executable, *command] if command[0].endswith(".py") else list(command)


#: Servers and the scheduler run MXNet's default threaded engine whatever the caller exported (they only sum).
SERVER_ENV = {"MXNET_ENGINE_TYPE": "ThreadedEnginePerDevice"}


def _server_argv() -> list[str]:
    # Importing mxnet with DMLC_ROLE=server|scheduler runs the ps-lite node and exits when the workers finish.
    return [sys.executable, "-c", "import mxnet"]


def _ps_plan(workers: int, servers: int, command: list[str], hosts: list[str], port: int,
             interface: str | None) -> list[Child]:
    """The scheduler on ``hosts[0]``, servers and workers round-robin over ``hosts``, each with its ps-lite
    variables (DMLC_INTERFACE when ``interface`` is given; SERVER_ENV for the scheduler and servers)."""
    _check_counts(workers, servers)
    argv = command_argv(command)
    children = [Child("scheduler", 0, hosts[0], _server_argv())]
    children += [Child("server", i, hosts[i % len(hosts)], _server_argv()) for i in range(servers)]
    children += [Child("worker", i, hosts[i % len(hosts)], argv) for i in range(workers)]
    for c in children:
        c.env = {"DMLC_ROLE": c.role, "DMLC_PS_ROOT_URI": hosts[0], "DMLC_PS_ROOT_PORT": str(port),
                 "DMLC_NUM_WORKER": str(workers), "DMLC_NUM_SERVER": str(servers), "DMLC_NODE_HOST": c.host}
        if interface:
            c.env["DMLC_INTERFACE"] = interface
        if c.role != "worker":
            c.env.update(SERVER_ENV)
    return children


def plan_local(workers: int, servers: int, command: list[str], port: int | None = None) -> list[Child]:
    """Scheduler, servers and workers on this machine, all bound to 127.0.0.1."""
    return _ps_plan(workers, servers, command, ["127.0.0.1"], port or free_port(), "lo")


def read_hosts(path: str) -> list[str]:
    """Addresses from a hosts file: one per line; blank lines and ``#`` comments ignored."""
    if not os.path.isfile(path):
        raise UserError(f"--hosts {path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        hosts = [h for h in (line.split("#", 1)[0].strip() for line in f) if h]
    if not hosts:
        raise UserError(f"--hosts {path!r} lists no host (one address per line)")
    bad = [h for h in hosts if len(h.split()) != 1]
    if bad:
        raise UserError(f"--hosts {path!r}: {bad[0]!r} is not one address (one host per line)")
    return hosts


def plan_hosts(workers: int, servers: int, command: list[str], hosts: list[str], port: int, ssh: list[str],
               interface: str | None = None, cwd: str | None = None) -> list[Child]:
    """The same job over ssh: the scheduler on ``hosts[0]``, servers and workers round-robin over ``hosts``.

    Each remote command changes to ``cwd`` (default: this one), sets the ps-lite variables and runs the command
    under a guard that kills it when the ssh connection closes (so stopping the launcher stops the remote side).
    """
    children = _ps_plan(workers, servers, command, hosts, port, interface)
    cwd = cwd or os.getcwd()
    for c in children:
        c.env.update({k: os.environ[k] for k in ("MXNET_ENGINE_TYPE", "OMP_NUM_THREADS") if k in os.environ})
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in c.env.items())
        body = f"cd {shlex.quote(cwd)} && exec env {exports} {shlex.join(c.argv)}"
        # Run it in the background and watch stdin: when it reaches EOF (the launcher or ssh went away) kill it.
        guarded = (f"exec 3<&0; bash -c {shlex.quote(body)} </dev/null & p=$!; "
                   f"(cat <&3 >/dev/null; kill -TERM $p; sleep 5; kill -KILL $p) >/dev/null 2>&1 & w=$!; "
                   f"wait $p; rc=$?; kill $w 2>/dev/null; exit $rc")
        c.argv, c.env = [*ssh, c.host, guarded], {}  # the variables travel in the remote command
    return children


def plan_horovod(workers: int, command: list[str]) -> tuple[list[Child], Any]:  # Any: horovod's RendezvousHTTPServer
    """``workers`` Horovod (gloo) processes on this machine, and the rendezvous server (127.0.0.1) they meet at;
    the environment is the one ``horovodrun --gloo --network-interfaces lo`` gives its processes."""
    _check_counts(workers, 1)
    argv = command_argv(command)
    try:
        from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
        from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer
    except ImportError as exc:
        raise UserError(f"--horovod needs horovod ({exc}): run scripts/install_horovod.sh .venv/bin/python") from None
    server = RendezvousHTTPServer(("127.0.0.1", 0), RendezvousHandler, 0)
    plan = get_host_assignments(parse_hosts(f"127.0.0.1:{workers}"), workers)
    server.init(plan)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    children = []
    for slot in plan:
        env = {"HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1", "HOROVOD_GLOO_RENDEZVOUS_PORT": str(server.server_port),
               "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo", "HOROVOD_GLOO_IFACE": "lo",
               "NCCL_SOCKET_IFNAME": "lo", "HOROVOD_HOSTNAME": slot.hostname,
               **{f"HOROVOD_{k.upper()}": str(getattr(slot, k))  # HOROVOD_RANK=slot.rank, ...
                  for k in ("rank", "size", "local_rank", "local_size", "cross_rank", "cross_size")}}
        children.append(Child("worker", slot.rank, "127.0.0.1", argv, env))
    return children, server


def _check_counts(workers: int, servers: int) -> None:
    if workers < 1:
        raise UserError(f"-n/--num-workers must be >= 1, got {workers}")
    if servers < 1:
        raise UserError(f"-s/--num-servers must be >= 1, got {servers} (dist_sync needs a server)")


def _kill_group(child: Child, sig: int, ended_too: bool = False) -> None:
    """Send ``sig`` to the child's process group if it runs (``ended_too``: if it was started)."""
    if child.proc is not None and (ended_too or child.returncode is None):
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, sig)


def _reap(children: list[Child]) -> None:
    for c in children:
        if c.proc is not None and c.returncode is None:
            c.returncode = c.proc.poll()  # None while it runs


def _teardown(children: list[Child], grace: float) -> None:
    """SIGTERM every live process group, SIGKILL what is left after ``grace`` seconds, then reap (and kill any
    stragglers left in the groups of the processes that had already exited)."""
    live = [c for c in children if c.proc is not None and c.returncode is None]
    for c in live:
        _kill_group(c, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and any(c.returncode is None for c in live):
        time.sleep(0.05)
        _reap(children)
    for c in children:
        _kill_group(c, signal.SIGKILL)
        if c.proc is not None:
            with suppress(subprocess.TimeoutExpired):
                c.returncode = c.proc.wait(timeout=10)
        _kill_group(c, signal.SIGKILL, ended_too=True)  # grandchildren of an exited child still share its group


def _log(message: str) -> None:
    print(f"launch: {message}", file=sys.stderr, flush=True)


def _dies_with(parent: int):
    """A ``preexec_fn``: the child gets SIGKILL when the launcher dies, even by SIGKILL (Linux prctl
    PR_SET_PDEATHSIG), so no scheduler, server or worker is left running with nothing watching it."""
    def arm() -> None:
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)
    return arm


class _Job:
    """A job as ``run_job`` watches it: signals received (the first is forwarded), when every worker was first seen
    succeeded and a server or the scheduler ended (None until then), when it started. Each ``_check_*`` returns
    the job's exit code when that check ends it, else None."""

    def __init__(self, children: list[Child], timeout: float) -> None:
        self.children, self.timeout = children, timeout
        self.workers = [c for c in children if c.role == "worker"]
        self.signals: list[int] = []
        self.forwarded = False
        self.workers_done_at: float | None = None
        self.servers_done_at: float | None = None
        self.start = time.time()

    def start_children(self, stdout, stderr) -> None:
        for c in self.children:
            c.proc = subprocess.Popen(c.argv, env={**os.environ, **c.env}, stdin=subprocess.PIPE, stdout=stdout,
                                      stderr=stderr, start_new_session=True, preexec_fn=_dies_with(os.getpid()))
            _log(f"started {c.name} on {c.host} (pid {c.proc.pid})")

    def watch(self, poll: float) -> int:
        while True:  # every poll seconds: reap, then the checks in order until one returns the exit code
            time.sleep(poll)
            _reap(self.children)
            for check in (self._check_signals, self._check_workers, self._check_servers, self._check_timeout):
                if (code := check()) is not None:
                    return code

    def _check_signals(self) -> int | None:
        if self.signals and not self.forwarded:
            self.forwarded = True
            _log(f"{signal.Signals(self.signals[0]).name}: asking the workers to checkpoint and stop "
                 f"(again to kill every process)")
            for w in self.workers:
                _kill_group(w, self.signals[0])
        elif len(self.signals) > 1:
            _log("second signal: killing every process")
            return EXIT_INTERRUPTED
        return None

    def _check_workers(self) -> int | None:
        """0 once every worker has succeeded and the scheduler and servers have ended (by themselves, once every
        worker has finalised; 30 s at most). Else the first failed worker's code (1 for a signal), or 130 once every
        worker has ended if it stopped as asked by a forwarded signal (letting the others write and stop too)."""
        if all(w.returncode == 0 for w in self.workers):
            self.workers_done_at = self.workers_done_at or time.time()
            done = all(c.returncode is not None for c in self.children) or time.time() - self.workers_done_at > 30
            return 0 if done else None
        w = next((w for w in self.workers if w.returncode not in (None, 0)), None)
        if w is None:
            return None
        code = w.returncode
        assert code is not None  # w has ended
        why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if not (code == EXIT_INTERRUPTED and self.forwarded):
            _log(f"{w.name} failed ({why}): stopping every other process")
            return code if code > 0 else EXIT_FAILED
        return EXIT_INTERRUPTED if all(x.returncode is not None for x in self.workers) else None

    def _check_servers(self) -> int | None:
        """A server or the scheduler ends cleanly only after every worker has finalised (the workers are then
        exiting: give them a moment); any other early end leaves the workers blocked forever."""
        c = next((c for c in self.children if c.role != "worker" and c.returncode is not None), None)
        if c is not None and self.workers_done_at is None:  # once every worker succeeded, _check_workers decides
            self.servers_done_at = self.servers_done_at or time.time()
            if c.returncode != 0 or time.time() - self.servers_done_at > 30:
                _log(f"{c.name} ended (exit code {c.returncode}) while workers were running: stopping the job")
                return EXIT_FAILED
        return None

    def _check_timeout(self) -> int | None:
        """--timeout: not once every worker has succeeded (the scheduler and servers then have 30 s to end)."""
        if self.workers_done_at is None and time.time() - self.start > self.timeout:
            _log(f"--timeout {self.timeout:g}s reached: stopping every process")
            return EXIT_TIMEOUT
        return None


def run_job(children: list[Child], timeout: float, grace: float = 5.0, poll: float = 0.1,
            stdout=None, stderr=None) -> int:
    """Start every child, watch them, tear the job down on failure, timeout or a second signal; return the exit
    code: 0 when every worker succeeded, else the first failing worker's code (1 if it had none), 124 on timeout,
    130 when stopped by a signal."""
    job = _Job(children, timeout)
    previous = {s: signal.signal(s, lambda signum, frame: job.signals.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        job.start_children(stdout, stderr)
        result = job.watch(poll)
    finally:
        _teardown(children, grace)
        for s, handler in previous.items():
            signal.signal(s, handler)
    _log(f"done in {time.time() - job.start:.1f}s, exit code {result}")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, allow_abbrev=False,
                            description="Start a dist_sync job (ps-lite scheduler, servers, workers) and watch it.",
                            epilog="Example: python -m xception_mx.launch -n 2 -s 1 -- train_xception.py "
                                   "--kv-store dist_sync --config CFG")
    parser.add_argument("-n", "--num-workers", required=True, help="worker processes")
    parser.add_argument("-s", "--num-servers", help="parameter-server processes (dist_sync; required without "
                                                    "--horovod)")
    parser.add_argument("--horovod", action="store_true", help="run -n Horovod processes over gloo on this "
                                                               "machine (loopback) instead of a dist_sync job")
    parser.add_argument("--hosts", help="file of host addresses, one per line: run over ssh (default: this "
                                        "machine, loopback only)")
    parser.add_argument("--port", help="scheduler port (default: a free one on loopback; with --hosts: 9091)")
    parser.add_argument("--interface", help="with --hosts: network interface ps-lite binds on each host "
                                            "(DMLC_INTERFACE, e.g. eth0)")
    parser.add_argument("--ssh", default="ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new",
                        help="ssh command used with --hosts")
    parser.add_argument("--timeout", default="86400", help="seconds after which every process is stopped "
                                                           "(default 86400; exit code 124)")
    parser.add_argument("--grace", default="5", help="seconds between SIGTERM and SIGKILL at teardown (default 5)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the training command")
    return parser


def _number(text: str, flag: str, kind=int, minimum: float = 1):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise UserError(f"{flag} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if value < minimum:
        raise UserError(f"{flag} must be >= {minimum:g}, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(PROG, lambda: _launch(argv))


def _launch(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    workers = _number(args.num_workers, "-n/--num-workers")
    timeout = _number(args.timeout, "--timeout", float, 1)
    grace = _number(args.grace, "--grace", float, 0)
    rendezvous, servers, port, hosts = None, 0, None, []
    command_argv(command)  # a command is required
    if command[0].endswith(".py") and not args.hosts and not os.path.isfile(command[0]):
        raise UserError(f"{command[0]}: no such file")
    if args.horovod:
        if args.hosts or args.num_servers:
            raise UserError("--horovod runs on this machine only and has no servers: drop --hosts/-s (use "
                            "horovodrun -H for several machines)")
        children, rendezvous = plan_horovod(workers, command)
        _log(f"{workers} horovod process(es) over gloo on 127.0.0.1, rendezvous port {rendezvous.server_port}; "
             f"timeout {timeout:g}s")
    else:
        if args.num_servers is None:
            raise UserError("-s/--num-servers is required for a dist_sync job (or pass --horovod)")
        servers = _number(args.num_servers, "-s/--num-servers")
        hosts = read_hosts(args.hosts) if args.hosts else []
        port = _number(args.port, "--port") if args.port else 9091 if args.hosts else free_port()
        children = (plan_hosts(workers, servers, command, hosts, port, shlex.split(args.ssh), args.interface)
                    if args.hosts else plan_local(workers, servers, command, port))
        where = f"hosts {', '.join(hosts)}" if args.hosts else "127.0.0.1"
        _log(f"{workers} worker(s), {servers} server(s), scheduler port {port} ({where}); timeout {timeout:g}s")
    try:
        return run_job(children, timeout, grace)
    except OSError as exc:
        raise RunFailed(f"could not start {exc.filename or 'a process'}: {exc.strerror}") from None
    finally:
        if rendezvous is not None:
            rendezvous.shutdown()


if __name__ == "__main__":
    sys.exit(main())
