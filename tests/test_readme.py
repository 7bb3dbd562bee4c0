"""The README's notebook snippet runs as written; its set-up commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_notebook_snippet_runs(capsys):
    marker = README.index("<!-- notebook-snippet")
    code = re.search(r"```python\n(.*?)```", README[marker:], re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (2, 4)
    out = capsys.readouterr().out
    assert "51.40" in out and "GFLOP forward" in out


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    test_cmd = next(b for b in blocks if "pytest" in b).strip()
    for part in test_cmd.split(" && "):
        if part.startswith("python3 -m venv"):
            assert "python3 -m venv .venv" in ci
        else:
            assert part in ci, part
