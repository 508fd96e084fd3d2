"""Which rank is gone: heartbeats that let the surviving ranks name the one that stopped.

While a multi-rank run trains, every rank keeps a small file `run_dir/.ranks/rank{r}` fresh from
a daemon thread (state, wall time, pid, host, about once a second). When a collective fails, gloo
and NCCL only say that a connection closed or that the wait timed out (after train.dist_timeout_s);
the survivors then read the heartbeats and name the rank whose process is gone (same host), whose
heartbeat stopped, or which recorded an error of its own, and end the run with one message that
also says which checkpoint `--resume` continues from.

The folder lives in the run directory, which (like the checkpoints) must be on a file system that
every node shares: on node-local disks a survivor sees only the heartbeats of its own node and
says so instead of naming a rank.

Only an error that reaches Python is turned into this message. gloo raises one (at once for a
closed connection, after the timeout otherwise); NCCL's watchdog may instead end the process
itself at the timeout, with its own message.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from adarec.errors import AdarecError

log = logging.getLogger("adarec.train")

HEARTBEAT_DIR = ".ranks"
BEAT_INTERVAL_S = 1.0
STALE_AFTER_S = 5 * BEAT_INTERVAL_S
"""A running rank whose heartbeat is older than this has stopped (a few missed beats, so a busy
file system or a long GIL hold does not make a live rank look dead)."""
EXIT_STATUS = 2
"""The CLI's exit status for an AdarecError."""

RUNNING, DONE, FAILED, LEFT = "running", "done", "failed", "left"
"""Heartbeat states: training; finished cleanly; stopped by an error of its own (recorded);
left because a collective failed (a survivor, not a cause)."""

# What gloo and NCCL put in the RuntimeError of a collective whose peer is gone or late. Only the
# network and timeout wording: a collective called wrongly (mismatched shapes, say) also names
# gloo or the process group, and it is this rank's bug, not a dead peer.
_COLLECTIVE_MARKERS = ("connection closed by peer", "connection reset by peer", "timed out waiting", "broken pipe",
                       "connection refused")


class RankLost(AdarecError):
    """A collective failed because another rank stopped; the message names it and how to resume."""


@dataclass(frozen=True)
class Heartbeat:
    rank: int
    state: str
    time: float
    pid: int
    host: str
    reason: str = ""

    def where(self) -> str:
        return f"pid {self.pid} on host {self.host}"


# -- the files ---------------------------------------------------------------------------------
def heartbeat_path(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rank{rank}"


def write_heartbeat(folder: Path, rank: int, state: str, reason: str = "", now: float | None = None) -> None:
    """Replace this rank's heartbeat in one rename, so a reader never sees half a file."""
    beat = {"rank": rank, "state": state, "time": time.time() if now is None else now, "pid": os.getpid(),
            "host": socket.gethostname(), "reason": reason}
    path = heartbeat_path(folder, rank)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(beat))
    os.replace(tmp, path)


def read_heartbeats(folder: Path, world_size: int) -> dict[int, Heartbeat | None]:
    """Every rank's last heartbeat; None for a rank without a readable file."""
    beats: dict[int, Heartbeat | None] = {}
    for rank in range(world_size):
        try:
            data = json.loads(heartbeat_path(folder, rank).read_text())
            beats[rank] = Heartbeat(**{k: data[k] for k in ("rank", "state", "time", "pid", "host")},
                                    reason=data.get("reason", ""))
        except (OSError, ValueError, KeyError, TypeError):
            beats[rank] = None
    return beats


# -- who is gone -------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether a process of this host is running; a zombie (killed, not yet reaped) is not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The state follows the parenthesised command name, which may itself hold spaces.
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stopped_ranks(beats: Mapping[int, Heartbeat | None], now: float, host: str, self_rank: int,
                  stale_after_s: float = STALE_AFTER_S,
                  is_alive: Callable[[int], bool] = pid_alive, since: float | None = None) -> dict[int, str]:
    """The ranks that stopped, each with why: an error it recorded, its process gone (same host),
    or no heartbeat for stale_after_s while it was training. Ranks that finished, that left after
    a failed collective themselves, or whose file is missing are not named. A heartbeat older than
    `since` (when this attempt's watch started) by more than stale_after_s is an earlier attempt's:
    its rank never reached training this time, whatever that file says."""
    stopped = {}
    for rank, beat in beats.items():
        if rank == self_rank or beat is None:
            continue
        age = max(0.0, now - beat.time)
        if since is not None and beat.time < since - stale_after_s:
            stopped[rank] = ("did not reach training in this attempt (its heartbeat is from an earlier one, "
                             f"{age:.0f} s ago)")
            continue
        if beat.state in (DONE, LEFT):
            continue
        if beat.state == FAILED:
            stopped[rank] = f"stopped with an error: {beat.reason}"
        elif beat.host == host and not is_alive(beat.pid):
            stopped[rank] = f"is gone (its process exited; last heartbeat {age:.0f} s ago)"
        elif age > stale_after_s:
            stopped[rank] = f"stopped (no heartbeat for {age:.0f} s)"
    return stopped


