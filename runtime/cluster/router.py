"""Affinity routing for Ray Serve: a conversation goes to the replica that already holds its images' state.

Runs inside Ray Serve's router, in the server's own process (the deployment handle's owner). Each request
carries its route key (core/chat_task.py `ChatTask.route_key`: tenant + first picture, else first question);
the router remembers where each key last went. A request whose key is known goes back there unless that
replica's queue is longer than the shortest by more than `slack`: then, and for a new key, power of two
choices (Ray Serve's own rule: two replicas at random, the shorter queue). State per replica: nothing but
the keys sent to it, bounded by `capacity` in all (least recently used dropped first).
"""

from __future__ import annotations

import random
from collections import OrderedDict

from huatuo_local.runtime.cluster import registry
from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

DEFAULT_SLACK = 4  # queued requests a replica may have beyond the shortest queue and still keep its conversations
DEFAULT_CAPACITY = 100_000  # route keys remembered (≈ 100 bytes each)


class AffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, slack: int = DEFAULT_SLACK, capacity: int = DEFAULT_CAPACITY,
                         affinity: bool = True) -> None:
        self.slack, self.capacity, self.affinity = slack, capacity, affinity
        self.where: OrderedDict[str, ReplicaID] = OrderedDict()
        self.hits = self.misses = self.overflows = 0
        registry.ROUTERS.add(self)  # /health shows what it sees

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = _key(pending_request)
        if self.affinity and key is not None:
            held = self.where.get(key)
            home = next((r for r in candidate_replicas if r.replica_id == held), None)
            if home is not None:
                queues = {r.replica_id: self._queue(r) for r in candidate_replicas}
                if queues[home.replica_id] - min(queues.values()) <= self.slack:
                    self.hits += 1
                    others = [r for r in candidate_replicas if r is not home]
                    # The home first; should it refuse (full), the others as Ray Serve would pick them.
                    return [[home], *([self._two(others)] if others else [])]
                self.overflows += 1
            else:
                self.misses += 1
        return [self._two(candidate_replicas)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        key = _key(pending_request)
        if key is None:
            return
        self.where[key] = replica_id
        self.where.move_to_end(key)
        while len(self.where) > self.capacity:
            self.where.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for key in [k for k, r in self.where.items() if r == replica_id]:
            del self.where[key]

    def replicas(self) -> list[dict]:
        """Each replica as this router sees it: its own report (runtime/cluster/replica.py) and queue."""
        out = []
        for r in self.curr_replicas.values():
            stats = dict(r.routing_stats or {})
            stats.setdefault("id", r.replica_id.unique_id)
            stats["ongoing"] = self._replica_queue_len_cache.get(r.replica_id)
            stats["conversations"] = sum(1 for v in self.where.values() if v == r.replica_id)
            out.append(stats)
        return out

    def _queue(self, replica: RunningReplica) -> int:
        n = self._replica_queue_len_cache.get(replica.replica_id)
        return 0 if n is None else n

    @staticmethod
    def _two(candidates: list[RunningReplica]) -> list[RunningReplica]:
        """Power of two choices: two at random; Ray Serve then takes the one with the shorter queue."""
        return random.sample(candidates, min(2, len(candidates)))


def _key(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None:
        return None
    key = pending_request.kwargs.get("route")
    return key if isinstance(key, str) else None
