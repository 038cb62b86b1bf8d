"""Hostile completions against the sandbox. Each is shaped like a HumanEval sample whose answer is right
only if the attack worked, so `passed` doubles as "the attack got through". Every run must also leave no
process (scanned in /proc) and no temporary directory behind, and the harness (this pytest) must live on."""

from __future__ import annotations

import os
import socket
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

from apr.evals import sandbox
from apr.evals.sandbox import run_program

TEST = "def check(candidate):\n    assert candidate() == 42\n\ncheck(solve)\n"


def task(body: str) -> str:
    """A HumanEval-like program: `solve()` with this body, then the tests."""
    return "def solve():\n" + textwrap.indent(textwrap.dedent(body).strip() + "\n", "    ") + "\n" + TEST


def run(body: str, **kw):
    # runs that end on their own return early; the margin is for two interpreter starts on a loaded box
    kw.setdefault("timeout_s", 5)
    r = run_program(task(body), **kw)
    assert_clean(r)
    return r


def assert_clean(r):
    """Nothing of the run survives it: no live process in its group, session or uid; no temp dir."""
    iso = r.isolation
    assert sandbox._members(iso["launcher_pid"], iso.get("uid")) == []
    assert not os.path.exists(iso["tempdir"])


@pytest.fixture(scope="module")
def iso():
    return sandbox.isolation_report()


# "full": every layer; "guard": the audit hook alone (what a non-root machine gets); "kernel": uid,
# namespaces and mounts alone (only where root can have them).
MODES = {"full": {}, "guard": {"kernel": False}, "kernel": {"guard": False}}


def layers(mode, iso):
    if mode == "kernel" and not (iso.get("uid") and iso.get("readonly_fs") and iso.get("netns")):
        pytest.skip("kernel isolation (root, namespaces) not available here; the audit hook covers it")
    return MODES[mode]


def test_honest_programs():
    r = run("print('working')\nreturn 42")
    assert r.passed and r.status == "passed" and r.returncode == 0
    assert r.stdout == "working\n"  # the sentinel line is not shown
    r = run("return 41")
    assert not r.passed and r.status == "failed" and "AssertionError" in r.stderr


def test_isolation_report(iso):
    assert iso["works"], iso
    if os.geteuid() == 0 and iso["mountns"]:
        assert iso["uid"] and iso["readonly_fs"] and iso["tmpfs_work"], iso


def test_infinite_loop_times_out():
    r = run("while True:\n    pass", timeout_s=1.5)
    assert not r.passed and r.status in ("timeout", "cpu_limit") and r.duration_s < 5


@pytest.mark.parametrize("mode", MODES)
def test_fork_storm(mode, iso):
    r = run("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """, timeout_s=2, **layers(mode, iso))
    assert not r.passed and r.duration_s < 6


@pytest.mark.parametrize("mode", MODES)
def test_daemonized_grandchild_is_killed(mode, iso):
    """A child that leaves the session and outlives the program is still swept up."""
    r = run("""
        import os, time
        try:
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep(60)
                os._exit(0)
        except PermissionError:  # no fork under the hook alone
            pass
        return 42
        """, **layers(mode, iso))
    assert r.passed  # honest, and assert_clean found nothing alive


def test_memory_bomb():
    r = run("x = bytearray(8 << 30)\nreturn 42", memory_mb=512)
    assert not r.passed and r.status == "memory_limit"


@pytest.mark.parametrize("mode", MODES)
def test_writes_outside_workdir(mode, iso):
    name = f"apr-sbx-probe-{uuid.uuid4().hex}"
    targets = [os.path.join(tempfile.gettempdir(), name), os.path.join(Path.home(), name),
               os.path.join("/var/tmp", name), os.path.join("/dev/shm", name)]
    r = run(f"""
        import os, pathlib
        wrote = 0
        for p in {targets!r}:
            for attempt in (lambda: open(p, "w").write("x"), lambda: pathlib.Path(p).write_text("x"),
                            lambda: os.open(p, os.O_CREAT | os.O_WRONLY),
                            lambda: (os.symlink(p, "link"), open("link", "w").write("x"))):
                try:
                    attempt()
                    wrote += 1
                except Exception:
                    pass
        open("inside.txt", "w").write("fine")  # its own working dir stays writable
        return 42 if wrote else 0
        """, **layers(mode, iso))
    assert not r.passed, r.stderr
    assert not any(os.path.exists(t) for t in targets)


