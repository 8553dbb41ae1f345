"""``tangopipe keys`` and ``tangopipe token``: the secrets a pipeline's ``security`` section names.

    tangopipe keys FOLDER                 the pipeline's CURVE key pair (security.curve_keys: FOLDER)
    tangopipe keys FOLDER --client NAME   a client key pair, authorised to connect (e.g. a SinkClient)
    tangopipe token FILE                  a random query token (security.query_token_file: FILE)

Secret files are written with mode 600 and never printed.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.security import SecurityError, create_keys, write_token_file

from .database import DeploymentError


def cmd_keys(args: argparse.Namespace) -> int:
    try:
        written = create_keys(args.folder, client=args.client, force=args.force)
    except (SecurityError, OSError) as exc:
        raise DeploymentError(str(exc)) from None
    for path in written:
        print(path)
    if not written:
        print(f"tangopipe: keys in {args.folder} kept (--force makes new ones)", file=sys.stderr)
    elif args.client:
        print(f"tangopipe: give {args.folder}/pipeline.key and {args.folder}/clients/{args.client}.key_secret "
              f"to the client: SinkClient(endpoint, curve_keys=FOLDER, curve_client={args.client!r})",
              file=sys.stderr)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    try:
        made = write_token_file(args.file, force=args.force)
    except OSError as exc:
        raise DeploymentError(f"cannot write the token file {args.file}: {exc}") from None
    print(f"tangopipe: {'made' if made else 'kept (--force makes a new one)'} the query token file {args.file}",
          file=sys.stderr)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "keys",
        help="make a pipeline's CURVE keys (security.curve_keys), or a client's",
        description="Make FOLDER/pipeline.key and pipeline.key_secret (mode 600) and FOLDER/authorized/ "
        "(public keys of further clients); with --client NAME a client pair in FOLDER/clients/, "
        "authorised at once. Every host of the pipeline needs the folder.",
    )
    p.add_argument("folder", help="key folder, e.g. config/keys")
    p.add_argument("--client", help="make and authorise a client key pair of this name")
    p.add_argument("--force", action="store_true", help="replace existing keys (connected clients are cut off)")
    p.set_defaults(func=cmd_keys)
    p = subparsers.add_parser(
        "token",
        help="make a query token file (security.query_token_file)",
        description="Write a random token to FILE with mode 600 (tangopipe up does it too when the file is missing).",
    )
    p.add_argument("file", help="token file, e.g. config/demo.token")
    p.add_argument("--force", action="store_true", help="replace an existing token")
    p.set_defaults(func=cmd_token)
