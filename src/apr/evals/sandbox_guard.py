"""The sandbox's guard: the code the sandboxed interpreter runs before the program (see apr.evals.sandbox).

The launcher (sandbox_launcher.py) sends the section between the markers below to the sandboxed interpreter
as source, so that section stays self-contained (stdlib only). It holds the audit-hook guard and HumanEval's
plain-values checker. Importing this module (as apr.evals.sandbox does, for its constants) runs nothing.
"""

from __future__ import annotations

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
