"""`kubectl pcn`: the command line. Thin: each verb reads options, calls
actions.py or the cluster, and prints through views.py and output.py."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NoReturn, TypeVar

import click

from pcn_crds import FUNCTION_TYPES

from . import __version__, actions, agents, chainview, completion, output, views
from . import chains as ch
from .capture import EXEC_ROLE
from .client import (
    CLUSTER_NETWORK_POLICIES,
    CUBE_CHAINS,
    ENDPOINT_SLICES,
    NAMESPACES,
    NETWORK_FUNCTIONS,
    NETWORK_POLICIES,
    NODE_PORT_RULES,
    NODES,
    PODS,
    SERVICES,
    STATUS_LABEL,
    STATUS_NAMESPACE,
    Cluster,
    Resource,
)
from .errors import Forbidden, InputError, PcnError

F = TypeVar("F", bound=Callable[..., Any])
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass
class Settings:
    """The global flags; they may come before or after the verb, as with kubectl."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None
    all_namespaces: bool = False
    output: str | None = None
    request_timeout: float | None = None
    system_namespace: str | None = None
    verbosity: int = 0

    @cached_property
    def cluster(self) -> Cluster:
        log = (lambda m: click.echo(f"[api] {m}", err=True)) if self.verbosity >= 6 else None
        return Cluster(self.kubeconfig, self.context,
                       30.0 if self.request_timeout is None else self.request_timeout, log)

    @property
    def ns(self) -> str:
        return self.namespace or self.cluster.default_namespace

    @property
    def fmt(self) -> str:
        return self.output or "table"

    @property
    def agents_namespace(self) -> str:
        return self.system_namespace or STATUS_NAMESPACE

    def progress(self, message: str) -> None:
        """For anything slow: on stderr, when someone is watching (a terminal)
        or asked for it (-v 1)."""
        if self.verbosity >= 1 or sys.stderr.isatty():
            click.echo(f"{message}...", err=True)


