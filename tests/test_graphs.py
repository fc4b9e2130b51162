"""The pieces every backend shares: the one weight map behind ONNX Runtime and TensorRT refits, and the one
check against eager."""

import pytest
import torch

from dcaccel.config import BuildConfig
from dcaccel.errors import EngineError
from dcaccel.families.unet import graph_specs, split_unet
from dcaccel.graphs import verify

pytest.importorskip("onnx")


@pytest.mark.parametrize("name", ["full", "shallow"])
def test_weight_map_accounts_for_every_initializer_and_parameter(tiny_pipe, tmp_path, name):
    import onnx
    from onnx import numpy_helper

    from dcaccel.graphs.onnx import export_onnx
    from dcaccel.graphs.weights import graph_parameters, initializer_values, weight_map

    pipe = tiny_pipe()
    graph = dict(zip(("full", "shallow"), split_unet(pipe.unet, 0)))[name]
    spec = graph_specs(pipe.unet, 0, BuildConfig(height=32, width=32), 2, 77)[name]
    path = tmp_path / f"{name}.onnx"
    export_onnx(graph, spec, path)
    wmap = weight_map(path, graph)
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in onnx.load(str(path)).graph.initializer}
    assert set(wmap["initializers"]) <= set(inits) and not wmap["unmatched"]
    # Linear weights reach the ONNX graph only transposed under made-up names: the map must find them by value.
    assert any(how == "transpose" for e in wmap["initializers"].values() for _, how in e["params"])
    for init, value in initializer_values(graph, wmap).items():
        torch.testing.assert_close(value, inits[init], rtol=0, atol=0)
    # Every parameter the graph uses is refitted through some initializer (merged ones through a shared one), or
    # is recorded as held by none (a refit then refuses if it changed).
    used = {p for e in wmap["initializers"].values() for p, _ in e["params"]} | set(wmap["unmapped_params"])
    assert set(graph_parameters(graph)) <= used


def test_refit_refuses_weights_that_were_merged_and_now_differ():
    from dcaccel.graphs.weights import initializer_values

    graph = torch.nn.Module()
    graph.a, graph.b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    wmap = {"format": 3, "unmatched": [], "unmapped_params": {}, "constants": [],
            "initializers": {"onnx::Mul_1": {"shape": [4, 1, 1], "dtype": "float32",
                                             "params": [["a", "reshape"], ["b", "reshape"]]}}}
    assert initializer_values(graph, wmap)["onnx::Mul_1"].shape == (4, 1, 1)
    with torch.no_grad():
        graph.b.fill_(2.0)
    with pytest.raises(EngineError, match="equal when exported .* now differ; rebuild the engine"):
        initializer_values(graph, wmap)


def test_garbage_weight_map_is_refused_clearly(tmp_path):
    from dcaccel.graphs.weights import read_weight_map

    path = tmp_path / "full.weights.json"
    for text in ("{not json", "[]", '{"format": 1}', '{"format": 3, "initializers": {}}'):
        path.write_text(text)
        with pytest.raises(EngineError, match=r"full graph: .*rebuild the engine \(--force\)"):
            read_weight_map(path, "full graph")


def test_verify_compare_reports_and_check_raises(tiny_pipe):
    """The one compare-to-eager: an eager runner of the same graphs is exact; a runner whose shallow output is
    off is caught, and check() names the output."""
    from dcaccel.backends import eager

    pipe = tiny_pipe()
    graphs = dict(zip(("full", "shallow"), split_unet(pipe.unet, 2)))
    specs = graph_specs(pipe.unet, 2, BuildConfig(height=32, width=32), 2, 77)
    runner = eager.load(graphs, specs, eager.Options())
    reached = verify.compare(runner, graphs, specs, atol=0, rtol=0)
    assert all(e["max_abs"] == 0 and e["within"] for outs in reached.values() for e in outs.values())
    assert set(reached["full"]) == {"noise", "feature"} and set(reached["shallow"]) == {"noise"}
    original = runner.run_shallow
    runner.run_shallow = lambda inputs: original(inputs) + 1e-2
    reached = verify.compare(runner, graphs, specs, atol=1e-3, rtol=0)
    with pytest.raises(RuntimeError, match=r"differs from eager PyTorch beyond atol=0\.001.*shallow\.noise"):
        verify.check(reached, 1e-3, 0, "a test runner")
