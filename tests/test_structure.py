"""The package's shape: no import cycle, the README's layout tree and Python API example match the code,
declarative layouts keyed by full module names, one recipe with one key, one grid, one label."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import hiq
from hiq.layouts import LAYOUTS, ModelLayout, layout_for
from hiq.model import all_block_linears

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _modules() -> dict[str, Path]:
    mods = {}
    for f in (ROOT / "hiq").rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> hiq modules it imports (anywhere in the file, lazy imports included). Importing ``a.b.c`` also
    runs package ``a.b``'s ``__init__`` unless the importer lives inside ``a.b`` (the root ``hiq`` excepted)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("hiq")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("hiq"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    targets.add(sub if sub in mods else node.module)
        edges = set()
        for t in targets:
            while t not in mods and "." in t:
                t = t.rsplit(".", 1)[0]
            edges.add(t)
            parent = t.rsplit(".", 1)[0] if "." in t else None
            while parent and parent != "hiq":
                if not name.startswith(parent + "."):
                    edges.add(parent)
                parent = parent.rsplit(".", 1)[0] if "." in parent else None
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if not state.get(v) and (found := visit(v)):
                return found
        state[u] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if not state.get(node) and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "hiq.api" in graph["hiq.cli"]  # the command line sits on the Python API ...
    assert [m for m, deps in graph.items() if "hiq.cli" in deps] == ["hiq.__main__"]  # ... and nothing on it
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["hiq.quant.grid"] = graph["hiq.quant.grid"] | {"hiq.cli"}
    assert find_cycle(graph) is not None


def test_readme_layout_lists_every_module_and_nothing_else():
    block = README.split("## Layout", 1)[1].split("```", 2)[1]
    listed = set()
    package = None
    for line in block.splitlines():
        if m := re.match(r"^  (\w+)/\s", line):  # a sub-package; its modules follow, indented
            package = m.group(1)
        elif m := re.match(r"^  (\w+\.py)\s", line):
            listed.add(f"hiq/{m.group(1)}")
            package = None
        elif (m := re.match(r"^    (\w+\.py)\s", line)) and package:
            listed.add(f"hiq/{package}/{m.group(1)}")
    actual = {str(p.relative_to(ROOT)) for p in (ROOT / "hiq").rglob("*.py")
              if p.name != "__init__.py" or p.parent.name == "hiq"}  # the root package: what it exports
    assert listed == actual, f"missing from README: {sorted(actual - listed)}; not in code: {sorted(listed - actual)}"


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    code = README.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    result = namespace["result"]
    assert isinstance(result, hiq.QuantizeResult) and 2.0 < result.avg_bits <= 2.1 + 1e-9
    assert all(name.startswith("model.layers.") for name in result.ratios) and len(result.ratios) == 56
    assert (tmp_path / result.run_dir / "ratios.json").is_file()
    assert namespace["scores"]["wikitext2_ppl"] > 1


def test_llama_layout_keys_by_full_module_name_and_matches_discovery(tiny):
    model, _ = tiny
    layout = layout_for(model)
    assert layout is LAYOUTS["llama"] and layout.blocks_path(model) == "model.layers"
    names = [n for n, _ in layout.linears_of(model)]
    assert names[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"] and len(names) == 56
    assert all(model.get_submodule(n) is lin for n, lin in layout.linears_of(model))
    # the declared layout and generic discovery (execution order) agree on the bundled LLaMA
    generic = ModelLayout("generic")
    assert [n for n, _ in generic.linears_of(model)] == names
    assert [n.split(".", 1)[1] for n, _ in all_block_linears(model)] == [n.split(".", 3)[3] for n in names]
    infos = layout.layer_infos(model)
    assert infos[7].name == "model.layers.1.self_attn.q_proj" and infos[7].block == 1
    assert layout.block_part({n: i for i, n in enumerate(names)}, model, 1)["mlp.down_proj"] == 13


class _MoEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.router = nn.Linear(8, 3)
        self.experts = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(8, 16), "down": nn.Linear(16, 8)})
                                     for _ in range(3))


def test_layout_patterns_skip_and_errors():
    model = nn.Module()
    model.blocks = nn.ModuleList([_MoEBlock(), _MoEBlock()])
    layout = ModelLayout("toy-moe", blocks="blocks", linears=("attn", "router", "experts.*.up", "experts.*.down"),
                         skip=("router",))
    names = [n for n, _ in layout.linears_of(model)]
    assert names[:4] == ["blocks.0.attn", "blocks.0.experts.0.up", "blocks.0.experts.1.up", "blocks.0.experts.2.up"]
    assert len(names) == 14 and not any("router" in n for n in names)
    with pytest.raises(ValueError, match=r"layout 'toy-moe': block has no nn.Linear 'attn.q'.*LAYOUTS\['toy-moe'\]"):
        ModelLayout("toy-moe", blocks="blocks", linears=("attn.q",)).linears_of(model)
    with pytest.raises(ValueError, match="has no module 'decoder.layers'"):
        ModelLayout("toy-moe", blocks="decoder.layers").blocks_of(model)


def test_recipe_is_one_object_with_one_key():
    a = hiq.Recipe(quant={"bits": 2, "group_size": 128}, ratios={"target_avg_bits": 2.1})
    assert a.quant.bits_high == 3 and a.label() == "W2/3 g128"
    assert a.key() == hiq.Recipe.from_dict(a.to_dict()).key()
    b = hiq.Recipe(quant={"bits": 2, "group_size": 128}, ratios={"target_avg_bits": 2.15})
    assert a.key() != b.key()
    for bad, message in [({"quant": {"bits": 5}}, "bits=5 is not supported"),
                         ({"ratios": {"mode": "best"}}, "ratios.mode='best' is not supported"),
                         ({"reconstruction": {"iterations": 0}}, "reconstruction.iterations=0 must be at least 1"),
                         ({"quant": {"bits": 3, "bits_high": 2}}, "quant.bits_high=2 is below quant.bits=3"),
                         ({"ratios": {"mode": "optimal"}, "sensitivity": {"enabled": False}},
                          "ratios.mode=optimal needs the matrix M")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            hiq.Recipe(**bad)
    with pytest.raises(ValueError, match=r"unknown recipe sections \['quantizer'\]"):
        hiq.Recipe.from_dict({"quantizer": {}})


def test_one_setting_label():
    from hiq.quant.grid import QuantSpec, setting_label

    assert QuantSpec(3, 64).label == setting_label(3, 64) == "W3 g64"
    assert hiq.QuantOptions(bits=3).label() == "W3/4 per-channel"
    assert hiq.RTNOptions(bits=2, group_size=128).label() == "RTN W2 g128" and hiq.RTNOptions("none").label() == "FP"


def test_one_grid_with_short_last_groups():
    from hiq.quant.grid import QuantSpec, fake_quant_part, fake_quant_rtn

    w = torch.randn(6, 200, generator=torch.Generator().manual_seed(0))
    # full groups: the same values as the grid's RTN
    assert torch.equal(fake_quant_part(w[:, :128], 2, 64), fake_quant_rtn(w[:, :128], QuantSpec(2, 64)))
    # a short last group (200 = 3 x 64 + 8) has its own scale/zero: the same as quantizing it alone
    assert torch.equal(fake_quant_part(w, 2, 64)[:, 192:], fake_quant_rtn(w[:, 192:], QuantSpec(2, None)))
    assert torch.equal(fake_quant_part(w, 2, 64)[:, :192], fake_quant_rtn(w[:, :192], QuantSpec(2, 64)))

