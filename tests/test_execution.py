"""
The sandbox: results, limits (time, memory, output), the guards (process control, network, file
deletion/writes outside the temporary directory), concurrency, and HumanEval's reference solutions.
"""

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanochat.execution import ExecutionResult, execute_code


def test_success_captures_stdout_and_stderr():
    result = execute_code("import sys\nprint('hello', 6 * 7)\nprint('warn', file=sys.stderr)")
    assert isinstance(result, ExecutionResult)
    assert result.success and result.error is None and not result.timed_out and not result.memory_exceeded
    assert result.stdout == "hello 42\n" and result.stderr == "warn\n"


def test_exception_is_a_failure_with_the_error_line():
    result = execute_code("print('before')\n1 / 0")
    assert not result.success and result.stdout == "before\n"
    assert result.error == "ZeroDivisionError: division by zero" and "Traceback" in result.stderr
    assert not result.timed_out and not result.memory_exceeded


def test_a_run_succeeds_only_by_reaching_its_end():
    # a HumanEval completion that exits before the tests run must not pass: exit(), quit(), sys.exit(0)
    for code in ("exit()", "quit()", "import sys; sys.exit(0)", "import sys; sys.exit(3)", "raise SystemExit"):
        result = execute_code(f"print('before')\n{code}\nassert False")
        assert not result.success and result.stdout == "before\n", code
        assert result.error.startswith("SystemExit: the program exited"), result.error
    result = execute_code("import os\nos._exit(0)")
    assert not result.success and "os._exit" in result.error
    assert not execute_code("def f(:\n    pass").success  # syntax error


@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_timeout_kills_busy_and_sleeping_code(code):
    start = time.time()
    result = execute_code(code, timeout=1.0)
    elapsed = time.time() - start
    # a busy loop may reach the CPU-seconds limit before the wall-clock timer fires (on a loaded machine)
    assert not result.success and result.timed_out
    assert "timed out" in result.error or "CPU time limit exceeded" in result.error
    assert elapsed < 4.0  # killed at ~1s (plus start-up), not after the sleep


def test_memory_limit():
    result = execute_code("x = bytearray(2 * 1024 ** 3)\nprint('allocated')", memory_limit_mb=512)
    assert not result.success and result.memory_exceeded and "memory" in result.error
    assert "allocated" not in result.stdout
    assert execute_code("x = bytearray(50 * 1024 ** 2)\nprint(len(x))", memory_limit_mb=512).success


def test_output_is_capped():
    result = execute_code("print('x' * 500_000)", max_output_bytes=1000)
    assert result.success and len(result.stdout) < 1100 and result.stdout.endswith("[output truncated]")


@pytest.mark.parametrize("code, message", [
    ("import os\nos.system('echo hi')", "os.system"),
    ("import subprocess\nsubprocess.run(['echo', 'hi'])", "subprocess"),
    ("import os\nos.kill(os.getppid(), 9)", "os.kill"),
    ("import os\nos.fork()", "os.fork"),
    ("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 80))", "network"),
    ("import socket\nsocket.create_connection(('example.com', 80), timeout=1)", "network"),
    ("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)", "network"),
])
def test_forbidden_operations(code, message):
    result = execute_code(code)
    assert not result.success and message in result.error, result.error


def test_files_outside_the_sandbox_are_protected(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    attacks = [
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.unlink({str(victim)!r})",
        f"import pathlib\npathlib.Path({str(victim)!r}).unlink()",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
        f"open({str(victim)!r}, 'w').write('overwritten')",
        f"import pathlib\npathlib.Path({str(victim)!r}).write_text('overwritten')",
        f"import shutil\nshutil.rmtree({str(folder)!r})",
        f"import os\nos.rmdir({str(folder)!r})",
        f"import os\nos.chdir('..')\nos.remove({str(victim)!r})",
    ]
    for code in attacks:
        result = execute_code(code)
        assert not result.success and "PermissionError" in result.error, (code, result.error)
    assert victim.read_text() == "keep me" and folder.is_dir()
    assert execute_code(f"print(open({str(victim)!r}).read())").stdout == "keep me\n"  # reading is allowed


def test_scratch_files_inside_the_sandbox_work_and_are_removed():
    code = (
        "import os, tempfile\n"
        "open('a.txt', 'w').write('x')\n"
        "os.rename('a.txt', 'b.txt')\n"
        "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'y')\n"
        "os.mkdir('d')\nos.rmdir('d')\nos.remove('b.txt')\n"
        "print(os.getcwd())\n"
    )
    result = execute_code(code)
    assert result.success, result.stderr
    workdir = result.stdout.strip()
    assert os.path.basename(workdir).startswith("nanochat_exec_") and not os.path.exists(workdir)


def test_concurrent_calls_do_not_interfere():
    codes = [f"import time\ntime.sleep(0.2)\nprint({i} * {i})" for i in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(execute_code, codes))
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(6)]
    assert all(r.success for r in results)


@pytest.mark.skipif(not os.environ.get("NANOCHAT_DATA_DIR"), reason="NANOCHAT_DATA_DIR (real mirror) not set")
def test_humaneval_canonical_solutions_pass():
    from tasks.humaneval import HumanEval, build_program
    task = HumanEval()
    for index in (0, 10, 32, 53, 100, 163):
        conv = task[index]
        assert task.evaluate(conv, conv["messages"][1]["content"]) == 1, conv["task_id"]
        # and a wrong answer fails
        wrong = f"def {conv['entry_point']}(*args, **kwargs):\n    return None\n"
        assert not execute_code(build_program(conv, wrong)).success
