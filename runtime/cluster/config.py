"""How `serve --ray` spreads the model: the cluster, how many replicas, how requests find them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROUTINGS = ("affinity", "pow2")


@dataclass
class ClusterConfig:
    address: str  # HOST:PORT of a running cluster (`ray start --head`), or "local": a private one on this machine
    replicas: int = 1  # to start with (autoscaling: between min and max)
    min_replicas: int | None = None  # with max_replicas: scale on queue length between these
    max_replicas: int | None = None
    # "affinity": a conversation goes where its images' state is (runtime/cluster/router.py);
    # "pow2": Ray Serve's power of two choices alone (a baseline for bench/cluster.py).
    routing: str = "affinity"
    # The prefix cache every replica reads and writes: a folder all nodes see makes an image's state computed
    # on one replica usable by every other (ARCHITECTURE.md); default: each node's own store.
    cache_dir: Path | None = None
    # CPUs Ray reserves per replica; None: a whole node each (1 per node) on a cluster, and this machine's
    # cores shared out on a private one.
    cpus_per_replica: float | None = None

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def check(self) -> ClusterConfig:
        """Raise ValueError naming the flag at fault."""
        if not self.address:
            raise ValueError("--ray takes HOST:PORT of a running cluster or 'local'")
        if self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1 (got {self.replicas})")
        lo, hi = self.bounds()
        if lo < 0 or hi < 1 or lo > hi:
            raise ValueError(f"--min-replicas {lo} and --max-replicas {hi}: need 0 <= min <= max and max >= 1")
        if not lo <= self.replicas <= hi:
            raise ValueError(f"--replicas {self.replicas} must lie between --min-replicas {lo} and "
                             f"--max-replicas {hi}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"--routing must be one of {', '.join(ROUTINGS)} (got {self.routing!r})")
        return self

    def bounds(self) -> tuple[int, int]:
        lo = self.min_replicas if self.min_replicas is not None else min(1, self.replicas)
        hi = self.max_replicas if self.max_replicas is not None else max(self.replicas, lo)
        return lo, hi