def describe_stopped(self_rank: int, beats: Mapping[int, Heartbeat | None], stopped: Mapping[int, str],
                     folder: Path, error: BaseException, resume_hint: str) -> str:
    """One message: which rank(s) stopped, or (none found) what the collective said and why no
    rank could be named, then how to resume."""
    if stopped:
        named = "; ".join(f"rank {r} ({beats[r].where()}) {why}" for r, why in sorted(stopped.items()))
        cause = f"the collective failed because {named}"
    else:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        missing = sorted(r for r, beat in beats.items() if beat is None and r != self_rank)
        running = sorted(r for r, beat in beats.items() if beat is not None and beat.state == RUNNING
                         and r != self_rank)
        if missing:
            unknown = (f"no heartbeat from rank(s) {', '.join(map(str, missing))} in {folder} (the run directory "
                       "must be on a file system every node shares)")
        elif running:
            unknown = (f"rank(s) {', '.join(map(str, running))} still send heartbeats but did not join the "
                       "collective (stuck, or slower than train.dist_timeout_s)")
        else:
            unknown = "every other rank left too"
        cause = f"a collective failed ({first_line}); {unknown}"
    return f"rank {self_rank}: {cause}; stopping. {resume_hint}"


def resume_hint(run_dir: Path, checkpoints: Path) -> str:
    """The sentence on how to continue: the newest checkpoint that verifies for every member."""
    from .checkpoint import find_resume_point

    try:
        members = sorted(p for p in Path(checkpoints).iterdir() if p.is_dir()) if Path(checkpoints).is_dir() else []
        tag = find_resume_point(members).tag if members else None
    except Exception:       # the hint must not hide the failure it comes with
        return f"Resume with --resume --output-dir {run_dir} (from the newest checkpoint in {checkpoints})."
    if tag is None:
        return f"No checkpoint was written yet: start the run again without --resume (output dir {run_dir})."
    return f"Resume with --resume --output-dir {run_dir} from checkpoint {tag} in {checkpoints}."


def is_collective_failure(err: BaseException) -> bool:
    """An error of torch.distributed's backend (a peer gone, a timeout), not of the program; it may
    arrive wrapped, so the chain of causes is searched."""
    import torch.distributed

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, torch.distributed.DistError):
            return True
        if isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _COLLECTIVE_MARKERS):
            return True
        err = err.__cause__ or err.__context__
    return False


# -- the watch ---------------------------------------------------------------------------------
def _exit_now() -> None:
    """Process exit without tearing down a process group that has a dead peer: gloo's destructor
    can abort ("terminate called without an active exception") or wait on the dead connection."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_STATUS)


class RankWatch:
    """Context manager around training: heartbeats while inside; on a failed collective, names the
    stopped rank(s) in a RankLost error, and makes the process exit right after the CLI has printed
    it. Does nothing in a one-process run.

    checkpoints: the run's checkpoint folder (one subfolder per member), for the resume sentence.
    end_process: False raises RankLost and leaves the process to its caller (an embedding program).
    """

    def __init__(self, run_dir: Path, rank: int, world_size: int, checkpoints: Path,
                 interval_s: float = BEAT_INTERVAL_S, stale_after_s: float = STALE_AFTER_S, end_process: bool = True):
        self.run_dir, self.checkpoints, self.end_process = Path(run_dir), Path(checkpoints), end_process
        self.folder = self.run_dir / HEARTBEAT_DIR
        self.rank, self.world_size = rank, world_size
        self.interval_s, self.stale_after_s = interval_s, stale_after_s
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started: float | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def __enter__(self) -> RankWatch:
        if not self.active:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        write_heartbeat(self.folder, self.rank, RUNNING)
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-rank{self.rank}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        warned = False
        while not self._stop.wait(self.interval_s):
            try:
                write_heartbeat(self.folder, self.rank, RUNNING)
            except OSError as err:
                if not warned:      # a file-system hiccup must not end training; the staleness margin absorbs it
                    log.warning("rank %d: cannot write heartbeat in %s: %s", self.rank, self.folder, err)
                    warned = True

    def _final(self, state: str, reason: str = "") -> None:
        self._stop.set()
        if self._thread is not None:
            # Bounded: a hung shared file system must not keep a stopping rank from exiting.
            self._thread.join(timeout=2 * self.interval_s)
        try:
            write_heartbeat(self.folder, self.rank, state, reason)
        except OSError:
            pass

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.active:
            return False
        if exc is None:
            self._final(DONE)
            return False
        if not is_collective_failure(exc):
            # This rank's own error (a bug, divergence, a full disk): recorded so the others can
            # name it, then raised unchanged.
            lines = str(exc).strip().splitlines()
            self._final(FAILED, f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)
            return False
        self._final(LEFT)
        stopped, beats = self.wait_for_stopped()
        message = describe_stopped(self.rank, beats, stopped, self.folder, exc,
                                   resume_hint(self.run_dir, self.checkpoints))
        # With no rank to blame, the collective's own traceback is what is left to go on.
        log.error("%s", message, exc_info=None if stopped else exc)
        if self.end_process:
            # The CLI prints the error and returns; the interpreter's teardown of the broken process
            # group is skipped (registered last, this runs before any other exit handler).
            atexit.register(_exit_now)
        raise RankLost(message) from None

    def wait_for_stopped(self) -> tuple[dict[int, str], dict[int, Heartbeat | None]]:
        """Read the heartbeats until a stopped rank shows, for at most stale_after_s and one beat:
        a dead process of this host shows at once, one on another node once its heartbeat ages."""
        deadline = time.monotonic() + self.stale_after_s + self.interval_s
        while True:
            beats = read_heartbeats(self.folder, self.world_size)
            stopped = stopped_ranks(beats, time.time(), self.host, self.rank, self.stale_after_s, since=self.started)
            others = [b for r, b in beats.items() if r != self.rank]
            settled = all(b is not None and b.state in (DONE, LEFT) for b in others)
            if stopped or settled or time.monotonic() >= deadline:
                return stopped, beats
            time.sleep(min(0.2, self.interval_s))
