"""The sandbox's launcher script: run as a file by apr.evals.sandbox, once per program.

It isolates (uid, namespaces, read-only mounts, rlimits), forks the reaper (pid 1 of the new pid
namespace) and execs the program with the audit-hook guard; see apr.evals.sandbox for the whole design.
It runs as `python -I -S -B sandbox_launcher.py --launch CFG_JSON`, so its top level imports only os and sys.
"""

from __future__ import annotations

import os
import sys

_GUARD_BEGIN, _GUARD_END = "# ---- guard: begin ----", "# ---- guard: end ----"
_BOOT = "import sys; exec(sys.argv[1], {'__name__': 'apr_sandbox_guard'})"
_NS = (("netns", 0x40000000), ("mountns", 0x00020000), ("pidns", 0x20000000), ("ipcns", 0x08000000))
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 8192, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
_KEEP = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
         "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}

# ---- guard: begin ----
# This section is sent as source to the sandboxed interpreter; it must stay self-contained (stdlib only).


def _make_guard(work, allow_fork, plain=()):
    """An audit hook that confines the program to `work` (the only filesystem barrier when not root). It
    raises the error a caller would expect (PermissionError), so ordinary code fails as it would on a
    read-only disk rather than in some stranger way. `plain`: the plain-values checker, when its harness is
    in place: then no function's code may be replaced, nor the checker's defaults, nor frames traced (a
    trace function can rewrite a frame's locals)."""
    import os

    realpath, fsdecode, dirname, basename, getpid, readlink, isdir = (
        os.path.realpath, os.fsdecode, os.path.dirname, os.path.basename, os.getpid, os.readlink, os.path.isdir)
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    root = work.rstrip("/") + "/"
    deny = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "pty.spawn", "os.chroot",
            "socket.__new__", "socket.bind", "socket.connect", "socket.sendto", "socket.getaddrinfo",
            "gc.get_objects", "gc.get_referrers", "gc.get_referents", "os.killpg"}
    if not allow_fork:  # no dedicated uid, so no RLIMIT_NPROC of its own to contain a storm
        deny |= {"os.fork", "os.forkpty"}
    if plain:
        deny |= {"sys.settrace", "sys.setprofile"}
    # event -> ((path argument, its dir_fd argument), ...), whether the call follows symlinks
    paths = {"os.remove": (((0, 1),), False), "os.rmdir": (((0, 1),), False), "os.mkdir": (((0, 2),), False),
             "os.rename": (((0, 2), (1, 3)), False), "os.link": (((1, 3),), False),
             "os.symlink": (((1, 2),), False), "os.truncate": (((0, None),), True),
             "os.chmod": (((0, 2),), True), "os.chown": (((0, 3),), True), "os.utime": (((0, 3),), True),
             "shutil.rmtree": (((0, 1),), False)}

    def resolve(p, fd, follow):
        p = fsdecode(p)
        if fd not in (None, -1) and not p.startswith("/"):  # relative to a directory fd: resolve it
            p = readlink(f"/proc/self/fd/{fd}") + "/" + p
        return realpath(p) if follow else realpath(dirname(p) or ".") + "/" + basename(p)

    def inside(p, fd=None, follow=True):
        if isinstance(p, int):  # an fd, opened under these rules
            return True
        r = resolve(p, fd, follow)
        return r == work or r.startswith(root) or r == "/dev/null"

    def check_open(path, mode, flags):
        if not isinstance(path, (str, bytes)):
            return
        name = fsdecode(path)
        if basename(name) == "mem" or resolve(name, None, True).endswith("/mem"):
            raise PermissionError("sandbox: process memory is off limits")  # by name: dir_fd is not audited
        write = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & writes)
        # os.open of a directory outside would give a dir_fd to write through, which "open" does not show
        if not inside(path) and (write or (mode is None and isdir(name))):
            raise PermissionError(f"sandbox: cannot write {path!r} outside the working directory")

    def hook(event, args):
        if event in deny or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            check_open(*args)
        elif event in paths:
            spec, follow = paths[event]
            if not all(inside(args[i], args[f] if f is not None and f < len(args) else None, follow)
                       for i, f in spec):
                raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")
        elif event == "import" and args[0] == "_posixsubprocess":  # fork_exec: an exec the hook never sees
            raise PermissionError("sandbox: starting other programs is not allowed")
        elif event == "os.kill" and args[0] != getpid():
            raise PermissionError("sandbox: cannot signal other processes")
        elif event == "object.__getattr__" and args[1] == "f_code":
            # with gc closed, the only way to the module's code object, whose constants hold the nonce
            raise AttributeError("f_code is not available in the sandbox")
        elif event == "object.__setattr__" and plain and (
                args[1] == "__code__" or args[1] in ("__defaults__", "__kwdefaults__") and any(o is args[0] for o in plain)):
            raise PermissionError(f"sandbox: setting {args[1]} is not allowed here")

    return hook


