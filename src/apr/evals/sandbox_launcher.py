"""The sandbox's launcher script: run as a file by apr.evals.sandbox, once per program.

It isolates (uid, namespaces, read-only mounts, rlimits), forks the reaper (pid 1 of the new pid
namespace) and execs the program with the audit-hook guard; see apr.evals.sandbox for the whole design.
It runs as `python -I -S -B sandbox_launcher.py --launch CFG_JSON`, so its top level imports only os and sys.
"""

from __future__ import annotations

import os
import sys

_GUARD_BEGIN, _GUARD_END = "# ---- guard: begin ----", "# ---- guard: end ----"  # markers in sandbox_guard.py
_BOOT = "import sys; exec(sys.argv[1], {'__name__': 'apr_sandbox_guard'})"
_NS = (("netns", 0x40000000), ("mountns", 0x00020000), ("pidns", 0x20000000), ("ipcns", 0x08000000))
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 8192, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
_KEEP = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
         "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}



def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc


def _mount(libc, src, target, fstype, flags, data=None):
    enc = (lambda s: s.encode() if isinstance(s, str) else s)
    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        import ctypes

        raise OSError(ctypes.get_errno(), f"mount {target}")


def _mountinfo():
    """(mount point, flags to keep) for each mount, in mount order."""
    import re

    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            flags = sum(_KEEP.get(o, 0) for o in fields[5].split(","))
            out.append((point, flags))
    return out


def _blocker(path):
    """The shallowest ancestor of `path` that others cannot search (e.g. /root, 0700), else None."""
    cur = "/"
    for part in [p for p in path.split("/") if p]:
        cur = os.path.join(cur, part)
        if not os.stat(cur).st_mode & 0o001:
            return cur
    return None


