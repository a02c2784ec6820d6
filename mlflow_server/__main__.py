"""``python -m mlflow_server [serve|migrate|check|grant]`` — see mlflow_server/README.md."""

from __future__ import annotations

import argparse
import logging
import sys

from mlflow_server import accounts, database, server
from mlflow_server.settings import SettingsError, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlflow_server", description=__doc__.split("—")[0].strip(),
                                     epilog="Every setting comes from the environment: see mlflow_server/README.md.")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="prepare the database, start the server, provision the trainer account (default)")
    migrate = sub.add_parser("migrate", help="only the database steps: auth database, MLflow schema, tag index")
    migrate.add_argument("--upgrade", action="store_true",
                         help="also run MLflow's schema migrations (`mlflow db upgrade`; snapshot the database first)")
    sub.add_parser("check", help="validate the settings and print them (secrets omitted)")
    grant = sub.add_parser("grant", help="as admin, give an account write access (EDIT) to one sweep's experiment")
    grant.add_argument("--experiment", required=True, help="the experiment's name (the sweep's name)")
    grant.add_argument("--user", required=True, help="the account, e.g. the trainer (HPSWEEP_TRAINER_USERNAME)")
    grant.add_argument("--permission", default=accounts.TRIAL_PERMISSION, choices=("READ", "EDIT"),
                       help="READ to let an account look, EDIT to write trial runs (default)")
    grant.add_argument("--url", help="the server (default: this host's, from MLFLOW_HOST/MLFLOW_PORT)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings = load()
    except SettingsError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(settings)
        return 0
    if args.command == "migrate":
        created = database.prepare(settings, upgrade=args.upgrade)
        print(f"database ready; created: {', '.join(created) or 'nothing (already there)'}")
        return 0
    if args.command == "grant":
        try:
            exp_id = accounts.grant_experiment(args.url or settings.local_url,
                                               (settings.admin_username, settings.admin_password),
                                               args.experiment, args.user, args.permission)
        except LookupError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{args.user}: {args.permission} on experiment {args.experiment} ({exp_id})")
        return 0
    return server.serve(settings)


if __name__ == "__main__":
    sys.exit(main())