def _program_main():
    """In the sandboxed interpreter: read the program from fd 3, arm the guard, run it as __main__."""
    import os
    import sys

    import builtins

    guard, allow_fork = sys.argv[2] == "1", sys.argv[3] == "1"
    sys.argv = ["<program>"]
    builtins.exit = builtins.quit = sys.exit  # what `site` would have added (the sandbox runs with -S)
    main = type(sys)("__main__")
    sys.modules["__main__"] = main
    exec(_arm(guard, allow_fork), main.__dict__)  # the code object stays off every frame's locals


def _arm(guard, allow_fork):
    """The program's code, with the guard armed. A program whose last line before the sentinel is
    `check(NAME)  # apr: plain values only` (HumanEval's harness writes it) gets NAME wrapped so that
    every value it returns is checked to be plain data before the tests can compare it."""
    import os
    import sys

    chunks = []
    while chunk := os.read(3, 1 << 16):
        chunks.append(chunk)
    os.close(3)
    src = b"".join(chunks)
    lines = [line for line in src.split(b"\n") if line.strip()]
    plain = len(lines) >= 2 and lines[-2].startswith(b"check(") and lines[-2].endswith(b")  " + PLAIN_MARK)
    factory, checker = _plain_factory() if plain else (None, None)
    if guard:
        sys.addaudithook(_make_guard(os.getcwd(), allow_fork, (checker,) if plain else ()))
    if not plain:
        return compile(src, "<program>", "exec")
    return _plain_program(src, factory)


PLAIN_MARK = b"# apr: plain values only"
NOT_PLAIN_EXIT = 97  # the candidate returned something other than plain data (apr.evals.sandbox: not_plain)
_WRAP, _SLOTS = ("\0apr-plain-wrap\0",), ("\0apr-plain-check\0", "\0apr-plain-cand\0")  # placeholder constants


def _plain_program(src, factory):
    """Compile `src` with its last `check(NAME)` call turned into `check(wrap(NAME))`. The wrapper and
    the checker live only in code constants and default arguments (no globals, closures or mutable
    attributes), so nothing the candidate can reach can swap them out: the module's code object is off
    limits (f_code), and setting __code__/__defaults__ is refused by the guard in this mode."""
    import ast

    tree = ast.parse(src, "<program>")
    call = tree.body[-2].value if len(tree.body) >= 2 and isinstance(tree.body[-2], ast.Expr) else None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "check"
            and len(call.args) == 1 and isinstance(call.args[0], ast.Name) and not call.keywords):
        raise SystemExit("apr sandbox: the plain-values harness line is not a check(NAME) call")
    # check(NAME) -> check(_WRAP.__getitem__(0)(NAME)); a plain subscript of a constant would be folded away
    getter = ast.Attribute(ast.Constant(_WRAP), "__getitem__", ast.Load())
    call.args[0] = ast.Call(ast.Call(getter, [ast.Constant(0)], []), [call.args[0]], [])
    ast.fix_missing_locations(tree)
    code = compile(tree, "<program>", "exec")
    return code.replace(co_consts=tuple((factory,) if c == _WRAP else c for c in code.co_consts))


def _plain_factory():
    import os
    import types

    def plain(v, me, depth, _type=type, _n=type(None), _b=bool, _i=int, _f=float, _c=complex, _s=str, _y=bytes,
              _l=list, _t=tuple, _d=dict, _st=set, _fs=frozenset, _write=os.write, _exit=os._exit,
              _code=NOT_PLAIN_EXIT):
        # exact types only, compared by identity: a subclass, or a class whose metaclass lies, runs no code here
        t = _type(v)
        if t is _n or t is _b or t is _i or t is _f or t is _c or t is _s or t is _y:
            return v
        if depth < 100:
            if t is _l or t is _t or t is _st or t is _fs:
                out = []
                for x in v:
                    out.append(me(x, me, depth + 1))
                return out if t is _l else t(out)  # a fresh copy: the candidate keeps no handle on it
            if t is _d:
                out = {}
                for k, x in _d.items(v):
                    out[me(k, me, depth + 1)] = me(x, me, depth + 1)
                return out
        _write(2, b"apr sandbox: the candidate returned a value that is not plain data "
                  b"(None, bool, int, float, complex, str, bytes and lists/tuples/dicts/sets of them)\n")
        _exit(_code)

    def template(*args, **kwargs):
        k = ("\0apr-plain-check\0", "\0apr-plain-cand\0")  # becomes (plain, the candidate) in each copy
        return k[0](k[1](*args, **kwargs), k[0], 0)

    def factory(cand, _tmpl=template.__code__, _fn=types.FunctionType, _check=plain, _tuple=tuple, _slots=_SLOTS):
        consts = []
        for c in _tmpl.co_consts:
            consts.append((_check, cand) if c == _slots else c)
        return _fn(_tmpl.replace(co_consts=_tuple(consts)), {}, "candidate")

    return factory, plain


if __name__ == "apr_sandbox_guard":
    _program_main()
# ---- guard: end ----


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
    with open(__file__, encoding="utf-8") as f:
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
