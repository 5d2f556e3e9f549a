"""``worker``, ``group`` and ``replica``: the processes that join a run. Supervisors,
agents and ``hiocluster run`` start them; a worker named by ``run --external`` is
started by hand."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys


def worker_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``worker`` and ``group``."""
    from hiocluster.runtime.launch import parent_from_env
    from hiocluster.runtime.transport import CREDENTIALS_ENV, Credentials
    from hiocluster.runtime.watchdog import parent_gone
    from hiocluster.worker.process import WorkerOptions, run_worker

    parent = parent_from_env()

    try:
        if args.credentials:
            with open(args.credentials, encoding="utf-8") as file:
                text = file.read()
        else:
            text = os.environ.get(CREDENTIALS_ENV, "")
        credentials = Credentials.from_json(text)
    except (OSError, ValueError) as exc:
        parser.error(f"{args.command}: no usable credentials ({exc}): pass --credentials "
                     f"FILE or set ${CREDENTIALS_ENV}")
    if args.command == "group":
        from hiocluster.supervision.group import GroupOptions, load_tree, run_group
        try:
            tree = load_tree(args.tree)
        except ValueError as exc:
            if parent_gone(parent):  # its supervisor, and the file, are gone already
                print(f"hiocluster group {args.name}: orphaned: its supervisor is gone",
                      file=sys.stderr)
                return 3
            parser.error(f"group: --tree: {exc}")
        if args.run_dir:  # its supervisor wrote the file for it alone
            with contextlib.suppress(OSError):
                os.unlink(args.tree)
        return run_group(GroupOptions(connect=args.connect, name=args.name, tree=tree,
                                      credentials=credentials, bind=args.bind,
                                      app_dir=args.app_dir, run_dir=args.run_dir,
                                      tick_file=args.tick_file, parent=parent,
                                      data=args.data))
    return run_worker(WorkerOptions(connect=args.connect, name=args.name,
                                    credentials=credentials, bind=args.bind,
                                    app_dir=args.app_dir, run_dir=args.run_dir,
                                    tick_file=args.tick_file, parent=parent,
                                    data=args.data))


def replica_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from hiocluster.services.replica import options_from, run_replica

    try:
        options = options_from(args.connect, args.name, args.app_dir)
    except ValueError as exc:
        parser.error(f"replica: {exc}")
    return run_replica(options)
