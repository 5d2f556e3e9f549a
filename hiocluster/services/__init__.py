"""Services: replicas of hio TCP/TLS/HTTP servers on one address, supervised.

The API for service authors is :mod:`hiocluster.service` (``Service``,
``TcpService``, ``WsgiService``); this package runs them.

- ``core``: the services' rules, sans-IO (:class:`ServiceCore`): restarts,
  backoff, spares, scaling, draining;
- ``supervisor``: the shell that carries them out, and ``serve``;
- ``replica``: one replica process;
- ``serving``: hio's servers with SO_REUSEPORT, reaping, guarded WSGI.
"""
