"""
Run untrusted, model-written Python (HumanEval completions, tool calls) in a separate process.

execute_code(code) starts `python -I -B` in a fresh temporary directory (deleted afterwards). Before the
user code runs, the child:
  - sets resource limits: RLIMIT_AS (address space = memory), RLIMIT_CPU (CPU seconds), RLIMIT_FSIZE
    (largest file it may write, which also caps stdout/stderr, written to files), RLIMIT_CORE = 0;
  - replaces socket creation and name resolution with functions that raise PermissionError;
  - applies a "reliability guard": process control (os.system, os.kill, os.fork, os.exec*, os.spawn*,
    os.popen, os._exit, subprocess.Popen, ...) raises PermissionError; deleting, renaming or permission-changing files
    (os.remove/unlink/rmdir/rename/replace, pathlib's methods that use them, shutil.rmtree/move) and
    opening files for writing (open/io.open/os.open) are refused outside the temporary directory.
The parent kills the child's whole process group at the wall-clock timeout.

What this protects against: honest mistakes of a model-written program (infinite loops, runaway memory,
huge outputs, `rm`-like calls, stray network calls, forks) ruining the evaluation or the machine.
What it does NOT protect against: deliberate attacks. The guards are Python-level monkeypatches; code can
undo them (importlib.reload, ctypes, the _posixsubprocess/_socket modules, ...). The child runs as the same
user and can read anything that user can read. RLIMIT_AS is not enforced on macOS. For adversarial code,
use a container or VM with no network.

Safe to call from many threads at once: no shared state, no preexec_fn (the child limits itself).
"""

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MEMORY_ERROR_EXIT = 99  # the child's exit code when the user code raised MemoryError

# Runs in the child as `python -I -B -c CHILD_SOURCE workdir program memory_bytes cpu_seconds file_bytes`.
CHILD_SOURCE = r'''
import builtins, io, os, resource, signal, sys, traceback
workdir, program = sys.argv[1], sys.argv[2]
memory_bytes, cpu_seconds, file_bytes = (int(a) for a in sys.argv[3:6])
if memory_bytes > 0:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))  # SIGXCPU at the soft limit, SIGKILL 1s later
resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core file behind
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing us
sys.stdout.reconfigure(encoding="utf-8", errors="backslashreplace")
sys.stderr.reconfigure(encoding="utf-8", errors="backslashreplace")
with open(program, encoding="utf-8") as f:
    source = f.read()

def refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return refused

# --- no network: every socket constructor and name lookup raises (a guard, not a security boundary)
import socket, _socket
for module in (socket, _socket):
    # socket.socket stays a class (ssl and others subclass it); making one raises
    module.socket = type("socket", (module.socket,), {"__init__": refuse("network access (socket)")})
    for name in ("socketpair", "fromfd", "create_connection", "create_server",
                 "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(module, name):
            setattr(module, name, refuse(f"network access ({name})"))

# --- no process control
import subprocess, shutil
for name in ("system", "popen", "kill", "killpg", "fork", "forkpty", "vfork", "setsid", "setuid", "setgid",
             "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
             "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe",
             "posix_spawn", "posix_spawnp", "chroot", "chmod", "fchmod", "lchmod", "chown",
             "fchown", "lchown", "truncate", "link", "symlink", "mkfifo", "mknod", "_exit", "abort"):
    if hasattr(os, name):
        setattr(os, name, refuse(f"os.{name}"))
subprocess.Popen = refuse("subprocess")
for name in ("rmtree", "move", "chown"):
    setattr(shutil, name, refuse(f"shutil.{name}"))
builtins.help = refuse("help")

# --- file changes only inside the temporary directory
def inside_workdir(path):
    if isinstance(path, int):  # a file descriptor we already hold
        return True
    real = os.path.realpath(os.fsdecode(path))
    return real == workdir or real.startswith(workdir + os.sep) or real == os.devnull

def guard_path(name, original, n_paths=1):
    def guarded(*args, **kwargs):
        if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
            raise PermissionError(f"os.{name} with dir_fd is disabled in the sandbox")
        for path in args[:n_paths]:
            if not inside_workdir(path):
                raise PermissionError(f"os.{name}({path!r}) outside the sandbox directory is disabled")
        return original(*args, **kwargs)
    return guarded

for name, n_paths in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("removedirs", 1),
                      ("rename", 2), ("renames", 2), ("replace", 2)):
    setattr(os, name, guard_path(name, getattr(os, name), n_paths))

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
original_os_open, original_io_open = os.open, io.open

def guarded_os_open(path, flags, *args, **kwargs):
    if flags & WRITE_FLAGS and (kwargs.get("dir_fd") is not None or not inside_workdir(path)):
        raise PermissionError(f"writing {path!r} outside the sandbox directory is disabled")
    return original_os_open(path, flags, *args, **kwargs)

def guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not inside_workdir(file):
        raise PermissionError(f"writing {file!r} outside the sandbox directory is disabled")
    return original_io_open(file, mode, *args, **kwargs)

os.open, io.open, builtins.open = guarded_os_open, guarded_open, guarded_open

# --- run the user code as __main__; a MemoryError gets its own exit code so the parent can report it. A run
# succeeds only by reaching the program's end: exit(), quit() or sys.exit(0) before the tests ran is a failure
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except MemoryError:
    traceback.print_exc()
    sys.stdout.flush()
    sys.exit(MEMORY_ERROR_EXIT)
except SystemExit as e:
    sys.stdout.flush()
    sys.stderr.write(f"SystemExit: the program exited ({e.code!r}) before its end\n")
    sys.exit(1)
'''.replace("MEMORY_ERROR_EXIT", str(MEMORY_ERROR_EXIT))


