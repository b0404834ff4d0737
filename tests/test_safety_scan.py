"""The tool must never become a way in: no pickle, no unsafe loads, no eval/exec, no repository
code run unless the config says so. A scan of the package's source (its syntax trees, so comments and
strings do not count), checked first against snippets it must catch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "refusalscope"
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
BUILTINS = {"eval", "exec", "compile", "__import__"}  # called by name (model.eval() is a torch method)
UNSAFE_CALLS = {"read_pickle", "unsafe_load", "full_load"}


def _const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def findings(source: str, name: str = "<snippet>") -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            out += [f"{where}: imports {m}" for m in mods if m.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        called = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
        owner = fn.value.id if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) else ""
        kw = {k.arg: k.value for k in node.keywords}
        if (isinstance(fn, ast.Name) and called in BUILTINS) or called in UNSAFE_CALLS:
            out.append(f"{where}: calls {called}")
        if called == "load" and owner == "torch" and not _const(kw.get("weights_only"), True):
            out.append(f"{where}: torch.load without weights_only=True")
        if called == "load" and owner == "yaml" and not (isinstance(kw.get("Loader"), ast.Attribute)
                                                         and kw["Loader"].attr in ("SafeLoader", "CSafeLoader")):
            out.append(f"{where}: yaml.load without a safe loader (use yaml.safe_load)")
        if called == "load" and owner in ("np", "numpy") and _const(kw.get("allow_pickle"), True):
            out.append(f"{where}: np.load(allow_pickle=True)")
        if _const(kw.get("trust_remote_code"), True):
            out.append(f"{where}: trust_remote_code=True")
        if _const(kw.get("shell"), True):
            out.append(f"{where}: a shell command")
    for node in ast.walk(ast.parse(source)):  # {"trust_remote_code": True} handed to a loader
        if isinstance(node, ast.Dict):
            out += [f"{name}:{node.lineno}: trust_remote_code=True" for k, v in zip(node.keys, node.values)
                    if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and _const(v, True)]
    return out


@pytest.mark.parametrize("snippet", [
    "import pickle", "from joblib import load", "torch.load(path)", "torch.load(path, weights_only=False)",
    "yaml.load(text)", "np.load(f, allow_pickle=True)", "eval(x)", "exec(code)", "pd.read_pickle(p)",
    "AutoModel.from_pretrained(p, trust_remote_code=True)", "kw = {'trust_remote_code': True}",
    "subprocess.run(cmd, shell=True)",
])
def test_the_scan_catches_unsafe_code(snippet):
    assert findings(snippet)


@pytest.mark.parametrize("snippet", [
    "torch.load(p, weights_only=True)", "yaml.safe_load(t)", "model.eval()", "re.compile('x')",
    "AutoModel.from_pretrained(p, trust_remote_code=cfg.model.trust_remote_code)", "np.load(f)",
])
def test_the_scan_lets_safe_code_through(snippet):
    assert findings(snippet) == []


def test_the_package_has_no_unsafe_load_eval_or_remote_code():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 40
    found = [f for path in files for f in findings(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE)))]
    assert found == []


def test_remote_code_is_off_unless_the_config_turns_it_on(tmp_path):
    from refusalscope.run.config import Config, load_config

    assert Config().model.trust_remote_code is False
    for preset in ("demo", "gemma-2-2b-it", "llama-3.1-8b-it"):
        assert load_config(preset).model.trust_remote_code is False
    said: list[str] = []
    cfg = Config.model_validate({"model": {"source": str(tmp_path / "missing"), "trust_remote_code": True}})
    from refusalscope.errors import UserError
    from refusalscope.run.resolve import load_model

    with pytest.raises(UserError):  # the folder is missing; the warning comes first
        load_model(cfg, quiet=True, log=said.append)
    assert said == [f"model.trust_remote_code is on: the code in {tmp_path / 'missing'} runs in this process"]
