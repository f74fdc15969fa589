"""Many machines behind one endpoint, on Ray: replicas of today's engine + scheduler placed by Ray Serve,
requests routed to the replica that already holds their images' state.

Imports core and below; front-ends (serve, eval) import it. Ray is an optional extra
(`pip install 'huatuo-local[distributed]'`), imported only when a command asks for a cluster.
"""
