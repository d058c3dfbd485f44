"""Deployment at a site: `medtune certs server|node` and `medtune site run|check|review`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medtune.errors import ConfigError
from medtune.files import check_writable


def add_site_commands(commands: Any) -> None:
    certs = commands.add_parser(
        "certs", help="deployment: TLS certificates and SuperNode keys"
    ).add_subparsers(dest="certs_command", required=True)
    server_certs = certs.add_parser(
        "server", help="consortium CA (kept if present) and a SuperLink TLS certificate"
    )
    server_certs.add_argument(
        "--host", action="append", required=True, help="SuperLink DNS name or IP (repeatable)"
    )
    server_certs.add_argument("--out", type=Path, default=Path("certificates"))
    server_certs.add_argument(
        "--rotate", action="store_true", help="replace an existing SuperLink key and certificate"
    )
    node_keys = certs.add_parser(
        "node", help="a hospital's SuperNode authentication key pair (EC P-384, OpenSSH)"
    )
    node_keys.add_argument(
        "--hospital", required=True, help="the hospital's name; names the key files"
    )
    node_keys.add_argument("--out", type=Path, default=Path("keys"))

    site = commands.add_parser(
        "site", help="deployment: run a hospital's site from its site file"
    ).add_subparsers(dest="site_command", required=True)
    site_run = site.add_parser(
        "run", help="start this hospital's SuperNode; it runs only the code the site approved"
    )
    site_run.add_argument(
        "site_file", type=Path, help="the site file (TOML; see docs/deployment.md)"
    )
    site_check = site.add_parser(
        "check", help="check a site file and print the SuperNode command it gives"
    )
    site_check.add_argument("site_file", type=Path)
    review = site.add_parser(
        "review", help="a FAB's hash and how its Python code differs from the installed MedTune"
    )
    review.add_argument(
        "fab", type=Path, help="a .fab file (`flwr build`, or one kept under refused-fabs/)"
    )

    server_certs.set_defaults(handler=_cmd_server_certs, command_name="certs server")
    node_keys.set_defaults(handler=_cmd_node_keys, command_name="certs node")
    site_run.set_defaults(handler=_cmd_site_run, command_name="site run")
    site_check.set_defaults(handler=_cmd_site_check, command_name="site check")
    review.set_defaults(handler=_cmd_site_review, command_name="site review")


def _cmd_server_certs(args: argparse.Namespace) -> None:
    from medtune.certs import make_server_certificates

    check_writable(args.out, folder=True)
    files = make_server_certificates(args.out, args.host, rotate=args.rotate)
    print(f"CA certificate (give to every site and `flwr` user): {files.ca_cert}")
    print(f"CA key (keep offline at the coordinator): {files.ca_key}")
    print(f"SuperLink certificate and key: {files.server_cert}, {files.server_key}")


def _cmd_node_keys(args: argparse.Namespace) -> None:
    from medtune.certs import make_node_keys

    check_writable(args.out, folder=True)
    keys = make_node_keys(args.out, args.hospital)
    print(f"private key (stays at the site, --auth-supernode-private-key): {keys.private_key}")
    print(f"public key (send to the coordinator for `flwr supernode register`): {keys.public_key}")


def _cmd_site_run(args: argparse.Namespace) -> int:
    from client.site_runner import run_site
    from medtune.site_file import read_site_file

    return run_site(read_site_file(args.site_file))


def _cmd_site_check(args: argparse.Namespace) -> None:
    import shlex

    from client.site_runner import supernode_command
    from medtune.site_file import read_site_file

    site = read_site_file(args.site_file)
    print(
        f"{args.site_file}: hospital {site.hospital}, max-epsilon "
        f"{site.node_config['max-epsilon']}, max-delta {site.terms.max_delta:g}, "
        f"share-evaluation-counts {str(site.terms.share_evaluation_counts).lower()}, "
        f"{len(site.approved_fabs)} approved FAB(s)"
    )
    print(
        shlex.join(
            supernode_command(site, site.ledger_path.parent / f".{site.hospital}.superexec-secret")
        )
    )


def _cmd_site_review(args: argparse.Namespace) -> int:
    from medtune.code_approval import InstalledCode, review

    try:
        fab = args.fab.read_bytes()
    except OSError as error:
        raise ConfigError(f"{args.fab}: cannot read the FAB ({error.strerror or error})") from None
    result = review(fab, InstalledCode.read(), source=str(args.fab))
    print(result.diff, end="")
    print(f"sha256 {result.fab_hash}")
    print(result.summary())
    if result.same_as_installed:
        return 0
    print(
        "to approve it, add its sha256 to the site file's approved-fabs (it then runs as its own "
        "code)"
    )
    return 1  # like diff(1): the code differs