def _store(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value is None or value is False or (isinstance(value, tuple) and not value):
        return
    setattr(ctx.ensure_object(Settings), str(param.name), value)


def global_options(f: F) -> F:
    """kubectl's flags, accepted before the verb and after it."""
    opts = [
        click.option("--kubeconfig", metavar="FILE", expose_value=False, callback=_store,
                     type=click.Path(dir_okay=False),
                     help="The kubeconfig (default: $KUBECONFIG, else ~/.kube/config)."),
        click.option("--context", metavar="NAME", expose_value=False, callback=_store,
                     shell_complete=completion.names(_contexts),
                     help="The kubeconfig context (default: its current context)."),
        click.option("-n", "--namespace", metavar="NS", expose_value=False, callback=_store,
                     shell_complete=completion.names(_namespaces),
                     help="Namespace (default: the context's, else 'default')."),
        click.option("-A", "--all-namespaces", is_flag=True, default=None,
                     expose_value=False, callback=_store,
                     help="Every namespace (read verbs)."),
        click.option("-o", "--output", type=click.Choice(output.FORMATS),
                     expose_value=False, callback=_store,
                     help="table (default), wide, yaml or json."),
        click.option("--request-timeout", type=click.FloatRange(min=0), metavar="SECONDS",
                     expose_value=False, callback=_store,
                     help="Give up on an API request after this long (0: never; default 30)."),
        click.option("--system-namespace", metavar="NS", envvar="PCN_SYSTEM_NAMESPACE",
                     expose_value=False, callback=_store,
                     help=f"Where the pcn agents run (default {STATUS_NAMESPACE})."),
        click.option("-v", "--v", "verbosity", type=click.IntRange(min=0), metavar="LEVEL",
                     expose_value=False, callback=_store,
                     help="1: progress on stderr; 6: also each API request."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def settings() -> Settings:
    return click.get_current_context().ensure_object(Settings)


# ----------------------------------------------------------------------------- completion
def _contexts(ctx: click.Context) -> list[str]:
    from kubernetes import config as kubeconfig

    s = ctx.ensure_object(Settings)
    contexts, _ = kubeconfig.list_kube_config_contexts(s.cluster.config_file)
    return [c["name"] for c in contexts or []]


def _names_of(res: Resource) -> Callable[[click.Context], list[str]]:
    """Names of `res` objects, in the chosen namespace when `res` is namespaced."""

    def lister(ctx: click.Context) -> list[str]:
        s = ctx.ensure_object(Settings)
        return [o["metadata"]["name"]
                for o in s.cluster.list(res, s.ns if res.namespaced else None)]

    return lister


_namespaces = _names_of(NAMESPACES)
_functions = _names_of(NETWORK_FUNCTIONS)
_pods = _names_of(PODS)
_nodeports = _names_of(NODE_PORT_RULES)
_chains = _names_of(CUBE_CHAINS)


# ----------------------------------------------------------------------------- group
class AliasedGroup(click.Group):
    ALIASES = {"cubes": "functions", "cube": "functions", "nf": "functions",
               "nodeport": "nodeports"}

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, self.ALIASES.get(cmd_name, cmd_name))

    def resolve_command(self, ctx: click.Context, args: list[str]
                        ) -> tuple[str | None, click.Command | None, list[str]]:
        name, cmd, rest = super().resolve_command(ctx, args)
        return (cmd.name if cmd else name), cmd, rest


EPILOG = """\b
Examples:
  kubectl pcn add-cube firewall ssh-guard -n web --rule "drop tcp dport 22"
  kubectl pcn add-cube firewall api-fw -n web --selector app=api --hook egress \\
      --rule "allow udp to 10.96.0.10/32 dport 53" --default drop
  kubectl pcn add-cube firewall ssh-guard -n web --dry-run=client -o yaml > fw.yaml
  kubectl pcn add-cube policer slow-egress -n web --hook egress --rate 10M --burst 1Mi
  kubectl pcn chain web-7d9c -n web
  kubectl pcn status
Exit codes: 0 done, 1 the cluster failed or refused, 2 invalid input.
"""


@click.group(cls=AliasedGroup, epilog=EPILOG, context_settings={
    "help_option_names": ["-h", "--help"], "max_content_width": 100})
@global_options
@click.version_option(__version__, "--version", prog_name="kubectl-pcn",
                      message="%(prog)s %(version)s")
def cli() -> None:
    """Put cubes (eBPF network functions) in the data path of pods, and see
    what each node's pcn agent made of it.

    A NetworkFunction is a configured cube; a CubeChain puts functions, in
    order, on the ingress (traffic to the pods) or egress (traffic from the
    pods) side of the pods it selects."""


def _output_changes(changes: Sequence[actions.Change], dry_run: bool) -> None:
    s = settings()
    if s.fmt in ("yaml", "json"):
        objs = [c.obj for c in changes if c.obj is not None and c.action != "deleted"]
        if objs or s.fmt == "json":
            click.echo(output.documents(objs, s.fmt).rstrip("\n"))
        return
    suffix = " (dry run)" if dry_run else ""
    for c in changes:
        if c.action == "absent":
            continue
        note = f": {c.note}" if c.note else ""
        click.echo(f"{c.ref} {c.action}{suffix}{note}")


def _no_all_namespaces(verb: str) -> None:
    if settings().all_namespaces:
        raise InputError(f"-A/--all-namespaces does not apply to {verb}; give -n NAMESPACE")


def _check_name(name: str, what: str) -> str:
    if len(name) > 253 or not NAME_RE.match(name):
        raise InputError(f"{what} {name!r} is not a valid Kubernetes name (lower-case letters, "
                         f"digits, '-' and '.', starting and ending with a letter or digit)")
    return name


dry_run_option = click.option(
    "--dry-run", type=click.Choice(["none", "client"]), default="none", is_flag=False,
    flag_value="client", show_default=True,
    help="client: print what would be written (with -o yaml: apply-able manifests, e.g. for "
         "git and Argo CD) and write nothing.")


# ----------------------------------------------------------------------------- add-cube
_TYPE_META = "pcn.add-cube.type"


def _option_owners() -> dict[str, str]:
    """add-cube's parameters that set a type's config field -> that type."""
    from .rules import field_options

    return {"rules": "firewall", "default": "firewall",
            **{o.param: o.type_ for o in field_options()}}


class AddCubeCommand(click.Command):
    """add-cube, whose --help lists the options of the TYPE on the command
    line (`kubectl pcn add-cube policer --help`), or of every type, grouped,
    when none is given."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # --help is eager: it runs before TYPE is parsed, so look for it here
        ctx.meta[_TYPE_META] = next((a for a in args if a in FUNCTION_TYPES), None)
        if ctx.meta[_TYPE_META] is None and "--help" in args:
            positional = [a for a in args if not a.startswith("-")]
            ctx.meta[_CUSTOM_META] = positional[0] if positional else None
            _early_globals(ctx, args)
        return super().parse_args(ctx, args)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        chosen = ctx.meta.get(_TYPE_META)
        owners = _option_owners()
        common: list[tuple[str, str]] = []
        per_type: dict[str, list[tuple[str, str]]] = {t: [] for t in FUNCTION_TYPES}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            owner = owners.get(param.name or "")
            if owner is None:
                common.append(record)
            elif chosen in (None, owner):
                per_type[owner].append(record)
        with formatter.section("Options"):
            formatter.write_dl(common)
        custom = ctx.meta.get(_CUSTOM_META)
        if custom:
            _custom_type_help(ctx, formatter, custom)
            return
        if chosen is None:
            # no TYPE: the types and how to see one's options (a trial of
            # issue 12 read the firewall's options, listed first, as add-cube's)
            with formatter.section("Types (`kubectl pcn add-cube TYPE --help` shows the "
                                   "options of one)"):
                formatter.write_dl([*((t, TYPE_SUMMARIES[t]) for t in FUNCTION_TYPES),
                                    ("CUBETYPE", "a CubeType of the cluster (kubectl get "
                                                 "cubetypes): its parameters are --param "
                                                 "NAME=VALUE")])
            return
        for type_, records in per_type.items():
            if records:
                with formatter.section(f"Options of a {type_} (its spec.config)"):
                    formatter.write_dl(records)


_CUSTOM_META = "pcn.add-cube.cubetype"
# What each built-in type does, for add-cube's help without a TYPE (a test
# checks there is one per FUNCTION_TYPES entry).
TYPE_SUMMARIES = {
    "firewall": "ordered allow/drop rules (--rule, --default), up to 10 000, first match wins",
    "policer": "a token bucket rate limit (--rate, --burst, --scope)",
    "flowmonitor": "per-flow counters (--max-flows), read with `kubectl pcn flows POD`",
    "packetcapture": "a capture point (--filter, --snap-length), read with `kubectl pcn "
                     "capture POD`",
}


def _early_globals(ctx: click.Context, args: list[str]) -> None:
    """--kubeconfig and --context given before --help (which is eager), for
    the help of a CubeType to read it from the right cluster."""
    s = ctx.ensure_object(Settings)
    for flag in ("--kubeconfig", "--context"):
        for i, a in enumerate(args):
            value = a.split("=", 1)[1] if a.startswith(flag + "=") else \
                (args[i + 1] if a == flag and i + 1 < len(args) else None)
            if value is not None:
                setattr(s, flag[2:], value)


def _custom_type_help(ctx: click.Context, formatter: click.HelpFormatter, type_: str) -> None:
    """The parameters of CubeType `type_`, read from the cluster (or why not)."""
    from .client import CUBE_TYPES
    from .rules import cubetype_params

    try:
        found = ctx.ensure_object(Settings).cluster.get(CUBE_TYPES, None, type_)
    except Exception as exc:  # help still prints without a cluster
        with formatter.section(f"Parameters of {type_}"):
            formatter.write_text(f"(the cluster could not be read: {exc})")
        return
    if found is None:
        with formatter.section(f"Parameters of {type_}"):
            from .rules import capture_hint

            formatter.write_text(f"(no CubeType {type_} in the cluster; built-in types: "
                                 f"{', '.join(FUNCTION_TYPES)}{capture_hint(type_)})")
        return
    spec = found.get("spec") or {}
    try:
        params = cubetype_params(found)
    except InputError as exc:
        params, note = (), str(exc)
    else:
        note = ""
    title = f"Parameters of the CubeType {type_} (--param NAME=VALUE; default hook " \
            f"{spec.get('defaultHook', 'ingress')})"
    with formatter.section(title):
        if spec.get("description"):
            formatter.write_text(str(spec["description"]))
        formatter.write_dl([(p.name, p.describe()) for p in params] or
                           [("(none)", note or "it takes no parameters")])


ADD_CUBE_HELP = (
    "Create or update the NetworkFunction NAME (default: TYPE) of type TYPE "
    f"({', '.join(FUNCTION_TYPES)}, or a CubeType of the cluster) and insert it in a "
    "CubeChain of the namespace. `kubectl pcn add-cube TYPE --help` lists the "
    "options of that type, or a CubeType's parameters.\n\n"
    "A packetcapture is a capture point kept in the chain (compiled once): "
    "`kubectl pcn capture POD` reads it, with its filter or a narrower --filter. "
    "While nobody reads it, it copies nothing and only counts the packets its "
    "filter matches (`kubectl pcn chain`).")


def _field_options(f: F) -> F:
    """An option per config field of every function type (rules.field_options)."""
    from .rules import field_options

    for o in reversed(field_options()):
        if o.boolean:
            f = click.option(f"--{o.flag}/--no-{o.flag}", o.param, default=None,
                             help=o.help)(f)
            continue
        f = click.option(f"--{o.flag}", o.param, metavar=None if o.choices else "VALUE",
                         type=click.Choice(o.choices) if o.choices else str,
                         help=o.help)(f)
    return f


@cli.command("add-cube", cls=AddCubeCommand, help=ADD_CUBE_HELP, epilog="""\b
Where the function goes:
  no --selector       the chain "default" of the namespace (selects every pod)
  --selector SEL      the namespace's chain whose podSelector is exactly SEL, else a
                      new one named "pods-<keys-and-values>" (e.g. pods-app-web; with
                      a short hash of SEL when it had to be cleaned or is taken)
  --chain NAME        that chain (created with --selector, or selecting every pod)
  --position N        1-based within the chain's side; --before/--after F: next to F;
                      none: stays where it is, or goes last when new
Re-running the same command changes nothing. A pod's chain is the sides of every
chain selecting it, in ascending --priority then name (see `kubectl pcn chain POD`).
""")
@click.argument("type_", metavar="TYPE",
                shell_complete=completion.names(lambda ctx: list(FUNCTION_TYPES)))
@click.argument("name", required=False, shell_complete=completion.names(_functions))
@click.option("-l", "--selector", metavar="SEL",
              help="Pods it applies to, as kubectl selects: app=web,tier!=db,env in (a,b).")
@click.option("--hook", type=click.Choice([*ch.SIDES, "both"]), default=None,
              help="ingress: traffic to the pods; egress: traffic from them; both. Default: "
                   "ingress (packetcapture: both), or a CubeType's defaultHook.")
@click.option("--before", metavar="FUNCTION", shell_complete=completion.names(_functions),
              help="Place it just before this function of the chain's side.")
@click.option("--after", metavar="FUNCTION", shell_complete=completion.names(_functions),
              help="Place it just after this function of the chain's side.")
@click.option("--position", type=click.IntRange(min=1), metavar="N",
              help="Place it at this 1-based position of the chain's side.")
@click.option("--config", "config_file", type=click.File("r"), metavar="FILE",
              help="The function's config (YAML/JSON, or a NetworkFunction); - for stdin.")
@click.option("--rule", "rules", multiple=True, metavar="RULE",
              help='A firewall rule, e.g. "drop tcp dport 22" (repeat, in order). Replaces '
                   "the rules: ACTION [PROTO] [from CIDR] [to CIDR] [sport P[-P]] "
                   "[dport P[-P]].")
@click.option("--default", type=click.Choice(["allow", "drop"]),
              help="What the firewall does with traffic no rule matches.")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="A parameter of a CubeType (repeat); `kubectl pcn add-cube CUBETYPE "
                   "--help` lists them.")
@_field_options
@click.option("--chain", "chain_name", metavar="NAME", shell_complete=completion.names(_chains),
              help="The CubeChain to use (see below).")
@click.option("--priority", type=click.IntRange(0, 1000), metavar="N",
              help="The chain's priority (lower applies first; new chains: 100).")
@dry_run_option
@global_options
def add_cube(type_: str, name: str | None, selector: str | None, hook: str | None,
             before: str | None, after: str | None, position: int | None,
             config_file: Any, rules: tuple[str, ...], default: str | None,
             chain_name: str | None, priority: int | None, dry_run: str,
             params: tuple[str, ...] = (), **field_values: str | bool | None) -> None:
    """ADD_CUBE_HELP (--help), which lists the built-in types from FUNCTION_TYPES."""
    from .rules import field_options

    s = settings()
    name = _check_name(name or type_, "NAME")
    if chain_name is not None:
        _check_name(chain_name, "--chain")
    _no_all_namespaces("add-cube")
    if sum(x is not None for x in (before, after, position)) > 1:
        raise InputError("give at most one of --before, --after and --position")
    sel = ch.parse_selector(selector) if selector is not None else None
    config = None
    if config_file is not None:
        config = (getattr(config_file, "name", "-"), config_file.read())
    changes = actions.add_cube(
        s.cluster, namespace=s.ns, type_=type_, name=name, selector=sel, hook=hook or "",
        placement=ch.Placement(before, after, position), config_file=config, rules=rules,
        default=default, chain_name=chain_name, priority=priority,
        dry_run=dry_run == "client", progress=s.progress,
        fields={o.flag: v for o in field_options() if (v := field_values.get(o.param)) is not None},
        params=params, warn=_warn)
    _output_changes(changes, dry_run == "client")
    if type_ == "flowmonitor" and dry_run != "client" and any(
            c.kind == "NetworkFunction" and c.action in ("created", "configured")
            for c in changes):
        # the agents compile it now, seconds during which it counts nothing yet
        s.progress("each node's agent now compiles the flow monitor's program (a few seconds; "
                   "it counts from then on, and `kubectl pcn flows` says when it waits for it)")


# ----------------------------------------------------------------------------- remove-cube
@cli.command("remove-cube")
@click.argument("name", shell_complete=completion.names(_functions))
@dry_run_option
@global_options
def remove_cube(name: str, dry_run: str) -> None:
    """Take the function NAME out of every CubeChain of the namespace (deleting
    the chains add-cube created that become empty) and delete it."""
    s = settings()
    _no_all_namespaces("remove-cube")
    changes = actions.remove_cube(s.cluster, namespace=s.ns, name=name,
                                  dry_run=dry_run == "client", progress=s.progress)
    if all(c.action == "absent" for c in changes):
        if s.fmt == "json":
            click.echo(output.documents([], s.fmt))
        click.echo(f"networkfunction {s.ns}/{name} not found and no cubechain of {s.ns} "
                   f"uses it: nothing to remove", err=s.fmt in ("yaml", "json"))
        return
    _output_changes(changes, dry_run == "client")
    if dry_run == "client" and s.fmt in ("yaml", "json"):
        for c in changes:
            if c.action == "deleted":
                click.echo(f"# would delete {c.ref} in {c.namespace}", err=True)


# ----------------------------------------------------------------------------- reads
def _agent_reports(s: Settings, optional: bool = False) -> list[agents.NodeReport]:
    """The agents' reports; with optional, none (and a warning) when RBAC
    forbids reading them, since the rest of the answer stands without."""
    s.progress(f"reading agent status from namespace {s.agents_namespace}")
    try:
        return agents.reports(s.cluster.agent_status_configmaps(s.agents_namespace))
    except Forbidden as exc:
        if not optional:
            raise
        _warn(f"no counters: {exc.message.splitlines()[0]}")
        return []


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _get_or_list(res: Any, name: str | None, namespace: str | None) -> list[dict[str, Any]]:
    s = settings()
    if name is not None:
        obj = s.cluster.get(res, namespace, name)
        if obj is None:
            where = f"{namespace}/" if namespace and res.namespaced else ""
            raise PcnError(f"{res.kind.lower()} {where}{name} not found")
        obj.setdefault("apiVersion", "pcn.dev/v1alpha1")
        obj.setdefault("kind", res.kind)
        return [obj]
    return s.cluster.list(res, namespace)


def _print_objects(objs: Sequence[dict[str, Any]], single: bool, empty: str,
                   render: Callable[[], str]) -> None:
    s = settings()
    if s.fmt in ("yaml", "json"):
        click.echo(output.data(objs[0] if single else views.as_list(objs), s.fmt))
    elif not objs:
        click.echo(empty, err=True)
    else:
        click.echo(render())


@cli.command("functions")
@click.argument("name", required=False, shell_complete=completion.names(_functions))
@global_options
def functions(name: str | None) -> None:
    """List NetworkFunctions (alias: cubes): type, rules, the chains that
    place them, readiness."""
    s = settings()
    namespace = None if s.all_namespaces and name is None else s.ns
    nfs = _get_or_list(NETWORK_FUNCTIONS, name, namespace)
    chains = s.cluster.list(CUBE_CHAINS, namespace) if s.fmt in ("table", "wide") else []
    where = "any namespace" if namespace is None else f"namespace {namespace}"
    _print_objects(nfs, name is not None, f"No networkfunctions in {where}.",
                   lambda: views.functions_table(nfs, chains, namespace is None,
                                                 s.fmt == "wide"))


@cli.command("nodeports")
@click.argument("name", required=False, shell_complete=completion.names(_nodeports))
@global_options
def nodeports(name: str | None) -> None:
    """List NodePortRules (cluster-wide): port, protocol, traffic policy,
    target, readiness."""
    s = settings()
    rules = _get_or_list(NODE_PORT_RULES, name, None)
    _print_objects(rules, name is not None, "No nodeportrules.",
                   lambda: views.nodeports_table(rules, s.fmt == "wide"))


@cli.command("status")
@global_options
def status() -> None:
    """Each node's pcn agent: state, data plane, version, what it realised,
    heartbeat age and last error."""
    s = settings()
    reports = _agent_reports(s)
    try:
        nodes: list[dict[str, Any]] | None = s.cluster.list(NODES)
    except Forbidden as exc:  # listing nodes is a nicety: say so and go on
        _warn(f"nodes without an agent are not shown: {exc.message.splitlines()[0]}")
        nodes = None
    data = views.status_data(reports, nodes)
    if s.fmt in ("yaml", "json"):
        click.echo(output.data({"nodes": data}, s.fmt))
    elif not data:
        click.echo(f"No pcn agent has reported (no ConfigMap labelled "
                   f"{'='.join(STATUS_LABEL)} in namespace {s.agents_namespace}); is the "
                   f"agent DaemonSet running? kubectl -n {s.agents_namespace} get pods", err=True)
    else:
        click.echo(views.status_table(data, s.fmt == "wide"))


@cli.command("stats")
@global_options
def stats() -> None:
    """Counters by pod (and its port on the node's bridge) and by function
    (rule hits, default-action hits, drops), from the agents."""
    s = settings()
    namespace = None if s.all_namespaces else s.ns
    reports = _agent_reports(s)
    data = views.stats_data(reports, namespace)
    if s.fmt in ("yaml", "json"):
        click.echo(output.data(data, s.fmt))
    elif namespace is not None and not data["pods"] and not data["functions"]:
        # as kubectl says "No resources found in default namespace."; and
        # where there is something to see
        elsewhere = views.stats_namespaces(reports)
        click.echo(f"No pcn pods or functions in namespace {namespace}." + (
            f" The agents report some in: {', '.join(elsewhere)} (-n NAMESPACE, or -A)."
            if elsewhere else ""), err=True)
    else:
        click.echo(views.stats_table(data, namespace is None, s.fmt == "wide"))


@cli.command("chain")
@click.argument("pod", required=False, shell_complete=completion.names(_pods))
@global_options
def chain(pod: str | None) -> None:
    """The ordered chain of POD (which CubeChains select it, the functions on
    each side, their rule hits and drops, the pod's counters); without POD,
    the chains, pods and functions of the namespace (-A: of every one)."""
    s = settings()
    if pod is not None:
        _no_all_namespaces("chain POD")
        namespace: str | None = s.ns
        obj = s.cluster.get(PODS, namespace, pod)
        if obj is None:
            raise PcnError(f"pod {namespace}/{pod} not found",
                           f"list them with: kubectl get pods -n {namespace}")
        chains = s.cluster.list(CUBE_CHAINS, namespace)
        nfs = s.cluster.list(NETWORK_FUNCTIONS, namespace)
        data = chainview.pod_chain_data(obj, chains, nfs, _agent_reports(s, optional=True))
        if s.fmt in ("yaml", "json"):
            click.echo(output.data(data, s.fmt))
        else:
            click.echo(chainview.pod_chain_text(data))
        return
    namespace = None if s.all_namespaces else s.ns
    chains = s.cluster.list(CUBE_CHAINS, namespace)
    nfs = s.cluster.list(NETWORK_FUNCTIONS, namespace)
    try:
        pods: list[dict[str, Any]] | None = s.cluster.list(PODS, namespace)
    except Forbidden as exc:
        _warn(f"pods not shown: {exc.message.splitlines()[0]}")
        pods = None
    reports = _agent_reports(s, optional=True)
    if namespace is None:
        names = sorted({o["metadata"].get("namespace") or "" for o in [*chains, *nfs]})
    else:
        names = [namespace]
    reports_out = []
    for ns in names:
        def mine(objs: Sequence[dict[str, Any]] | None, ns: str = ns
                 ) -> list[dict[str, Any]] | None:
            if objs is None:
                return None
            return [o for o in objs if (o["metadata"].get("namespace") or "") == ns]

        reports_out.append(chainview.namespace_chain_data(
            ns, mine(chains) or [], mine(nfs) or [], mine(pods), reports))
    if s.fmt in ("yaml", "json"):
        click.echo(output.data(reports_out if s.all_namespaces else reports_out[0], s.fmt))
    elif not reports_out:
        click.echo("No cubechains or networkfunctions in any namespace.", err=True)
    else:
        click.echo("\n\n".join(chainview.namespace_chain_text(d, s.fmt == "wide")
                               for d in reports_out))


@cli.command("policy", epilog="""\b
Examples:
  kubectl pcn policy client web --port 80 -n shop
  kubectl pcn policy client web --port http -n shop
  kubectl pcn policy shop/client db/postgres --port 5432
  kubectl pcn policy client svc/web --port 80 -n shop
  kubectl pcn policy 203.0.113.9 web --port 443 --protocol tcp -n shop
\b
Exit status: 0 allowed, 1 denied (for a Service: denied to a backend),
2 a mistake in the question.""")
@click.argument("source", shell_complete=completion.names(_pods))
@click.argument("destination", shell_complete=completion.names(_pods))
@click.option("--port", default=None, metavar="PORT",
              help="Destination port: a number, or a name (the destination pod's "
                   "container port, or the Service's port). Needed for TCP, UDP, SCTP.")
@click.option("--protocol", type=click.Choice(["TCP", "UDP", "SCTP", "ICMP"],
                                              case_sensitive=False),
              default="TCP", show_default=True)
@global_options
def policy(source: str, destination: str, port: str | None, protocol: str) -> None:
    """Would a new connection from SOURCE to DESTINATION be allowed by the
    NetworkPolicies and ClusterNetworkPolicies in force, and by which rule
    of which policy? SOURCE is a pod (NAME in -n NAMESPACE, or
    NAMESPACE/NAME) or an IPv4 address; DESTINATION too, or a Service
    (svc/NAME, NAMESPACE/svc/NAME or its ClusterIP), which is judged at
    each ready backend with its target port, as the data plane sees the
    connection after Service translation. Both sides are judged as pcn's
    policy cube judges them: the source pod's egress, then the destination
    pod's ingress."""
    from pcn_policy import compiler

    from . import policycheck

    s = settings()
    s.progress("reading pods, services, namespaces, nodes and policies")
    try:
        cnps = s.cluster.list(CLUSTER_NETWORK_POLICIES)
    except PcnError:
        cnps = []  # the CRD is not installed: there are none
    pods = s.cluster.list(PODS)
    cluster = compiler.Cluster(
        network_policies=s.cluster.list(NETWORK_POLICIES), cluster_network_policies=cnps,
        pods=pods, namespaces=s.cluster.list(NAMESPACES), nodes=s.cluster.list(NODES))
    services = s.cluster.list(SERVICES)
    slices = s.cluster.list(ENDPOINT_SLICES) if services else []
    found = policycheck.targets(destination, s.ns, port, protocol, pods, services, slices)
    src = policycheck.qualified(source, s.ns)
    results = []
    for t in found:
        try:
            results.append((t, compiler.explain(cluster, src, t.endpoint, protocol, t.port)))
        except ValueError as exc:
            hint = ("list pods with: kubectl get pods -A -o wide; a pod of another namespace "
                    "than -n is NAMESPACE/NAME")
            raise InputError(str(exc), hint) from None
    if s.fmt in ("yaml", "json"):
        def step(st: compiler.Step) -> dict[str, Any]:
            return {"pod": st.pod, "action": st.action.name, "reason": st.reason,
                    "rule": str(st.ref) if st.ref else None}

        def doc(t: policycheck.Target, ex: compiler.Explanation) -> dict[str, Any]:
            return {"source": str(ex.src), "destination": str(ex.dst),
                    "protocol": protocol.upper(), "port": t.port, "allowed": ex.allowed,
                    "egress": step(ex.egress), "ingress": step(ex.ingress),
                    "warnings": list(ex.warnings)}
        if len(results) == 1 and not results[0][0].via:
            click.echo(output.data(doc(*results[0]), s.fmt))
        else:
            click.echo(output.data({"service": results[0][0].via,
                                    "allowed": all(ex.allowed for _, ex in results),
                                    "backends": [doc(t, ex) for t, ex in results]}, s.fmt))
    else:
        if results[0][0].via:
            click.echo(f"{results[0][0].via} -> {len(results)} ready backend(s), "
                       "each judged as the data plane sees it:")
        for _, ex in results:
            click.echo(str(ex))
        for w in sorted({w for _, ex in results for w in ex.warnings}):
            _warn(w)
    if not all(ex.allowed for _, ex in results):
        sys.exit(1)


@cli.command("version")
@click.option("--client", "client_only", is_flag=True, help="Only this program's version.")
@global_options
def version(client_only: bool) -> None:
    """kubectl-pcn's version; the API server's and each agent's."""
    s = settings()
    data: dict[str, Any] = {"clientVersion": __version__}
    error: PcnError | None = None
    if not client_only:
        try:
            data["server"] = s.cluster.server
            data["serverVersion"] = s.cluster.server_version()
            data["agents"] = [{"node": r.node, "version": r.data.get("version")}
                              for r in _agent_reports(s)]
        except PcnError as exc:
            error = exc
    if s.fmt in ("yaml", "json"):
        click.echo(output.data(data, s.fmt))
    else:
        click.echo(f"Client Version: kubectl-pcn {__version__}")
        if "serverVersion" in data:
            click.echo(f"Server Version: {data['serverVersion']} ({data['server']})")
        if data.get("agents"):
            click.echo(output.table(["node", "agent version"],
                                    [[a["node"], a["version"]] for a in data["agents"]]))
        elif "agents" in data:
            click.echo(f"Agents: none reported in namespace {s.agents_namespace}")
    if error is not None:
        raise error


# ----------------------------------------------------------------------------- capture, flows
# (issue 12: packetcapture and flowmonitor; the transport is capture.py's)
_EXEC_RBAC = """\b
On a real cluster this runs `kubectl exec` into the pcn-agent pod of the
pod's node (namespace pcn-system, or --system-namespace): RBAC must let you
get and create pods/exec there (and get, list pods). For example:
""" + "\n".join(f"  {line}" for line in EXEC_ROLE.splitlines()) + """
In the lab (pcn-lab up) it uses the agents' local sockets: no RBAC."""
def _agent_route(pod: str) -> tuple[str, Any]:
    from . import capture as cap

    s = settings()
    _no_all_namespaces("this verb")
    node = cap.pod_node(s.cluster, s.ns, pod)
    return node, cap.route(s.cluster, node, s.agents_namespace,
                           cap.kubectl_flags(s.kubeconfig, s.context))


@cli.command("capture", epilog="""\b
Examples:
  kubectl pcn capture web-1 -n demo -c 20 -w web.pcap
  kubectl pcn capture web-1 -n demo --filter 'tcp port 8080 and not host 10.244.1.1' | tcpdump -nr -
Filter: host/net/port/portrange with src/dst, tcp/udp/icmp/sctp/ip/arp, and/or/not,
parentheses (pcap-filter(7)'s syntax for these).
""" + _EXEC_RBAC)
@click.argument("pod", shell_complete=completion.names(_pods))
@click.option("-f", "--filter", "filter_", default="", metavar="EXPR", help="What to capture.")
@click.option("-c", "--count", type=click.IntRange(min=0), default=0,
              help="Stop after N packets (0: no limit).")
@click.option("--duration", type=click.FloatRange(min=0), default=0.0, metavar="S",
              help="Stop after S seconds (0: until interrupted).")
@click.option("-s", "--snaplen", type=click.IntRange(1, 8192), default=8192, show_default=True,
              help="Bytes kept of each frame.")
@click.option("--rate", "budget", type=click.IntRange(1, 100_000), default=2000,
              show_default=True, help="Packets copied a second, at most (more are counted).")
@click.option("-w", "--write", "write", default="-", metavar="FILE|-",
              help="The capture file ('-': stdout).")
@click.option("--format", "fmt", type=click.Choice(["pcapng", "pcap"]), default="pcapng",
              show_default=True, help="pcapng marks each packet inbound (to the pod) or "
              "outbound (from it); classic pcap has no direction.")
@global_options
def capture_cmd(pod: str, filter_: str, count: int, duration: float, snaplen: int, budget: int,
                write: str, fmt: str) -> None:
    """Capture POD's packets, both directions, as pcapng (nanosecond
    timestamps, each packet marked inbound or outbound: tcpdump -r and
    Wireshark read it) or classic pcap: on a cluster through the node's
    pcn-agent pod (kubectl exec), in the lab through its agent's socket.
    When POD's chain has a packetcapture function (add-cube packetcapture),
    the capture reads it (its filter narrowed by --filter) instead of adding
    a cube. Progress on stderr, and at the end an account of every packet
    the filter matched: matched = captured + not copied (over --rate, or
    past -c) + lost (a full buffer, or the reader gone)."""
    from pcn_crds.capfilter import FilterError, compile_filter

    from . import capture as cap

    s = settings()
    try:
        compile_filter(filter_)  # the agent checks it too: fail before reaching it
    except FilterError as exc:
        raise InputError(str(exc)) from None
    if write == "-" and sys.stdout.isatty():
        raise InputError("a capture is binary: give -w FILE, or pipe it (| tcpdump -nr -)")
    node, r = _agent_route(pod)
    # the agent's command says "capturing" once the capture copies packets
    s.progress(f"asking node {node}'s agent for a capture of {s.ns}/{pod} through {r.via}")
    argv = cap.capture_argv(r, s.ns, pod, filter_, count, duration, snaplen, budget,
                            s.verbosity >= 2, fmt)
    if write == "-":
        code = cap.run_capture(r, argv, sys.stdout.buffer)
    else:
        with open(write, "wb") as out:
            code = cap.run_capture(r, argv, out)
    if code:
        sys.exit(code)


@cli.command("flows", epilog=_EXEC_RBAC)
@click.argument("pod", shell_complete=completion.names(_pods))
@click.option("--sort", type=click.Choice(["bytes", "packets", "last"]), default="bytes",
              show_default=True, help="Largest first; last: most recently seen first.")
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True,
              help="Show N flows (0: all).")
@global_options
def flows_cmd(pod: str, sort: str, top: int) -> None:
    """POD's top talkers, from the flow monitors (NetworkFunctions of type
    flowmonitor) on its chain. Bytes are L3 bytes, as conntrack counts them."""
    from . import capture as cap
    from . import flows as fl

    s = settings()
    _node, r = _agent_route(pod)
    data = cap.run_json(r, [*r.argv, "flows", pod, "-n", s.ns])
    picked = fl.rows(data, sort, top)
    if s.fmt in ("yaml", "json"):
        click.echo(output.data(fl.document(data, picked, sort, top), s.fmt))
    else:
        click.echo(fl.table(data, picked, s.fmt == "wide"))


@cli.command("completion")
@click.argument("shell", type=click.Choice(completion.SHELLS))
def completion_cmd(shell: str) -> None:
    """Print the shell completion script.

    \b
    bash:  source <(kubectl-pcn completion bash)
    zsh:   source <(kubectl-pcn completion zsh)
    fish:  kubectl-pcn completion fish | source
    For `kubectl pcn <TAB>` (kubectl 1.26+), the kubectl_complete-pcn program
    installed next to kubectl-pcn answers kubectl."""
    click.echo(completion.script(cli, shell))


def main() -> None:
    cli.main(prog_name="kubectl-pcn")


def kubectl_complete_main() -> NoReturn:
    """`kubectl_complete-pcn`: kubectl (1.26+) runs it to complete `kubectl pcn <TAB>`."""
    sys.exit(completion.kubectl_complete(cli))
