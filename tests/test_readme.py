"""The README's Python API example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_api_example_runs(capsys):
    text = README.read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "GPT2LMHeadModel: 4 FFN sites, 2 converted to 8 experts" in out
    assert "T5ForConditionalGeneration: 24 FFN sites, 12 converted to 64 experts" in out


def test_option_table_lists_each_config_option_once_with_its_default():
    import dataclasses

    from moeify.config import MoEConfig

    rows = re.findall(r"^\| `(--[a-z-]+)[^`]*` \| ([^|]+) \|", README.read_text(), re.M)
    defaults: dict[str, str] = {}
    for option, default in rows:
        assert option not in defaults, f"{option} is listed twice"
        defaults[option] = default.strip()
    for field in dataclasses.fields(MoEConfig):
        option = field.metadata["cli"][0]
        assert option in defaults, f"{option} is missing from the README's option table"
        if field.default is not None:
            assert defaults[option] == str(getattr(field.default, "value", field.default))
