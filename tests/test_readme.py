"""The README's "Use" example runs as written (every name in it defined there)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title):
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_use_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", _section("Use"), re.S)
    assert blocks, "the Use section has no python example"
    scope = {}
    for code in blocks:
        exec(compile(code, "README.md (Use)", "exec"), scope)  # noqa: S102
    # The example's results are real losses.
    for name in ("loss", "fl", "sfl", "nce", "sig", "kd"):
        value = scope[name]
        assert value.dim() == 0 and bool(value.isfinite()), name
