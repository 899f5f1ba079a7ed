"""The project's exceptions, worded in the caller's own terms.

Every problem moeify reports about a user's model, config, options or files is a
`MoEError`; `moeify.config.ConfigError`, `moeify.compiler.pipeline.PassError` and
`moeify.distributed.ExpertParallelError` are its kinds.

A message that names one of the caller's parameters holds a placeholder filled with a
`Param`, and the error spells it for the entry point the caller used: Python names the
parameter (``quantize_all=True``, ``MoEConfig.top_k=3``), the command line its option
(``--quantize-all``, ``--top-k 3``). ``str(error)`` is the Python spelling; the CLI
prints ``error.render(cli=True)``::

    QUANTIZE = Param("quantize")
    raise MoEError("{quantize!r} is not one of int4, int8", quantize=QUANTIZE.given("int3"))
    # Python: quantize='int3' is not one of int4, int8
    # CLI:    --quantize 'int3' is not one of int4, int8
"""

from __future__ import annotations

import dataclasses
import enum
import string
from typing import Any

_NO_VALUE: Any = object()


@dataclasses.dataclass(frozen=True)
class Param:
    """A parameter a message names, and the value it states for it (if any).

    name: the Python parameter (``quantize_all``), or the field or function of ``owner``.
    option: its command-line spelling; by default ``--`` and the name with dashes.
    owner: the class whose field it is (``MoEConfig``) or the module whose function it is
        (``moeify``): Python then reads ``MoEConfig.top_k``, ``moeify.export_onnx``.

    Spelled by placeholders ``{p}`` and ``{p!r}``; both write a value as Python does in
    Python (``hf_arch='mixtral'``), and on the command line ``{p}`` writes it bare
    (``--hf-arch mixtral``, a suggestion or a value stated) while ``{p!r}`` quotes a
    string (``--hf-arch 'mixtal'``, a value refused). On the command line a flag set is
    the option alone (``--dropless``; unset, ``--dropless=False``) and a sequence is
    comma-separated (``--layers 1,3``), as they are typed; an enum is its value.
    """

    name: str
    option: str = ""
    owner: str = ""
    value: Any = _NO_VALUE
    switch: bool = False  # typed with a value, on or off (``--random-routing off``)

    def __post_init__(self) -> None:
        if not self.option:
            object.__setattr__(self, "option", "--" + self.name.replace("_", "-"))

    def given(self, value: Any) -> Param:
        """This parameter with ``value``, as the message states it."""
        return dataclasses.replace(self, value=value)

    def spell(self, *, cli: bool, quoted: bool = False) -> str:
        """The parameter (and its value) as the caller of one entry point writes it."""
        value = self.value.value if isinstance(self.value, enum.Enum) else self.value
        if not cli:
            name = f"{self.owner}.{self.name}" if self.owner else self.name
            return name if value is _NO_VALUE else f"{name}={value!r}"
        if self.switch and isinstance(value, bool):
            return f"{self.option} {'on' if value else 'off'}"
        if value is _NO_VALUE or value is True:
            return self.option
        if value is False:
            return f"{self.option}=False"
        if isinstance(value, (tuple, list)):
            return f"{self.option} {','.join(map(str, value))}"
        return f"{self.option} {value!r}" if quoted and isinstance(value, str) else (
            f"{self.option} {value}")


class _Spelling(string.Formatter):
    """``str.format`` with each `Param` spelled for one entry point."""

    def __init__(self, *, cli: bool) -> None:
        self.cli = cli

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if isinstance(value, Param):
            return value.spell(cli=self.cli, quoted=conversion == "r")
        return super().convert_field(value, conversion)


class MoEError(Exception):
    """A problem with the user's model, config, options or files, stated with its fix.

    message: the text; with ``values``, a ``str.format`` template whose placeholders
        they fill (a `Param` spelled for the entry point, anything else formatted as
        ``str.format`` does). Without values it is taken as written.
    """

    def __init__(self, message: str, **values: Any) -> None:
        self.template = message
        self.values = values
        super().__init__(self.render())

    def render(self, *, cli: bool = False) -> str:
        """The message with each parameter spelled for Python or, with ``cli``, for the
        command line."""
        if not self.values:
            return self.template
        return _Spelling(cli=cli).format(self.template, **self.values)
