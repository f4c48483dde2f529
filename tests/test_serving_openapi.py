"""
schemathesis fuzzes the real server from its own OpenAPI schema: no 5xx, and every response (JSON body,
SSE event, status code, content type, headers) must match the schema.

positive_data_acceptance is left out on purpose: some rules cannot be written in JSON Schema (roles
alternating user/assistant, the prompt fitting the model's context, total characters), so a
schema-valid body can still get a well-formed 400.
"""

import os
import shutil
import subprocess
import sys

import pytest

from tests.server_utils import RunningServer, make_chat_checkpoint

pytestmark = pytest.mark.slow


def schemathesis_cli():
    beside_python = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    return beside_python if os.path.exists(beside_python) else shutil.which("schemathesis")


def test_schemathesis_finds_no_server_errors_or_schema_violations(tmp_path):
    cli = schemathesis_cli()
    if cli is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    make_chat_checkpoint(str(tmp_path))
    env = {"NANOCHAT_RATE_LIMIT_MAX_REQUESTS": "1000000"}  # fuzzing hits the routes far faster than any client
    with RunningServer(tmp_path, "--max-tokens", "16", env=env) as server:
        result = subprocess.run(
            [cli, "run", server.url + "/openapi.json", "--checks", "all", "--exclude-checks",
             "positive_data_acceptance", "--max-examples", "25", "--workers", "1", "--seed", "1",
             "--suppress-health-check", "all"],
            cwd=tmp_path, capture_output=True, text=True, timeout=400)
        log = server.log()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "No issues found" in output, output[-3000:]
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]
