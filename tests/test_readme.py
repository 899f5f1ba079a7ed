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
