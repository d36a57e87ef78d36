"""A simulated two-node Ray cluster (ray.cluster_utils.Cluster, one CPU per node) running a
short pretraining with STRICT_SPREAD placement. Prints one line: RESULT <json>."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep every node and client on 127.0.0.1
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from cluster.driver import RunOptions, run_job  # noqa: E402
from jobs.spec import load_job  # noqa: E402
from pipelines.rundir import RunDir  # noqa: E402


def main(job_path: str, run_dir: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dashboard_port = s.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": True,
                                                             "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
        job = load_job(job_path, ["cluster.num_workers=2", "cluster.placement=STRICT_SPREAD", "cluster.cpus_per_worker=1",
                                  "stages.pretrain.steps=6", "stages.pretrain.optimizer.warmup_steps=2", "stages.pretrain.log_every=1",
                                  "data.synthetic.mentions_per_fact=6",
                                  "data.num_proc=1", "stages.sft=null", "stages.eval=null"])
        summary = run_job(job, RunDir(run_dir), RunOptions(show=lambda line: print(line, flush=True)))
        workers = [json.loads(p.read_text()) for p in sorted((Path(run_dir) / "pretrain" / "workers").glob("rank_*.json"))]
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print("RESULT " + json.dumps({"workers": workers, "nodes": nodes, "step": summary["stages"]["pretrain"]["step"]}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
