"""The replicas as a Ray Serve deployment: where each goes (placement), how many, how requests reach them."""

from __future__ import annotations

import os

from huatuo_local.runtime.cluster.config import ClusterConfig
from huatuo_local.runtime.core.config import ModelConfig
from huatuo_local.runtime.system import physical_cores

DEPLOYMENT = "replica"
HEALTH_CHECK_S = 2.0  # Ray Serve asks each replica this often whether its scheduler still runs
ROUTING_STATS_S = 1.0  # how often replicas report their queues and identity to routers (/health)


def placement(model: ModelConfig, cluster: ClusterConfig, private: bool, gpus_in_cluster: float
              ) -> tuple[ModelConfig, dict, int | None]:
    """The replicas' model options, Ray's resources for each, and the CPUs a private cluster declares.

    - GPUs in the cluster (and layers allowed on one): one GPU per replica, Ray picks it (CUDA_VISIBLE_DEVICES).
    - A private cluster on this machine: its physical cores shared out between the replicas (--threads each),
      so that two replicas never fight over one core.
    - A cluster of CPU machines: one replica per node using all of its cores (the placement `doctor` would
      choose for that machine); with --threads or --cpus-per-replica, as many per node as fit.
    """
    _, hi = cluster.bounds()
    options: dict = {}
    actor: dict = {}
    declared = None
    if gpus_in_cluster >= 1 and model.n_gpu_layers != 0:
        actor["num_gpus"] = 1
        actor["num_cpus"] = cluster.cpus_per_replica or 1
    elif private:
        cores = physical_cores()
        threads = model.threads or max(1, cores // hi)
        model = model.with_(threads=threads)
        actor["num_cpus"] = cluster.cpus_per_replica or threads
        declared = max(os.cpu_count() or 1, int(hi * actor["num_cpus"] + 0.999))
    elif model.threads or cluster.cpus_per_replica:
        actor["num_cpus"] = cluster.cpus_per_replica or model.threads
    else:
        actor["num_cpus"] = 1
        options["max_replicas_per_node"] = 1
    options["ray_actor_options"] = actor
    return model, options, declared


def deployment_options(model: ModelConfig, cluster: ClusterConfig, max_queue: int, grace_s: float) -> dict:
    from huatuo_local.runtime.cluster.router import AffinityRouter
    from ray.serve.config import RequestRouterConfig

    lo, hi = cluster.bounds()
    out: dict = {
        # Ray Serve sends a replica no more than this; beyond it requests wait in the server's router (FIFO).
        "max_ongoing_requests": model.parallel + max_queue,
        "health_check_period_s": HEALTH_CHECK_S,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": grace_s,
        "request_router_config": RequestRouterConfig(
            request_router_class=AffinityRouter,
            request_router_kwargs={"affinity": cluster.routing == "affinity"},
            request_routing_stats_period_s=ROUTING_STATS_S),
    }
    if cluster.autoscaling:
        # Scale on queue length: a replica busy with `parallel` answers is as busy as it should be.
        out["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": cluster.replicas,
                                     "target_ongoing_requests": model.parallel, "look_back_period_s": 10.0,
                                     "upscale_delay_s": 5.0,
                                     "downscale_delay_s": 120.0}
    else:
        out["num_replicas"] = cluster.replicas
    return out
