"""Several uvicorn workers, each accepting on a listening socket of its own (SO_REUSEPORT).

uvicorn's supervisor hands every worker the same listening socket. asyncio accepts every
pending connection each time that socket wakes a worker, so a burst of new connections (a load
balancer's keep-alive pool, a client's connection pool, a benchmark) lands on whichever worker
woke first: measured with 2 workers and 32 connections opened together, one worker served all
creates and the other none. With one socket per worker, bound with SO_REUSEPORT, the kernel
spreads new connections over the workers by their addresses.

This keeps uvicorn's supervisor (signals, health checks, replacing dead workers) and changes
only which socket a worker gets: worker i always listens on socket i, replacements included,
and that a worker does not outlive its supervisor (WorkerProcess).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket

from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import Multiprocess, Process, logger

# Pending connections per worker socket (uvicorn's default backlog).
BACKLOG = 2048


def reuse_port_supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


def listening_sockets(host: str, port: int, workers: int) -> list[socket.socket]:
    """The sockets the server accepts on: one per worker with SO_REUSEPORT (several workers,
    where the platform has it), else one, shared by every worker. OSError when host:port is
    taken, by any process.

    SO_REUSEPORT alone would let a second server (a second `dailyplay serve --workers 2` of the
    same user, say, on another database) bind the same port and silently take half of the
    connections. So the port is first bound once without it: that fails while anyone listens
    there, with SO_REUSEPORT or not."""
    family, kind, proto, _name, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )[0]

    def bind(reuse_port: bool) -> socket.socket:
        # Created as TCP, not protocol 0 as uvicorn makes them: asyncio sets TCP_NODELAY only
        # on connections of sockets whose protocol says TCP, and without it every keep-alive
        # response waited ~40 ms for a delayed ACK (measured with 2 workers: 730 req/s at
        # p50 44 ms, for a bare Starlette app too).
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.set_inheritable(True)
        except OSError:
            sock.close()
            raise
        return sock

    only = bind(reuse_port=False)
    if workers == 1 or not reuse_port_supported():
        return [only]
    only.close()
    sockets: list[socket.socket] = []
    try:
        for _ in range(workers):
            sockets.append(bind(reuse_port=True))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


# prctl(2) option: the signal this process gets when its parent dies.
PR_SET_PDEATHSIG = 1


def exit_with_supervisor(supervisor_pid: int) -> None:
    """On Linux, have SIGTERM sent to this worker when its supervisor dies, however it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):  # not Linux: workers are left as uvicorn leaves them
        return
    if prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return
    if os.getppid() != supervisor_pid:  # it died before the request above was made
        os.kill(os.getpid(), signal.SIGTERM)


class WorkerProcess(Process):
    """uvicorn's worker process, which stops (SIGTERM: gracefully) when the supervisor dies.

    uvicorn's workers outlived a supervisor killed with SIGKILL (the OOM killer, `kill -9` on
    its PID): orphans that went on serving, with the configuration they started with, on the
    port a restarted server then found taken."""

    def __init__(self, config: Config, sockets: list[socket.socket]):
        self.supervisor_pid = os.getpid()
        super().__init__(config, sockets)

    def target(self, sockets: list[socket.socket] | None = None) -> None:
        exit_with_supervisor(self.supervisor_pid)
        super().target(sockets)


class SpreadMultiprocess(Multiprocess):
    """uvicorn's Multiprocess, with worker i listening on sockets[i] only."""

    def __init__(self, config: Config, sockets: list[socket.socket]):
        if len(sockets) != config.workers:
            raise ValueError("one socket per worker")
        super().__init__(config, sockets=[])
        self.worker_sockets = sockets

    def _spawn(self, index: int) -> Process:
        process = WorkerProcess(self.config, [self.worker_sockets[index]])
        process.start()
        return process

    def init_processes(self) -> None:
        self.processes = [self._spawn(index) for index in range(self.processes_num)]

    def restart_all(self) -> None:
        """Replace each worker (SIGHUP), the new one serving before the old one retires."""
        for index, old_process in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new_process = self._spawn(index)
            timeout = self.config.timeout_worker_healthcheck
            if not new_process.wait_until_ready(timeout, self.should_exit):
                new_process.kill()
                new_process.join()
                if not self.should_exit.is_set():
                    logger.error(
                        "New child process [%s] was not ready in time; keeping worker [%s] "
                        "and aborting the restart.", new_process.pid, old_process.pid,
                    )  # fmt: skip
                return
            old_process.terminate()
            old_process.join()
            self.processes[index] = new_process

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for index, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung: kill it
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                # Failed before serving (app, socket): every restart would fail the same way.
                logger.error("Child process [%s] failed to start, stopping.", process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            logger.info("Child process [%s] died", process.pid)
            self.processes[index] = self._spawn(index)
