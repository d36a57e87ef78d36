"""A simulated two-node Ray cluster (ray.cluster_utils.Cluster, one CPU per node, loopback
only) preparing a job's data with two Ray Data workers. Prints one line: RESULT <json> with the
cluster's node ids; the manifest records which nodes ran the blocks."""

import json
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep every node and client on 127.0.0.1
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from cluster.launch import run_blocks_on_ray  # noqa: E402
from jobs.plan import data_plan  # noqa: E402
from jobs.spec import load_job  # noqa: E402
from pipelines.data.prepare import prepare_data  # noqa: E402
from pipelines.rundir import RunDir  # noqa: E402


def main(job_path: str, run_dir: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", logging_level="WARNING")
        job = load_job(job_path, ["data.num_proc=2"])
        prepare_data(data_plan(job), RunDir(run_dir), run_blocks=run_blocks_on_ray, show=lambda line: print(line, flush=True))
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print("RESULT " + json.dumps({"nodes": nodes}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
