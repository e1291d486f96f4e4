"""Command line → Settings → election; exit statuses of SPEC §5.

0 clean stop, 2 usage error, 78 (EX_CONFIG) configuration error. A user's
mistake is one line naming the file or flag, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
from typing import Optional, Sequence

from . import __version__, signals
from .config import ConfigError, Options, Settings, build_settings, format_duration, parse_duration
from .systemd import MESSAGE_CONFIG_ERROR, ElectionContext, Notifier, logging_to_journal, setup_logging

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 78
#: Set by the manage-vip drop-in: the same as --manage-vip, and it survives reloads
#: (which take their options from VIP_ELECTOR_OPTS alone).
MANAGE_VIP_VAR = "VIP_ELECTOR_MANAGE_VIP"
COMMANDS = ("list", "switchover")

log = logging.getLogger("vip_elector")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage too)
        raise UsageError(message)


def _duration(flag: str):
    def parse(text: str) -> float:
        try:
            return parse_duration(text)
        except ValueError:
            raise ConfigError(f"{flag} {text!r} is not a duration: write e.g. 10s, 1m30s or 500ms.") from None
    return parse


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = _Parser(prog="vip-elector",
                usage="vip-elector [list [--json] | switchover [--to NAME] [--timeout DURATION]] "
                      "--vip-manager-config PATH [OPTIONS]",
                description="Consul leader election for vip-manager: the node holding the lock "
                            "writes its name to vip-manager's trigger-key. With a command, it "
                            "does the operator's work instead of running: 'list' shows the key's "
                            "holder and every candidate, 'switchover' moves leadership to another "
                            "candidate without the key ever being free. Without "
                            "--vip-manager-config, the commands take the service's options and "
                            "environment from /etc/default/vip-elector (as root, or as a member "
                            "of the vip-elector group).")
    p.add_argument("command", nargs="?", choices=COMMANDS, metavar="list|switchover",
                   help="list: the holder and the candidates; switchover: move leadership")
    p.add_argument("--vip-manager-config", metavar="PATH",
                   help="vip-manager's configuration: YAML, or the VIP_*=... environment file (required)")
    p.add_argument("--check-id", metavar="ID", action="append",
                   help="Consul check the session is bound to, beside serfHealth; give it once "
                        "per check to bind several")
    p.add_argument("--priority", metavar="N", type=int, default=100,
                   help="0-255 (default 100): a free key goes to the highest priority present")
    p.add_argument("--preempt-delay", metavar="DURATION",
                   help="take leadership from a lower priority once this node's checks have "
                        "passed this long without a break (default: never preempt)")
    p.add_argument("--ttl", metavar="DURATION", default="10s", help="session TTL, 10s..24h (default 10s)")
    p.add_argument("--lock-delay", metavar="DURATION", default="1s", help="session lock-delay (default 1s)")
    p.add_argument("--addr", metavar="ADDR", help="Consul address, host:port or http(s)://host:port")
    p.add_argument("--token", metavar="TOKEN", help="Consul ACL token (visible in ps: prefer --token-file "
                                                    "or CONSUL_HTTP_TOKEN)")
    p.add_argument("--token-file", metavar="PATH", help="read the Consul ACL token from this file")
    p.add_argument("--hostname", metavar="NAME", help="the value written to the key (default: trigger-value, "
                                                      "else the short hostname)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="keep the session's ID here so a restart or reload resumes it "
                        "(default: $RUNTIME_DIRECTORY, else none)")
    p.add_argument("--hook", metavar="PATH",
                   help="run PATH leader|standby KEY VALUE whenever this node's state changes")
    p.add_argument("--hook-timeout", metavar="DURATION", default="10s",
                   help="kill a hook still running after this long (default 10s)")
    p.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics, e.g. 127.0.0.1:9101 "
                        "or [::1]:9101 (default: none)")
    p.add_argument("--reload-pid", metavar="PID", type=int,
                   help="what the unit's ExecReload= runs: hand the unit's current options and "
                        "environment to the daemon PID and make it reload")
    p.add_argument("--manage-vip", action="store_true",
                   help="put vip-manager's ip/netmask on its interface exactly while this node "
                        "leads (needs CAP_NET_ADMIN and CAP_NET_RAW: the manage-vip drop-in)")
    p.add_argument("--drop-vip", action="store_true",
                   help="what the manage-vip drop-in's ExecStopPost= and OnFailure= run: remove "
                        "the VIP unless systemd is about to restart the daemon")
    p.add_argument("--check", action="store_true",
                   help="check configuration and Consul access, print a report, take no leadership")
    p.add_argument("--check-service", nargs="?", const="", metavar="INSTANCE",
                   help="as root: run --check exactly as the service would (its user, "
                        "/etc/default/vip-elector[-INSTANCE], its VIP_ELECTOR_OPTS)")
    p.add_argument("--service-condition", nargs="?", const="", metavar="INSTANCE",
                   help="the unit's ExecCondition: exit 1 with the reason while VIP_ELECTOR_OPTS "
                        "or the vip-manager configuration is not set up")
    p.add_argument("--json", action="store_true", help="list: print one JSON object")
    p.add_argument("--to", metavar="NAME", help="switchover: the candidate to move leadership to "
                                                "(default: the other candidate of highest priority)")
    p.add_argument("--timeout", metavar="DURATION", default="10s",
                   help="switchover: how long to wait for NAME to take over (default 10s)")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    args = p.parse_args(argv)
    if args.command != "list" and args.json:
        raise UsageError("--json goes with the list command: vip-elector list --json")
    if args.command != "switchover" and args.to is not None:
        raise UsageError("--to goes with the switchover command: vip-elector switchover --to NAME")
    if not args.version and args.check_service is None and args.reload_pid is None \
            and not args.vip_manager_config and not args.command:
        raise UsageError("the --vip-manager-config PATH option is required")
    return args


def options_from(args: argparse.Namespace) -> Options:
    check_ids = list(args.check_id or [])
    return Options(
        vip_manager_config=args.vip_manager_config,
        check_id=check_ids[0] if check_ids else None,
        more_check_ids=tuple(check_ids[1:]),
        priority=args.priority,
        preempt_delay=_duration("--preempt-delay")(args.preempt_delay) if args.preempt_delay else None,
        ttl=_duration("--ttl")(args.ttl),
        lock_delay=_duration("--lock-delay")(args.lock_delay),
        addr=args.addr, token=args.token, token_file=args.token_file, hostname=args.hostname,
        state_dir=args.state_dir, hook=args.hook,
        hook_timeout=_duration("--hook-timeout")(args.hook_timeout),
        manage_vip=bool(getattr(args, "manage_vip", False)),
    )


def _config_error(error: ConfigError, notifier: Optional[Notifier] = None) -> int:
    """One line: to the journal with its MESSAGE_ID under systemd, else plainly to stderr."""
    if notifier is not None:
        notifier.final_status(f"stopped: configuration error: {error}")
    if logging_to_journal():
        log.error("configuration error: %s", error, extra={"MESSAGE_ID": MESSAGE_CONFIG_ERROR})
    else:
        print(f"vip-elector: configuration error: {error}", file=sys.stderr)
    return EXIT_CONFIG


def _check_config_error(error: ConfigError) -> int:
    """--check reports a configuration error like any other problem: a FAIL line, exit 1.

    As check.py's report prints it, without importing check.py (and so the Consul
    library): a missing library is one of the errors reported here."""
    print(f"FAIL  configuration: {error}")
    print("1 problem(s) found")
    return EXIT_FAILURE


def _version() -> str:
    """Not through .consul: --version must work where no Consul library is installed."""
    from .library import installed
    return f"vip-elector {__version__} ({installed()}, Python {sys.version.split()[0]})"


def _log_start(settings: Settings, reexec: bool = False) -> None:
    log.info("vip-elector %s %s: key %s, value %s, Consul %s, checks %s, ttl %s, lock-delay %s, "
             "token from %s, state in %s, hook %s", __version__,
             "reloaded" if reexec else "starting", settings.trigger_key, settings.value,
             settings.address, "+".join(settings.checks), format_duration(settings.ttl),
             format_duration(settings.lock_delay), settings.token_source,
             settings.state_dir or "nowhere (no --state-dir)", settings.hook or "none")
    for warning in settings.warnings:
        log.warning("%s", warning)


def _settings(args: argparse.Namespace, env=os.environ) -> Settings:
    """Everything the daemon will run with, validated (at start and on every reload)."""
    opts = options_from(args)
    if env.get(MANAGE_VIP_VAR, "").strip().lower() in ("1", "yes", "true", "on"):
        opts = dataclasses.replace(opts, manage_vip=True)  # what the manage-vip drop-in sets
    settings = build_settings(opts, env)
    if settings.hook:
        from .hooks import validate_hook
        settings = dataclasses.replace(settings, hook=validate_hook(settings.hook))
    if args.metrics_address is not None:
        from .metrics import parse_metrics_address
        settings = dataclasses.replace(settings,
                                       metrics_address=parse_metrics_address(args.metrics_address))
    return settings


def main(argv: Optional[Sequence[str]] = None) -> int:
    context = ElectionContext()
    argv = list(sys.argv[1:] if argv is None else argv)
    from . import service
    condition = service.split_condition_argv(argv)
    if condition is not None:  # before parsing: the options are the daemon's, checked by it
        return service.condition_main(*condition)
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"vip-elector: {e} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return int(e.code or 0)
    if args.version:
        print(_version())
        return EXIT_OK
    if args.reload_pid is not None:
        from .reexec import request_reload
        return request_reload(args.reload_pid)
    if args.check_service is not None:
        return service.check_service_main(args.check_service or None)
    if args.drop_vip:
        return drop_vip_main(args.vip_manager_config, os.environ)
    if args.command:
        return _command_main(args)
    daemon = not args.check
    if daemon:
        # From here on no SIGTERM, SIGINT or SIGHUP is lost or fatal: they wait,
        # blocked, until the election's relay takes them (see signals.py).
        signals.block()
    setup_logging(context, level=logging.DEBUG if args.verbose else logging.INFO)
    notifier = Notifier() if daemon else None
    try:
        settings = _settings(args)
    except ConfigError as e:
        return _check_config_error(e) if args.check else _config_error(e, notifier)
    context.key, context.value = settings.trigger_key, settings.value
    if settings.token:
        context.secrets.append(settings.token)

    try:  # after validation: a config error needs no Consul library
        from .consul import ConsulClient
    except ImportError as e:
        from .library import MISSING
        if getattr(e, "name", None) not in ("consul", "consul.base"):
            raise
        return _check_config_error(ConfigError(MISSING)) if args.check else \
            _config_error(ConfigError(MISSING), notifier)
    try:
        consul = ConsulClient(settings)
    except ConfigError as e:  # a TLS certificate or key that does not load
        return _check_config_error(e) if args.check else _config_error(e, notifier)
    if args.check:
        from .check import run_check
        return EXIT_OK if run_check(settings, consul) else EXIT_FAILURE
    return _run_daemon(settings, consul, notifier, context)


def _command_main(args: argparse.Namespace) -> int:
    """``list`` and ``switchover`` (SPEC §11.2, §11.3): one line on any failure, never a traceback."""
    name = f"vip-elector {args.command}"
    env = dict(os.environ)
    if not args.vip_manager_config:
        from .service import service_options
        try:
            opts, service_env = service_options()
        except ConfigError as e:
            print(f"{name}: {e}", file=sys.stderr)
            return EXIT_USAGE
        env = {**service_env, **{k: v for k, v in os.environ.items() if k.startswith("CONSUL_")}}
        try:
            service_args = parse_args(opts)
        except UsageError as e:
            print(f"{name}: VIP_ELECTOR_OPTS in /etc/default/vip-elector: {e}", file=sys.stderr)
            return EXIT_CONFIG
        for flag in ("vip_manager_config", "addr", "token", "token_file", "hostname"):
            if getattr(args, flag) is None:
                setattr(args, flag, getattr(service_args, flag))
    try:
        settings = build_settings(options_from(args), env)
        timeout = _duration("--timeout")(args.timeout)
        if timeout <= 0:
            raise ConfigError(f"--timeout {args.timeout!r} must be positive, e.g. 10s.")
        from .consul import ConsulClient
        consul = ConsulClient(settings)
    except ConfigError as e:
        print(f"{name}: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    from . import operations
    try:
        if args.command == "list":
            return operations.list_main(settings, consul, args.json)
        return operations.switchover_main(settings, consul, args.to, timeout)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    finally:
        consul.close()


def _run_daemon(settings: Settings, consul, notifier: Notifier, context: ElectionContext) -> int:
    from .election import Election, Outcome
    from .hooks import Hooks
    from .reexec import REEXEC_VAR, Reloader
    from .state import ENV_VAR, StateStore

    reexec = os.environ.pop(REEXEC_VAR, None) is not None
    try:
        vip = open_vip(settings)
    except ConfigError as e:
        return _config_error(e, notifier)
    try:
        metrics = _serve_metrics(settings, reexec)
    except ConfigError as e:
        return _config_error(e, notifier)
    consul.on_error = metrics.consul_error
    store = StateStore(settings.state_dir)
    saved = store.load(os.environ)
    reloader = Reloader(sys.argv[1:], os.environ)
    hooks = Hooks(settings.hook, settings.hook_timeout, settings.trigger_key, settings.value,
                  report=metrics.hook_run)
    validate = functools.partial(_validate_reload, bound=settings.metrics_address)
    election = Election(settings, consul, notifier, context, hooks=hooks, state=store, saved=saved,
                        reload_settings=lambda: reloader.prepare(validate),
                        reload_verdict=reloader.verdict, metrics=metrics, vip=vip)
    if vip is not None:
        vip.on_error = metrics.vip_error
        vip.keep()
    relay = signals.SignalRelay(election.on_signal).start()
    _log_start(settings, reexec)
    try:
        outcome = election.run()
    except ConfigError as e:
        hooks.close()
        return _config_error(e, notifier)
    except BaseException as e:
        notifier.final_status(f"crashed: {type(e).__name__}: {e}; see journalctl -u vip-elector")
        raise
    finally:
        consul.close()
        metrics.close()  # before the exec: the new program binds the port again
        if vip is not None:
            vip.close()  # the address stays as the loop left it: a restart resumes
    if outcome != Outcome.REEXEC:
        notifier.final_status("stopped")
        return EXIT_OK
    # Signals that arrive from now on stay pending for the new program (SPEC §8.3).
    if not relay.hand_over():
        log.warning("the signal thread did not stop before the reload's exec; a signal sent "
                    "this very moment may be lost")
    for signum in election.pending_signals():
        os.kill(os.getpid(), signum)
    saved_now = election.saved_session()
    try:
        reloader.exec({ENV_VAR: saved_now.to_json()} if saved_now is not None else {})
    except OSError as e:
        log.error("cannot re-execute %s for the reload (%s): exiting so that systemd restarts "
                  "the daemon, which resumes its session", sys.executable, e.strerror or e)
        notifier.final_status(f"reload failed: cannot re-execute ({e.strerror or e})")
    return EXIT_FAILURE


def _serve_metrics(settings: Settings, reexec: bool):
    """The metrics sink, serving already when --metrics-address is given (before READY=1).

    At start an address that cannot be used is a configuration error. After a
    reload's exec it is not: the reload checked the address, and a reload
    never ends the daemon — it says so and keeps trying to bind.
    """
    from .metrics import Metrics, NullMetrics, bind
    address = settings.metrics_address
    if address is None:
        return NullMetrics()
    metrics = Metrics(__version__, settings.trigger_key, settings.value, hooks=bool(settings.hook),
                      priority=settings.priority, vip=settings.vip is not None)
    try:
        metrics.serve(bind(address))
    except ConfigError as e:
        if not reexec:
            raise
        log.error("%s; trying again every 5 s", e)
        metrics.serve_later(address)
        return metrics
    log.info("serving metrics at http://%s/metrics", address)
    return metrics


def _validate_reload(argv: list[str], env, bound=None) -> Settings:
    """The configuration a reload would start with, or ConfigError naming what is wrong.

    ``bound``: the metrics address this program listens on (the new program
    takes it over); another address must be free now, or the reload is refused.
    """
    try:
        args = parse_args(argv)
    except (UsageError, SystemExit) as e:
        raise ConfigError(f"the options {' '.join(argv)!r}: {e}") from None
    settings = _settings(args, env)
    if settings.metrics_address is not None:
        from .metrics import bind, same_address
        if not same_address(settings.metrics_address, bound):
            bind(settings.metrics_address).close()
    return settings


def open_vip(settings: Settings):
    """The managed VIP (address.VirtualAddress), or None; ConfigError when it cannot be managed here."""
    if settings.vip is None:
        return None
    from .address import AddressError, VirtualAddress
    try:
        return VirtualAddress(settings.vip)
    except AddressError as e:
        raise ConfigError(f"--manage-vip: {e}.") from None


def drop_vip_main(config_path: str, env) -> int:
    """The manage-vip drop-in's ExecStopPost= and OnFailure=: no VIP left by a daemon that ends for good."""
    from .address import AddressError, VirtualAddress, restart_coming
    from .config import load_vip_manager_config, vip_settings
    try:
        vip_conf = vip_settings(load_vip_manager_config(config_path), check_interface=False)
    except ConfigError as e:
        print(f"vip-elector --drop-vip: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    why = restart_coming(env)
    if why:
        print(f"vip-elector: keeping VIP {vip_conf}: {why}")
        return EXIT_OK
    try:
        with VirtualAddress(vip_conf, announce=False) as vip:
            removed = vip.release()
    except AddressError as e:
        print(f"vip-elector --drop-vip: {e}.", file=sys.stderr)
        return EXIT_FAILURE
    print(f"vip-elector: VIP {vip_conf} {'removed' if removed else 'was not on this node'}"
          f" (the daemon ended for good: {env.get('SERVICE_RESULT') or 'failed'})")
    return EXIT_OK


def run() -> None:
    sys.exit(main())
