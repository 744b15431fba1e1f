"""The cluster walkthrough of docs/clusters.md, run exactly as written, so the document cannot drift from
what works.

Every ```bash block between the `cluster walkthrough` markers of docs/clusters.md runs in one bash script
(`set -e`) from the repository root: `ray start --head`, the demo inputs, `ray job submit` of generation and
of training, `ray stop`. The harness only keeps the head on loopback (Ray's single-machine mode, as in
test_cluster) and in a private temp dir, and waits after the first block until the head's job agent is up (as
a person does who reads "No available agent to submit job" and submits again); it changes no command.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine import schema

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
WALKTHROUGH_DOC = ROOT / "docs" / "clusters.md"
OUTPUTS = (ROOT / "outputs" / "aga-cluster", ROOT / "outputs" / "train-cluster")


# After `ray start`, the Jobs API's agent registers itself in the GCS a few seconds later (longer on a busy
# machine); `ray job submit` waits only 10 s for it.
WAIT_FOR_JOB_AGENT = """
python - <<'PY'
import time

import ray
from ray._private.ray_constants import KV_NAMESPACE_DASHBOARD
from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX
from ray.experimental.internal_kv import _internal_kv_list

ray.init(address="auto", log_to_driver=False)
deadline = time.time() + 180
while not _internal_kv_list(DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX, namespace=KV_NAMESPACE_DASHBOARD):
    assert time.time() < deadline, "the head's job agent did not start within 180 s"
    time.sleep(1)
PY
"""


def walkthrough() -> str:
    doc = WALKTHROUGH_DOC.read_text()
    section = re.search(
        r"<!-- cluster walkthrough: begin -->(.*)<!-- cluster walkthrough: end -->", doc, re.S
    ).group(1)
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) >= 4, "start, inputs, submit, stop"
    return "\n".join([blocks[0], WAIT_FOR_JOB_AGENT, *blocks[1:]])


@pytest.mark.timeout(900)
def test_cluster_walkthrough_runs_as_written():
    script = walkthrough()
    assert "ray job submit" in script and "jobs.train" in script and "ray stop" in script
    for port in (6379, 8265, 52365):  # the walkthrough head's GCS, dashboard and dashboard agent ports
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is taken: is another Ray running?"
    for path in OUTPUTS:
        shutil.rmtree(path, ignore_errors=True)
    temp_dir = tempfile.mkdtemp(prefix="sr-readme-", dir="/tmp")  # Unix socket paths stay short
    (Path(temp_dir) / "home").mkdir()
    env = {
        **os.environ,
        # A home of its own, as on a new machine: a token left in this one's ~/.ray once hid a walkthrough
        # that failed without it.
        "HOME": str(Path(temp_dir) / "home"),
        "RAY_TMPDIR": temp_dir,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single-machine mode: every address on 127.0.0.1
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    try:
        result = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=840,
        )
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
        run = json.loads((OUTPUTS[0] / "run.json").read_text())
        assert run["errors"]["total"] == 0 and run["rows"]["synthetic_written"] > 0
        rows = pq.read_table(OUTPUTS[0] / "data", columns=[schema.RECIPE])[schema.RECIPE].to_pylist()
        assert rows.count("aga") == run["rows"]["synthetic_written"]
        (metrics_file,) = OUTPUTS[1].glob("*/metrics.json")
        metrics = json.loads(metrics_file.read_text())
        assert metrics["config"]["mix"]["strategy"] == "concat", (
            "the walkthrough trains on the synthetic rows"
        )
    finally:
        # `make test` runs pytest without activating the environment: name its `ray` CLI by path.
        ray_cli = str(Path(sys.executable).parent / "ray")
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120, cwd=ROOT)
        shutil.rmtree(temp_dir, ignore_errors=True)
        for path in OUTPUTS:
            shutil.rmtree(path, ignore_errors=True)