@dataclass
class ExecutionResult:
    success: bool  # ran to its end (no exception, no exit() before it) within the limits
    stdout: str
    stderr: str
    error: str | None = None  # one line: why it failed (the exception, "timed out after 5s", ...)
    timed_out: bool = False
    memory_exceeded: bool = False


def _read_capped(f, max_bytes):
    """Up to max_bytes of an output file as text, marked when cut."""
    f.seek(0)
    data = f.read(max_bytes + 1)
    text = data[:max_bytes].decode("utf-8", errors="replace")
    return text + "\n[output truncated]" if len(data) > max_bytes else text


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _failure_reason(returncode, stderr, timeout, memory_limit_mb):
    """(error line, timed_out, memory_exceeded) for a finished child."""
    if returncode == MEMORY_ERROR_EXIT and "MemoryError" in stderr:
        return f"memory limit of {memory_limit_mb} MB exceeded (MemoryError)", False, True
    if returncode == -signal.SIGXCPU:
        return f"CPU time limit exceeded ({max(1, math.ceil(timeout))}s)", True, False
    if returncode == -signal.SIGKILL:  # not our timeout: the hard CPU limit or the kernel's OOM killer
        return "killed (SIGKILL: CPU hard limit or out of memory)", False, False
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}", False, False
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else f"exit code {returncode}"), False, False


def execute_code(code, timeout=5.0, memory_limit_mb=512, max_output_bytes=100_000, max_file_mb=16):
    """
    Run `code` (a Python program, as text) in a sandboxed child process; see the module docstring.
    timeout: wall-clock seconds (the CPU limit is the same, rounded up). memory_limit_mb: address-space
    limit (None or 0: none). max_output_bytes: how much of stdout/stderr comes back. max_file_mb: the largest
    file (stdout/stderr included) the child may write.
    """
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="nanochat_exec_"))
    try:
        program = os.path.join(workdir, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        memory_bytes = int(memory_limit_mb or 0) * 1024 * 1024
        cpu_seconds = max(1, math.ceil(timeout))
        args = [sys.executable, "-I", "-B", "-c", CHILD_SOURCE, workdir, program,
                str(memory_bytes), str(cpu_seconds), str(int(max_file_mb * 1024 * 1024))]
        env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        # Output goes to anonymous temp files (not pipes): nothing can block on a full pipe, and RLIMIT_FSIZE
        # bounds how much the child can write. start_new_session: the child leads a new process group.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(args, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                proc.wait()
            _kill_group(proc)  # leftovers (threads' children, if any guard was bypassed) die with the group
            stdout, stderr = _read_capped(out, max_output_bytes), _read_capped(err, max_output_bytes)
        if timed_out:
            return ExecutionResult(False, stdout, stderr, f"timed out after {timeout}s", timed_out=True)
        if proc.returncode == 0:
            return ExecutionResult(True, stdout, stderr)
        error, cpu_out, memory_out = _failure_reason(proc.returncode, stderr, timeout, memory_limit_mb)
        return ExecutionResult(False, stdout, stderr, error, timed_out=cpu_out, memory_exceeded=memory_out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
