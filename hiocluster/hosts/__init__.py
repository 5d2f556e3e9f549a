"""Runs across hosts.

- ``agent``: ``hiocluster agent``, the daemon that starts workers on its host;
- ``remote``: the supervisor's side of a host's agent.
"""
