from __future__ import annotations

import pytest
import torch
from tiny_models import MLP, SmallCNN

from compressor.capture import capture_module
from compressor.errors import PassError
from compressor.graph_pass import (
    SCAFFOLD_META,
    GraphPass,
    NodeError,
    PassContext,
    PassResult,
    TapNotFound,
    node_module_path,
    order_passes,
    resolve_tap,
    run_passes,
    split_outputs,
    tapped,
)
from compressor.testing import check_pass

X = torch.randn(5, 64)


def _capture(model: torch.nn.Module, method: str = "export", x: torch.Tensor = X):
    return capture_module(model, (x,), "student", method)


def _linears(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target))


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_capture_keeps_module_paths_and_shares_parameters(method):
    model = MLP(depth=3).eval()
    gm = _capture(model, method)
    assert {node_module_path(n) for n in gm.graph.nodes} >= {"layers.0.0", "layers.2.1", "head"}
    assert {id(p) for p in gm.parameters()} <= {id(p) for p in model.parameters()}
    torch.testing.assert_close(gm(X), model(X))


def test_capture_has_a_dynamic_batch():
    model = MLP(depth=2).eval()
    gm = _capture(model)
    for batch in (1, 3, 17):
        x = torch.randn(batch, 64)
        torch.testing.assert_close(gm(x), model(x))


def test_tap_exposes_module_outputs(registry):
    model = MLP(depth=3).eval()
    tap = registry.create("graph_pass", "tap", {})
    gm = check_pass(
        tap,
        _capture(model),
        PassContext("student", ["layers.1"]),
        (X,),
        modified=True,
        node_delta=0,
    )
    output, taps = split_outputs(gm, gm(X))
    torch.testing.assert_close(taps["layers.1"], model.layers[:2](X))
    torch.testing.assert_close(output, model(X))


def test_tap_adds_recipe_nodes_and_is_a_no_op_when_all_are_present(registry):
    gm = _capture(MLP(depth=3).eval())
    tap = registry.create("graph_pass", "tap", {"nodes": ["layers.0", "head"]})
    gm = check_pass(tap, gm, PassContext("student", ["layers.2"]), (X,), modified=True)
    assert list(tapped(gm)) == ["layers.2", "layers.0", "head"]
    check_pass(tap, gm, PassContext("student", ["layers.0"]), (X,), modified=False, node_delta=0)


def test_tap_names_unknown_modules_with_what_exists():
    gm = _capture(MLP(depth=2).eval())
    with pytest.raises(TapNotFound) as info:
        resolve_tap(gm, "layers.7")
    assert "layers.1.0" in info.value.available and "head" in info.value.available


def test_truncate_teacher_runs_only_up_to_the_deepest_tap(registry):
    teacher = MLP(depth=6, dropout=0.5).train()  # dropout after the tap must go too
    gm = _capture(teacher)
    context = PassContext("teacher", ["layers.2"], output_needed=False)
    gm = run_passes(gm, [registry.create("graph_pass", "tap", {})], context)
    assert _linears(gm) == 7
    truncate = registry.create("graph_pass", "truncate_teacher", {})
    gm = check_pass(truncate, gm, context, (X,), modified=True, same_output=False)
    assert _linears(gm) == 3  # layers 0, 1, 2 of 6, no head
    assert not any(
        "dropout" in str(n.target) and node_module_path(n).startswith("layers.3")
        for n in gm.graph.nodes
    )
    assert not hasattr(gm.layers, "3") or not list(gm.layers[3].parameters())
    teacher.eval()
    gm_eval = run_passes(
        _capture(teacher), [registry.create("graph_pass", "tap", {}), truncate], context
    )
    output, taps = split_outputs(gm_eval, gm_eval(X))
    assert output is None
    torch.testing.assert_close(taps["layers.2"], teacher.layers[:3](X))


def test_truncate_teacher_leaves_a_teacher_whose_output_is_read(registry):
    gm = run_passes(
        _capture(MLP().eval()),
        [registry.create("graph_pass", "tap", {})],
        PassContext("teacher", ["layers.1"]),
    )
    truncate = registry.create("graph_pass", "truncate_teacher", {})
    check_pass(
        truncate, gm, PassContext("teacher", ["layers.1"], output_needed=True), (X,), modified=False
    )
    check_pass(
        truncate,
        gm,
        PassContext("student", ["layers.1"], output_needed=False),
        (X,),
        modified=False,
    )


def test_strip_removes_taps_and_scaffolding(registry):
    model = SmallCNN().eval()
    x = torch.randn(3, 1, 8, 8)
    gm = _capture(model, x=x)
    gm = run_passes(
        gm, [registry.create("graph_pass", "tap", {})], PassContext("student", ["features.2"])
    )
    # scaffolding as a pass like OFA would add it: a branch node that only feeds the taps
    relu = tapped(gm)["features.2"]
    with gm.graph.inserting_after(relu):
        branch = gm.graph.call_function(torch.ops.aten.mean.dim, (relu, [2, 3]))
    branch.meta[SCAFFOLD_META] = True
    out = next(n for n in gm.graph.nodes if n.op == "output")
    original, taps = out.args[0]
    out.args = ((original, {**taps, "branch": branch}),)
    gm.recompile()
    strip = registry.create("graph_pass", "strip", {})
    stripped = check_pass(strip, gm, PassContext("student"), (x,), modified=True, node_delta=-1)
    assert not tapped(stripped)
    assert not any(n.meta.get(SCAFFOLD_META) for n in stripped.graph.nodes)
    torch.testing.assert_close(stripped(x), model(x))
    check_pass(strip, _capture(model, x=x), PassContext("student"), (x,), modified=False)


def test_strip_refuses_scaffolding_that_feeds_the_student(registry):
    gm = _capture(MLP(depth=2).eval())
    next(n for n in gm.graph.nodes if "relu" in str(n.target)).meta[SCAFFOLD_META] = True
    with pytest.raises(PassError) as info:
        run_passes(gm, [registry.create("graph_pass", "strip", {})], PassContext("student"))
    message = str(info.value)
    assert "'strip'" in message and "at node 'relu'" in message and "layers.0.1" in message


class _Named(GraphPass):
    def __call__(self, gm, context):
        return PassResult(gm, False)


def _named(name: str, after: tuple[str, ...] = (), before: tuple[str, ...] = ()) -> GraphPass:
    cls = type(name, (_Named,), {"name": name, "runs_after": after, "runs_before": before})
    return cls()


def test_passes_are_ordered_by_declared_constraints():
    passes = [_named("c", after=("b",)), _named("a", before=("b",)), _named("b"), _named("d")]
    assert [p.name for p in order_passes(passes)] == ["a", "b", "c", "d"]
    with pytest.raises(PassError, match="contradictory"):
        order_passes([_named("x", after=("y",)), _named("y", after=("x",))])


def test_a_failing_pass_is_reported_with_its_name_the_passes_before_it_and_the_node(registry):
    class Broken(GraphPass):
        name = "broken"
        runs_after = ("tap",)

        def __call__(self, gm, context):
            node = next(n for n in gm.graph.nodes if "linear" in str(n.target))
            raise NodeError("cannot rewrite this", node)

    gm = _capture(MLP(depth=2).eval())
    with pytest.raises(PassError) as info:
        run_passes(
            gm,
            [Broken(), registry.create("graph_pass", "tap", {})],
            PassContext("teacher", ["layers.0"]),
        )
    message = str(info.value)
    assert "graph pass 'broken' failed on the teacher graph" in message
    assert "passes that ran before it: ['tap']" in message
    assert "at node 'linear' (layers.0.0)" in message and "cannot rewrite this" in message
