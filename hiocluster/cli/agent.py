"""``agent`` and ``keygen``: a run across hosts. An agent starts workers on its host
for the supervisors it trusts; keygen makes the CurveZMQ key pairs both sides use."""

from __future__ import annotations

import argparse
import os
import sys

from hiocluster.cli.output import EXIT_FAILED, EXIT_OK


def agent_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from hiocluster.hosts.agent import AgentOptions, run_agent, stdin_keys

    given = None
    if args.keys == "-":
        if args.trust:
            parser.error("agent: with --keys -, the supervisor's key comes on stdin: "
                         "no --trust")
        try:
            given = stdin_keys(sys.stdin.readline(64 * 1024))
        except ValueError as exc:
            print(f"hiocluster agent {args.name}: {exc}", file=sys.stderr)
            return EXIT_FAILED
    elif not args.trust:
        parser.error("agent: --trust KEY is required (a supervisor's public key file)")
    return run_agent(AgentOptions(listen=args.listen, keys=args.keys, name=args.name,
                                  trust=tuple(args.trust),
                                  app_dir=os.path.abspath(args.app_dir or os.getcwd()),
                                  advertise=args.advertise, given=given))


def keygen_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from hiocluster.runtime.transport import write_key_pair

    directory = args.directory
    taken = [name for name in args.names for suffix in (".key", ".key_secret")
             if os.path.exists(os.path.join(directory, name + suffix))]
    if taken and args.skip_existing:
        args.names = [name for name in args.names if name not in taken]
    elif taken:
        parser.error(f"keygen: a key for {', '.join(sorted(set(taken)))} exists in "
                     f"{directory}; remove it first to make a new one")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        for name in args.names:
            public, secret = write_key_pair(directory, name)
            print(f"{name}: {public} (public), {secret} (secret)")
    except OSError as exc:
        print(f"hiocluster: keygen: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
