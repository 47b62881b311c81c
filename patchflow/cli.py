"""The `patchflow` command: demo, run, status, promote, rollback, quarantine, register, serve.

Errors a person can fix (a missing config, an unknown model, a bad argument) print one clear
line and exit non-zero; they never end in a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from patchflow.settings import Settings, apply_env_defaults

EXIT_GATE_FAILED = 3
EXIT_LOCKED = 4


def _parser(settings: Settings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="patchflow", description="Keep a deployed transformer correct, night after night.")
    p.add_argument("--config-dir", default=str(settings.config_dir),
                   help=f"where <model>.yaml configs live (default: {settings.config_dir})")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="prepare the fact-check model, log its real mistakes, run one night")
    d.add_argument("--errors", type=int, default=60, help="how many real mistakes to log (default 60)")

    r = sub.add_parser("run", help="run the nightly flow for MODEL now")
    r.add_argument("model")

    s = sub.add_parser("status", help="versions, aliases and last night's metrics of MODEL")
    s.add_argument("model")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    pr = sub.add_parser("promote", help="make a version (default: the challenger) the champion")
    pr.add_argument("model")
    pr.add_argument("--version", default=None)
    pr.add_argument("--reason", required=True)

    rb = sub.add_parser("rollback", help="put the previous champion (or --to VERSION) back")
    rb.add_argument("model")
    rb.add_argument("--to", dest="to_version", default=None)
    rb.add_argument("--reason", required=True)

    q = sub.add_parser("quarantine", help="list or export the rows validation rejected")
    q.add_argument("model")
    q.add_argument("--run", dest="run_id", default=None, help="only rows of this flow run")
    q.add_argument("--export", type=Path, default=None, help="write the rows to a .jsonl or .csv file")
    q.add_argument("--limit", type=int, default=20, help="rows to list (default 20)")

    b = sub.add_parser("register-base", help="register a Hugging Face model folder as version 1 @champion")
    b.add_argument("model")
    b.add_argument("folder", type=Path)

    sv = sub.add_parser("serve", help="serve the nightly deployments of every configured model (one machine)")
    sv.add_argument("models", nargs="*", help="default: every deployments/*.yaml")
    return p


def main(argv: list[str] | None = None) -> int:
    apply_env_defaults()  # before MLflow, Prefect or transformers are imported
    args = _parser(Settings()).parse_args(argv)
    from patcher import PatchError, SetupError
    from tasks.config import ConfigError
    from tasks.ingest import SourceError
    from tasks.night import NightLocked
    from tasks.registry import RegistryError

    try:
        return _dispatch(args)
    except NightLocked as exc:
        print(f"patchflow: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except (ConfigError, RegistryError, SourceError, PatchError, SetupError, FileNotFoundError) as exc:
        print(f"patchflow: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("patchflow: interrupted (a night resumes from its last checkpoint)", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    config_dir = Path(args.config_dir)
    if args.command == "demo":
        from patchflow.demo import run_demo

        return run_demo(config_dir, n_errors=args.errors)
    from tasks.config import load_config

    if args.command == "serve":
        return _serve(config_dir, args.models)
    cfg = load_config(args.model, config_dir)
    if args.command == "run":
        from flows.nightly import nightly

        report = nightly(model=args.model, config_dir=str(config_dir))
        print(json.dumps(report.model_dump(), indent=2, default=str))
        return EXIT_GATE_FAILED if report.status == "gate-failed" else 0
    from tasks.registry import Registry

    registry = Registry(cfg.resolved_tracking_uri)
    if args.command == "status":
        status = registry.status(cfg.name)
        if args.json:
            print(json.dumps(status, indent=2, default=str))
        else:
            _print_status(cfg.name, status)
        return 0
    if args.command == "promote":
        from flows.registry import promote

        print(f"{cfg.name}: version {promote(args.model, args.reason, args.version, str(config_dir))} is champion")
        return 0
    if args.command == "rollback":
        from flows.registry import rollback

        print(f"{cfg.name}: version {rollback(args.model, args.reason, args.to_version, str(config_dir))} is champion again")
        return 0
    if args.command == "quarantine":
        from tasks.quarantine import QuarantineStore

        store = QuarantineStore(cfg.resolved_state_url)
        if args.export:
            n = store.export(args.export, model=cfg.name, run_id=args.run_id)
            print(f"exported {n} quarantined rows to {args.export}")
            return 0
        rows = store.list(cfg.name, run_id=args.run_id)
        print(f"{len(rows)} quarantined rows for {cfg.name}" + (f" (showing the last {args.limit})" if len(rows) > args.limit else ""))
        for row in rows[-args.limit:]:
            print(f"- {row.origin} id={row.record_id}: {'; '.join(row.reasons)}")
        return 0
    if args.command == "register-base":
        info = registry.register_base(cfg.name, args.folder, cfg.task)
        print(f"{cfg.name}: version {info.version} aliases {list(info.aliases)}")
        return 0
    raise AssertionError(args.command)


def _print_status(name: str, status: dict) -> None:
    print(f"model {name}")
    print(f"  aliases: {status.get('aliases')}")
    for v in status.get("versions", []):
        tags = v.get("tags", {})
        print(f"  v{v['version']:>3} {v.get('kind', ''):5} edits={v.get('patch_count', 0):>5} "
              f"parent={tags.get('patchflow.parent_version', '-'):>3} {','.join(v.get('aliases', [])):20} {v.get('created', '')}")
    last = status.get("last_night") or {}
    if last:
        print(f"  last night (v{last['version']}, flow run {last.get('flow_run_id')}):")
        for k, v in sorted((last.get("metrics") or {}).items()):
            print(f"    {k:28} {v:.4g}")


def _serve(config_dir: Path, models: list[str]) -> int:
    """One process that runs each configured model's nightly schedule (no work pool needed)."""
    from prefect import serve
    from prefect.schedules import Cron

    from flows.nightly import nightly
    from tasks.config import load_config

    names = models or sorted(p.stem for p in config_dir.glob("*.yaml"))
    deployments = []
    for name in names:
        cfg = load_config(name, config_dir)
        deployments.append(nightly.to_deployment(
            name=f"{cfg.name}-nightly", parameters={"model": cfg.name, "config_dir": str(config_dir), "progress": False},
            schedules=[Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone)], concurrency_limit=1))
    print(f"serving {', '.join(names)}; Ctrl-C stops")
    serve(*deployments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
