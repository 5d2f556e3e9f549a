"""A run's control endpoint from outside: ``hiocluster status|scale|restart|stop``.

- ``client``: finding a run's endpoint, asking it, showing the answer.
"""
