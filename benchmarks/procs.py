"""Ending a child's whole process group. vLLM's engine core and workers (and Ray's and NCCL's helpers) are
processes of their own, so a child started with start_new_session=True is ended by its group, not its pid."""
import os
import signal
import subprocess
import time


def signal_group(p, sig) -> None:
    """Send sig to the process group that Popen p leads, if any of it is left."""
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def group_alive(pgid) -> list[int]:
    """Processes of group pgid that are not zombies (a zombie holds no memory; PID 1 may never reap it)."""
    alive = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()   # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(pid))
    return alive


def end_group(p, grace_s: float = 0.0, name: str | None = None) -> float:
    """End p's process group: with grace_s > 0, SIGTERM and up to grace_s s for p to exit (vLLM's clean
    shutdown, which ends its engine core and workers first); then SIGKILL whatever of the group is left.
    Returns the seconds taken, once p is reaped and none of its group runs (or 30 s after SIGKILL)."""
    t = time.time()
    if grace_s > 0:
        signal_group(p, signal.SIGTERM)
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        left = group_alive(p.pid)
        if left:
            print(f"[{name or p.pid}] {len(left)} process(es) still running {time.time() - t:.0f} s after "
                  "SIGTERM: SIGKILL", flush=True)
    signal_group(p, signal.SIGKILL)
    p.wait()
    deadline = time.time() + 30  # SIGKILL'd processes go within a second; never wait unbounded
    while group_alive(p.pid) and time.time() < deadline:
        time.sleep(0.2)
    return time.time() - t
