"""Schemathesis fuzzes the running server from its own /openapi.json, with a valid key.

Every check but one: no 500, every status and header documented, every body in its documented schema and
content type, invalid data refused, undocumented methods refused, requests without the key refused.
Left out is `positive_data_acceptance` (every schema-valid request accepted): two rules cannot be said in
the schema in a way the generator honours (exactly one of `image` and `images`; `bucket_width` needs
`start_time`), and the server rightly refuses requests that break them with a 422 and a 400.
"""

import subprocess
import sys
from pathlib import Path

from conftest import log_rows, make_key

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def test_schemathesis_finds_no_crash_and_no_undocumented_answer(start_server, tmp_path):
    running = start_server()
    key = make_key(running.database_url, rate_limit=1_000_000_000)
    run = subprocess.run([str(SCHEMATHESIS), "run", f"{running.url}/openapi.json", "-H", f"Authorization: Bearer {key}",
                          "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--max-examples", "50",
                          "--workers", "2", "--request-timeout", "60"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert not log_rows(running.database_url, "status_code >= 500")
    assert "Traceback" not in running.log()
