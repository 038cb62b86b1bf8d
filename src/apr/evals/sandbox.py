"""Run untrusted generated code so that nothing it does can fake a pass or harm the host.

Process chain: harness -> launcher (root, own session) -> reaper (pid 1 of a new pid namespace) -> program
(a fresh interpreter, `python -I -S -B`, under a random unprivileged uid). Layers, each taken where this
machine permits (`SandboxResult.isolation` reports which took effect):
  1. a dedicated random uid (when root): it can neither signal nor write anything of ours, and it has its
     own RLIMIT_NPROC count, so a fork storm stays inside its budget and cannot starve other sandboxes;
  2. namespaces: network (no interfaces but a downed loopback), mount (every mount read-only, a small tmpfs
     as the working dir), pid (when the reaper exits the kernel kills every descendant), ipc;
  3. rlimits: address space, CPU seconds, processes, file size, open files, no core dumps; no_new_privs;
  4. an audit hook (PEP 578) in the program's interpreter, the only layer left when not root: it refuses
     writes outside the working dir, sockets, exec, signals to others, ctypes, and the routes to the
     nonce (the module's code object via frame.f_code, gc, /proc/*/mem);
  5. the harness: wall-clock timeout, incremental capped output reads, SIGKILL to the process group, the
     session and the uid afterwards, the temporary directory removed.
Passing needs exit status 0 AND a random nonce, printed by a line appended after the program, seen by the
harness: `sys.exit(0)`/`os._exit(0)` before the tests, tampered builtins, or an excepthook that swallows the
failure all lack it. The launcher and reaper live in apr/evals/sandbox_launcher.py, run as a script; the guard it sends the program, in sandbox_guard.py.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from apr.evals.sandbox_guard import NOT_PLAIN_EXIT

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")


@dataclass
class SandboxResult:
    passed: bool
    status: str  # passed | failed | early_exit | timeout | output_limit | memory_limit | cpu_limit | ... | error
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    isolation: dict = field(default_factory=dict)


def run_program(code: str, timeout_s: float = 10.0, memory_mb: int = 1024, cpu_s: int | None = None,
                max_output: int = 1 << 20, *, nproc: int = 64, fsize_mb: int = 16, disk_mb: int = 64,
                guard: bool = True, kernel: bool = True) -> SandboxResult:
    """Run `code` in the sandbox. Passed only if it exits 0 after the appended sentinel printed the nonce.
    `guard=False` / `kernel=False` leave out the audit hook / the uid, namespaces and mounts, so that
    tests can check each layer on its own; keep both on otherwise."""
    nonce = secrets.token_hex(16)
    start = time.monotonic()
    base = tempfile.mkdtemp(prefix="apr-sbx-")
    uid = _pick_uid()
    cfg = {"work": os.path.join(base, "work"), "stash": os.path.join(base, "stash"), "uid": uid,
           "program": os.path.join(base, "program.py"), "status": os.path.join(base, "status.json"),
           "memory_mb": memory_mb, "cpu_s": int(cpu_s or max(1, round(timeout_s)) + 1), "nproc": nproc,
           "fsize_mb": fsize_mb, "disk_mb": disk_mb, "guard": guard, "kernel": kernel}
    proc, out, err, why = None, b"", b"", None
    try:
        os.chmod(base, 0o711)  # the uid may traverse to its working dir, not list or read the rest
        os.mkdir(cfg["work"], 0o700)
        os.mkdir(cfg["stash"], 0o700)
        fd = os.open(cfg["program"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write((code + f"\n__import__('os').write(1, b'\\n{nonce}\\n')\n").encode("utf-8", "surrogatepass"))
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", LAUNCHER, "--launch", json.dumps(cfg)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=base,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True)
        out, err, why = _collect(proc, timeout_s, max_output, lambda: _sweep(proc.pid, uid))
    finally:
        if proc is not None:
            _sweep(proc.pid, uid)
            _wait(proc)
        iso = _read_json(cfg["status"])
        shutil.rmtree(base, onerror=_force_remove)
    iso.setdefault("uid", None)
    iso.update(launcher_pid=proc.pid if proc else None, tempdir=base)
    return _classify(proc.returncode if proc else None, out, err, why, nonce, iso, time.monotonic() - start)


def _classify(rc, out, err, why, nonce, iso, duration):
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    mark = f"\n{nonce}\n"
    saw_nonce = mark in stdout
    stdout = stdout.replace(mark, "", 1)
    if "error" in iso or rc == 125:
        status = "error"
    elif why:
        status = why
    elif rc == 0:
        status = "passed" if saw_nonce else "early_exit"  # exit 0 without running the tests through
    elif rc == NOT_PLAIN_EXIT:
        status = "not_plain_value"  # the candidate answered with an object, not data (it could fake ==)
    elif rc is not None and rc > 128:
        status = {signal.SIGXCPU: "cpu_limit", signal.SIGXFSZ: "file_size_limit"}.get(rc - 128, "killed")
    elif "MemoryError" in stderr[-2000:]:
        status = "memory_limit"
    else:
        status = "failed"
    return SandboxResult(status == "passed", status, rc, stdout, stderr, round(duration, 3), iso)


def _collect(proc, timeout_s, cap, sweep):
    """Read both pipes as they fill; stop at the deadline, at the output cap, or when the launcher is gone
    (after sweeping whatever it left holding our pipes)."""
    sel = selectors.DefaultSelector()
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    for f in bufs:
        os.set_blocking(f.fileno(), False)
        sel.register(f, selectors.EVENT_READ)
    deadline, why, exited = time.monotonic() + timeout_s, None, None
    while sel.get_map() and not why:
        now = time.monotonic()
        if now >= deadline or (exited and now - exited > 1.0):
            why = "timeout" if not exited else None
            break
        for key, _ in sel.select(min(0.05, deadline - now)):
            try:
                chunk = os.read(key.fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buf = bufs[key.fileobj]
            buf += chunk
            if len(buf) > cap:
                del buf[cap:]
                why = "output_limit"
                break
        if exited is None and proc.poll() is not None:
            exited = time.monotonic()
            sweep()
    sel.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), why


def _pick_uid():
    """A random uid no account uses, so its processes can be told apart and counted on their own."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return None
    uid = (1 << 20) + secrets.randbelow((1 << 30) - (1 << 20))
    try:
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/self/{name}") as f:
                if not any(int(a) <= uid < int(a) + int(n) for _, a, n in (ln.split() for ln in f)):
                    return None
    except OSError:
        return None
    return uid


