"""Shell completion: click's scripts for bash, zsh and fish; the names of
objects in the cluster for NAME/POD arguments; and kubectl's plugin completion
protocol, which `kubectl_complete-pcn` (kubectl_pcn.cli) serves for kubectl 1.26+."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import click
from click.shell_completion import CompletionItem, ShellComplete, get_completion_class

PROG = "kubectl-pcn"
COMPLETE_VAR = "_KUBECTL_PCN_COMPLETE"
SHELLS = ("bash", "zsh", "fish")
NO_FILE_COMPLETION = 4  # cobra's ShellCompDirectiveNoFileComp, which kubectl expects


def script(cli: click.Command, shell: str) -> str:
    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - click.Choice limits shell
        raise click.BadParameter(f"unsupported shell {shell}")
    return cls(cli, {}, PROG, COMPLETE_VAR).source()


def names(lister: Callable[[click.Context], Sequence[str]]
          ) -> Callable[[click.Context, click.Parameter, str], list[CompletionItem]]:
    """A shell_complete callback offering the names lister() finds; quiet
    (no completions) when the cluster cannot be asked."""

    def complete(ctx: click.Context, param: click.Parameter, incomplete: str
                 ) -> list[CompletionItem]:
        try:
            found = lister(ctx)
        except Exception:  # noqa: BLE001 - completion must never break the shell
            return []
        return [CompletionItem(n) for n in sorted(found) if n.startswith(incomplete)]

    return complete


def kubectl_complete(cli: click.Command, argv: Sequence[str] | None = None) -> int:
    """kubectl's plugin completion protocol for the command `cli`: the words
    after `kubectl pcn`, the last one being completed; one candidate per line
    ("value\\thelp"), then ":<directive>"."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["__complete"]:
        args = args[1:]
    incomplete = args.pop() if args else ""
    comp = ShellComplete(cli, {}, PROG, COMPLETE_VAR)
    for item in comp.get_completions(args, incomplete):
        help_ = f"\t{item.help}" if item.help else ""
        click.echo(f"{item.value}{help_}")
    click.echo(f":{NO_FILE_COMPLETION}")
    return 0