@pytest.mark.parametrize("mode", MODES)
def test_deleting_files_outside(mode, iso, tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    os.chmod(tmp_path, 0o755)
    r = run(f"""
        import os, shutil
        done = 0
        for attempt in (lambda: os.remove({str(sentinel)!r}), lambda: shutil.rmtree({str(tmp_path)!r}),
                        lambda: os.rename({str(sentinel)!r}, "stolen"), lambda: open({str(sentinel)!r}, "w")):
            try:
                attempt()
                done += 1
            except Exception:
                pass
        return 42 if done else 0
        """, **layers(mode, iso))
    assert not r.passed
    assert sentinel.read_text() == "keep me"


@pytest.mark.parametrize("mode", MODES)
def test_no_network(mode, iso):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        r = run(f"""
            import socket
            s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
            s.sendall(b"exfiltrated")
            return 42
            """, **layers(mode, iso))
        with pytest.raises(socket.timeout):
            server.accept()
    assert not r.passed and ("OSError" in r.stderr or "PermissionError" in r.stderr), r.stderr


@pytest.mark.parametrize("body", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit",
                                  "exit()", "quit(0)"])
def test_exiting_early_with_success_fails(body):
    r = run(body)
    assert not r.passed and r.returncode == 0 and r.status == "early_exit"


@pytest.mark.parametrize("mode", MODES)
def test_killing_the_parent(mode, iso):
    me = os.getpid()
    r = run(f"""
        import os, signal
        for attempt in (lambda: os.kill(os.getppid(), signal.SIGKILL), lambda: os.kill({me}, signal.SIGKILL),
                        lambda: os.killpg(os.getpgid(0), signal.SIGKILL), lambda: os.kill(-1, signal.SIGKILL)):
            try:
                attempt()
            except Exception:
                pass
        return 42
        """, **layers(mode, iso))
    assert os.getpid() == me  # still here
    assert r.status != "error"
    if mode != "kernel":  # the hook refuses every signal, so the program goes on to pass honestly
        assert r.passed
    else:  # killpg/kill(-1) may take the program itself down, never anything of ours
        assert r.status in ("passed", "killed")


def test_flooding_stdout():
    r = run("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * (1 << 20))\nreturn 42",
            max_output=1 << 20)
    assert not r.passed and r.status == "output_limit"
    assert len(r.stdout) <= 1 << 20 and r.duration_s < 5


@pytest.mark.parametrize("body", [
    # silence the failure report and fake success from builtins
    "import builtins\nbuiltins.print = lambda *a, **k: None\n"
    "builtins.AssertionError = type('AE', (Exception,), {})\nbuiltins.exit = builtins.quit = lambda *a: None\n"
    "return 0",
    # swallow the failing assert at the top level
    "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\nreturn 0",
    "import atexit, os\natexit.register(lambda: os._exit(0))\nreturn 0",
    # break what the sentinel line needs: the run then cannot count
    "import builtins\nbuiltins.__import__ = None\nreturn 42",
    "import os\nos.close(1)\nreturn 42",
])
def test_tampering_cannot_fake_a_pass(body):
    r = run(body)
    assert not r.passed


def test_hunting_the_nonce_fails():
    """A program written against this harness looks for the nonce where it lives, prints every candidate
    and exits 0: the guard keeps the code object, gc and process memory out of reach."""
    r = run("""
        import os, re, sys, gc
        found = set()
        def grab(f):
            try:
                found.update(re.findall(r"[0-9a-f]{32}", repr(f())))
            except Exception:
                pass
        grab(lambda: sys._getframe(1).f_code.co_consts)
        def tb():
            try:
                1 / 0
            except ZeroDivisionError as e:
                f = e.__traceback__.tb_frame
                while f.f_back:
                    f = f.f_back
                return f.f_code.co_consts
        grab(tb)
        grab(lambda: [o for o in gc.get_objects() if type(o).__name__ == "code"][:5000])
        grab(lambda: open("/proc/self/mem", "rb"))
        os.write(1, ("\\n".join(found) + "\\n").encode())
        os._exit(0)
        """)
    assert not r.passed and r.status == "early_exit"


@pytest.mark.parametrize("mode", ["full", "guard"])
def test_starting_other_programs(mode, iso, tmp_path):
    """exec would leave the audit hook behind: every route to it is refused."""
    r = run("""
        import os
        done = 0
        for attempt in (lambda: os.system("true"), lambda: __import__("subprocess").run(["true"]),
                        lambda: os.execv("/bin/true", ["true"]), lambda: os.posix_spawn("/bin/true", ["true"], {}),
                        lambda: __import__("_posixsubprocess"), lambda: __import__("ctypes").CDLL(None)):
            try:
                attempt()
                done += 1
            except Exception:
                pass
        return 42 if done else 0
        """, **layers(mode, iso))
    assert not r.passed, r.stderr