def _members(pgid, uid):
    """Live processes in the launcher's group or session, or running as the sandbox uid."""
    found = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                state, _, pgrp, session = f.read().rsplit(")", 1)[1].split()[:4]
            owner = os.stat(f"/proc/{name}").st_uid
        except (OSError, ValueError):
            continue
        if state != "Z" and (int(pgrp) == pgid or int(session) == pgid or (uid is not None and owner == uid)):
            found.append(int(name))
    return found


def _sweep(pgid, uid):
    """SIGKILL the launcher's group, then anything left in its session or under its uid, until none."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
    for _ in range(50):
        victims = _members(pgid, uid)
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _wait(proc):
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for f in (proc.stdout, proc.stderr):
        f.close()


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _force_remove(func, path, _exc):
    """rmtree's error hook: a program may have chmod-ed its own dirs shut (matters when not root)."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        func(path)
    except OSError:
        pass


_ISOLATION = None

# isolation levels, strongest first: "namespaces" (root: its own uid, network, mount, pid and ipc
# namespaces, read-only filesystem); "user-namespaces" (not root: the same namespaces and read-only mounts
# inside a user namespace, but the program keeps our uid); "audit-hook" (only the in-interpreter guard and
# rlimits); "none".
LEVELS = ("namespaces", "user-namespaces", "audit-hook", "none")


def isolation_level(iso: dict) -> str:
    kernel = all(iso.get(k) for k in ("netns", "mountns", "pidns", "readonly_fs"))
    if kernel and iso.get("uid") is not None and not iso.get("userns"):
        return "namespaces"
    if kernel:
        return "user-namespaces"
    return "audit-hook" if iso.get("guard") else "none"


def isolation_report() -> dict:
    """Which isolation layers take effect on this machine (runs one trivial program, once)."""
    global _ISOLATION
    if _ISOLATION is None:
        r = run_program("pass", timeout_s=10)
        _ISOLATION = dict(r.isolation, works=r.passed, level=isolation_level(r.isolation))
        for k in ("launcher_pid", "tempdir"):  # per-run facts, not the machine's isolation
            _ISOLATION.pop(k, None)
    return _ISOLATION