def _expose(libc, paths, stash):
    """Make the interpreter reachable by the unprivileged uid, in this mount namespace only: stash each
    path, cover its blocking ancestor with an empty tmpfs (hiding, say, the rest of /root), then move the
    stash back to the same path, so the interpreter's hard-coded RUNPATH and prefix still resolve."""
    plan = [(p, b) for p in paths if (b := _blocker(p))]
    for i, (p, _) in enumerate(plan):
        os.mkdir(os.path.join(stash, str(i)), 0o700)
        _mount(libc, p, os.path.join(stash, str(i)), None, MS_BIND | MS_REC)
    for b in sorted({b for _, b in plan}):
        _mount(libc, "tmpfs", b, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for i, (p, _) in enumerate(plan):
        os.makedirs(p, 0o755, exist_ok=True)
        _mount(libc, os.path.join(stash, str(i)), p, None, MS_MOVE)
    return [p for p, _ in plan]


def _interpreter_paths():
    exe_dir = os.path.dirname(os.path.realpath(sys.executable))
    paths = sorted({os.path.realpath(sys.base_prefix), exe_dir})
    return [p for p in paths if not any(p != q and p.startswith(q + "/") for q in paths)]


def _lockdown(libc, cfg, iso):
    """Private mount table: everything read-only except a fresh tmpfs working directory."""
    _mount(libc, "none", "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
    iso["exposed"] = _expose(libc, _interpreter_paths(), cfg["stash"])
    for point, keep in _mountinfo():  # some fail (shadowed mounts); "/" is checked below
        libc.mount(None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep, None)
    owner = f",uid={cfg['uid']},gid={cfg['uid']}" if cfg["uid"] is not None else ""
    _mount(libc, "tmpfs", cfg["work"], "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={cfg['disk_mb']}m,nr_inodes=4096,mode=0700{owner}")
    iso["tmpfs_work"] = True
    iso["readonly_fs"] = not os.access("/", os.W_OK)


def _isolate(cfg):
    iso = {"uid": None, "netns": False, "mountns": False, "pidns": False, "ipcns": False,
           "readonly_fs": False, "tmpfs_work": False, "guard": cfg["guard"]}
    if cfg["kernel"] and sys.platform.startswith("linux") and os.geteuid() != 0:
        iso["userns"] = _enter_userns()  # not root: become root of a new user namespace where allowed
    if cfg["kernel"] and sys.platform.startswith("linux") and os.geteuid() == 0:
        libc = _libc()
        for name, flag in _NS:
            iso[name] = libc.unshare(flag) == 0
        if iso["mountns"]:
            try:
                _lockdown(libc, cfg, iso)
            except OSError as e:  # e.g. mount denied by a container's seccomp profile: carry on without
                iso["lockdown_error"] = str(e)
        uid = cfg["uid"]  # only if the interpreter is reachable for it
        if uid is not None and (iso["tmpfs_work"] or not any(_blocker(p) for p in _interpreter_paths())):
            iso["uid"] = uid
    os.makedirs(os.path.join(cfg["work"], "tmp"), exist_ok=True)
    if iso["uid"] is not None:
        for d in (cfg["work"], os.path.join(cfg["work"], "tmp")):
            os.chown(d, iso["uid"], iso["uid"])
    return iso


def _enter_userns():
    """unshare(CLONE_NEWUSER) and map our uid/gid to 0 inside: the namespaces and mounts below then work
    for a non-root user (kernels with unprivileged user namespaces); False where the kernel refuses."""
    uid, gid = os.geteuid(), os.getegid()
    if _libc().unshare(0x10000000) != 0:
        return False
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:
        return False
    return os.geteuid() == 0


def _exit_code(status):
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _exec_program(cfg, iso, fd):
    """In the program's process: limits, then the unprivileged uid, then a fresh interpreter."""
    import resource

    try:
        if fd != 3:
            os.dup2(fd, 3)
        os.set_inheritable(3, True)  # dup2 onto itself would leave close-on-exec set
        os.closerange(4, 4096)
        os.chdir(cfg["work"])
        mem = cfg["memory_mb"] << 20
        limits = {resource.RLIMIT_AS: mem, resource.RLIMIT_CPU: cfg["cpu_s"], resource.RLIMIT_CORE: 0,
                  resource.RLIMIT_FSIZE: cfg["fsize_mb"] << 20, resource.RLIMIT_NOFILE: 256}
        if iso["uid"] is not None:  # RLIMIT_NPROC counts per uid and does not bind root
            limits[resource.RLIMIT_NPROC] = cfg["nproc"]
        for res, value in limits.items():
            hard = value + 1 if res == resource.RLIMIT_CPU else value  # SIGXCPU first, then SIGKILL
            resource.setrlimit(res, (value, hard))
        uid = iso["uid"]
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        if sys.platform.startswith("linux"):
            libc = _libc()
            libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary can raise privileges again
            libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG=SIGKILL (after setuid, which clears it)
        exe = os.path.realpath(sys.executable)
        flags = ["1" if cfg["guard"] else "0", "1" if uid is not None else "0"]
        env = {"HOME": cfg["work"], "TMPDIR": os.path.join(cfg["work"], "tmp"), "PATH": "/usr/bin:/bin",
               "LANG": "C.UTF-8"}
        os.execve(exe, [exe, "-I", "-S", "-B", "-X", "utf8", "-c", _BOOT, cfg["guard_src"], *flags], env)
    except BaseException as e:
        os.write(2, f"apr sandbox: cannot start the program: {e}\n".encode())
    os._exit(125)


def _reaper(cfg, iso, program):
    """pid 1 of the namespace when there is one: feeds the program its source, reaps, exits with its code."""
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            _exec_program(cfg, iso, r)
        os.close(r)
        try:
            with os.fdopen(w, "wb") as f:
                f.write(program)
        except BrokenPipeError:
            pass
        while True:
            child, status = os.waitpid(-1, 0)
            if child == pid:
                os._exit(_exit_code(status))
    except BaseException:
        os._exit(125)


def _guard_source():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_guard.py"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("\n" + _GUARD_BEGIN + "\n")  # the line itself, not the constant naming it
    return text[start: text.index("\n" + _GUARD_END + "\n", start)]


def _launcher_main(cfg_json):
    import json

    cfg = json.loads(cfg_json)
    os.umask(0o022)
    status = {"launcher_pid": os.getpid()}
    # opened before the mounts turn read-only
    out = os.open(cfg["status"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with open(cfg["program"], "rb") as f:
            program = f.read()
        os.unlink(cfg["program"])  # the nonce must not stay readable on disk
        cfg["guard_src"] = _guard_source()
        status.update(_isolate(cfg))
    except Exception as e:
        status["error"] = f"{type(e).__name__}: {e}"
    os.write(out, json.dumps(status).encode())
    os.close(out)
    if "error" in status:
        os._exit(125)
    pid = os.fork()
    if pid == 0:
        _reaper(cfg, status, program)
    os._exit(_exit_code(os.waitpid(pid, 0)[1]))


if __name__ == "__main__" and sys.argv[1:2] == ["--launch"]:
    _launcher_main(sys.argv[2])  # never returns
