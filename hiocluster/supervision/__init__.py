"""SupervisorShell a lockstep run: the sans-IO rules and the shells that carry them out.

- ``runcore``: the supervisor's rules, sans-IO (:class:`RunCore`);
- ``books``: its books on each worker and the SETUP each one gets;
- ``windows``: how many ticks one GRANT covers;
- ``digests``: the run digest and the records it is built from;
- ``outcome``: how a run ends, and who is to blame;
- ``restarts``: which failures ``[run] restart = "checkpoint"`` survives, and how often;
- ``supervisor``: the root supervisor's shell (``hiocluster.run``);
- ``groupcore`` and ``group``: nested supervisors (``[groups]``), rules and shell;
- ``trace``: where a tick's time goes (``--trace``).
"""
