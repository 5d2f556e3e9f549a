"""What every process of a run stands on: sockets, loops, processes, signals.

- ``transport``: ZeroMQ contexts and sockets, CurveZMQ keys and the ZAP gate;
- ``loop``: a hio Doist that sleeps in a poll until there is work;
- ``launch``: starting and stopping child processes; tick registers;
- ``signals``: one signal handling for every process (written down, acted on at
  checkpoints);
- ``early``: signals that came before a command's own handlers;
- ``watchdog``: a child's orphan rule and tick deadline, in a thread;
- ``output``: children's output, one whole line at a time, prefixed with who wrote it.
"""
