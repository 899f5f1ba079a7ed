"""`SelectSites`: choose which FFN sites become Switch layers."""

from __future__ import annotations

from collections import defaultdict

from moeify.compiler.plan import FFNSite
from moeify.compiler.program import Program
from moeify.passes._base import ProgramPass


def select_sites(sites: list[FFNSite], every: int, layers: tuple[int, ...] | None) -> list[FFNSite]:
    """Sites chosen by ``layers`` (explicit indices in each stack) or ``every``.

    ``every=N`` takes indices N-1, 2N-1, ... of each stack: every other FFN, the odd
    indices 1, 3, 5 for the default N=2 (Switch-Base, HF SwitchTransformers); N=1
    takes all. Raises ``ValueError`` for a ``layers`` index no stack has.
    """
    stacks: dict[str, list[FFNSite]] = defaultdict(list)
    for site in sites:
        stacks[site.stack].append(site)
    if layers is not None:
        longest = max((len(s) for s in stacks.values()), default=0)
        missing = sorted(i for i in layers if i >= longest)
        if missing:
            sizes = ", ".join(f"{k} ({len(v)})" for k, v in stacks.items()) or "none"
            raise ValueError(
                f"MoEConfig.layers names layer {', '.join(map(str, missing))}, which no "
                f"FFN stack has; stacks (FFN layers): {sizes}; valid indices 0..{longest - 1}"
            )
        wanted = set(layers)
        return [s for s in sites if s.index in wanted]
    return [s for s in sites if s.index % every == every - 1]


class SelectSites(ProgramPass):
    """Choose the sites to convert from ``program.analysis`` (config ``every``/``layers``).

    Requires: `FindFFN` has run.
    Guarantees: ``program.selected`` non-empty, in module order; otherwise a
        `MoEError` that lists what was examined and every rejection with its reason.
    Preserves the computation: yes (records only).
    """

    def __init__(self, *, allow_empty: bool = False) -> None:
        self.allow_empty = allow_empty

    def requires(self, program: Program) -> None:  # type: ignore[override]
        if program.analysis is None:
            raise self.fail("run FindFFN first")

    def run(self, program: Program) -> bool:
        analysis = program.analysis
        c = program.config
        try:
            program.selected = select_sites(list(analysis.sites), c.every, c.layers)
        except ValueError as error:
            raise self.fail(str(error)) from None
        if not program.selected and not self.allow_empty:
            raise self.fail(no_sites_message(program))
        return False


def no_sites_message(program: Program) -> str:
    analysis = program.analysis
    lines = []
    if analysis.sites:
        lines.append(
            f"none of the {len(analysis.sites)} FFN sites is selected by every="
            f"{program.config.every} / layers={program.config.layers}"
        )
    else:
        lines.append("no FFN found in the model")
    lines.append("examined: " + ("; ".join(analysis.examined) or "nothing traceable"))
    if analysis.rejected:
        lines.append("rejected:")
        lines += [f"  {r.where}: {r.reason} [{r.found_by}]" for r in analysis.rejected]
    return "\n".join(lines)
