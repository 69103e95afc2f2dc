"""The layering rule: nothing in magi_train imports magi_infer (statically or through importlib); magi_eval is the
one package that drives both."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and getattr(node.func, "attr", getattr(node.func, "id", "")) \
                in ("import_module", "__import__"):
            out.append(node.args[0].value)
    return out


def test_magi_train_never_imports_magi_infer():
    offenders = [f"{p.relative_to(ROOT)}: {m}" for p in sorted((ROOT / "magi_train").rglob("*.py"))
                 for m in _imports(p) if m.split(".")[0] == "magi_infer"]
    assert not offenders, offenders
    assert not (ROOT / "magi_train" / "evaluate.py").exists()


def test_magi_eval_drives_both():
    mods = {m.split(".")[0] for p in (ROOT / "magi_eval").rglob("*.py") for m in _imports(p)}
    assert {"magi_train", "magi_infer"} <= mods
