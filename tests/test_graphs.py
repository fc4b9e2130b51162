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


def _full_graph(tiny_pipe, arch):
    from dcaccel.families import mmdit

    pipe = tiny_pipe(arch)
    if arch == "tiny":
        return split_unet(pipe.unet, 0)[0], graph_specs(pipe.unet, 0, BuildConfig(height=32, width=32), 2, 77)["full"]
    full, _ = mmdit.split_transformer(pipe.transformer, 1, 1)
    return full, mmdit.graph_specs(pipe.transformer, 1, 1, BuildConfig(height=32, width=32), 8, 16)["full"]


# The dynamo exporter writes its own external data file (streamed into ours); it cannot export the SD3 graphs
# (on SD3 torch.export fails), so it is tested on the U-Net, on request (its export takes minutes).
@pytest.mark.parametrize("arch, exporter", [("tiny-sd3", "torchscript"),
                                            pytest.param("tiny", "dynamo", marks=pytest.mark.slow)])
def test_external_data_export_streams_the_weights_and_keeps_the_graph(tiny_pipe, tmp_path, monkeypatch, arch,
                                                                      exporter):
    """Large models are written with their weights in one external file, streamed a tensor at a time from the
    exporter's files (not loaded into one proto): the result must be the graph an inline export gives, with
    page-aligned data, the same weight map (constants found by a second export with the parameters flipped in
    place), the parameters exactly as they were afterwards, and an ONNX Runtime session giving the same outputs."""
    import hashlib
    import shutil

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from dcaccel.graphs import onnx as graph_onnx
    from dcaccel.graphs.weights import graph_parameters, weight_map

    graph, spec = _full_graph(tiny_pipe, arch)
    before = {n: p.detach().clone() for n, p in graph_parameters(graph).items()}
    (tmp_path / "inline").mkdir()
    (tmp_path / "external").mkdir()
    inline, external = tmp_path / "inline" / "full.onnx", tmp_path / "external" / "full.onnx"
    assert graph_onnx.export_onnx(graph, spec, inline, exporter=exporter) == ["full.onnx"]
    monkeypatch.setattr(graph_onnx, "EXTERNAL_DATA_BYTES", 0)
    assert graph_onnx.export_onnx(graph, spec, external, exporter=exporter) == ["full.onnx", "full.onnx.data"]
    assert sorted(p.name for p in external.parent.iterdir()) == ["full.onnx", "full.onnx.data"]  # nothing left over

    proto = onnx.load(str(external), load_external_data=False)
    moved = [i for i in proto.graph.initializer if graph_onnx.uses_external_data(i)]
    assert moved and all(int({e.key: e.value for e in i.external_data}["offset"]) % graph_onnx.ALIGN == 0
                         for i in moved)
    a = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(inline)).graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(external)).graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    digests = {name: digest for name, _, _, digest in graph_onnx.initializer_digests(external, hashlib.sha1)}
    assert digests == {k: hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in a.items()}

    wmap_inline, wmap_external = weight_map(inline, graph, spec, exporter), weight_map(external, graph, spec, exporter)
    assert wmap_inline == wmap_external and wmap_external["initializers"]
    if arch == "tiny-sd3":  # SD3's cropped position embedding, folded from a buffer: a constant
        assert wmap_external["constants"] and not wmap_external["unmatched"]
    for n, p in graph_parameters(graph).items():  # flipped and flipped back, bit for bit
        assert torch.equal(p.detach(), before[n]), n

    # The TorchScript exporter, past 2 GB, writes every tensor to its own file, Constant nodes' values included:
    # the same layout made from the inline export, then finished as an export is.
    raw_dir, last = tmp_path / "raw", tmp_path / "last" / "full.onnx"
    raw_dir.mkdir(), last.parent.mkdir()
    onnx.save_model(onnx.load(str(inline)), str(raw_dir / "graph.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)
    raw_proto = onnx.load(str(raw_dir / "graph.onnx"), load_external_data=False)
    assert any(graph_onnx.uses_external_data(t) for t in graph_onnx._attribute_tensors(raw_proto.graph))
    assert graph_onnx.finish_export(raw_dir / "graph.onnx", last, spec)[0] == ["full.onnx", "full.onnx.data"]
    assert not any(graph_onnx.uses_external_data(t)
                   for t in graph_onnx._attribute_tensors(onnx.load(str(last), load_external_data=False).graph))

    inputs = {k: v.numpy() for k, v in spec.sample_inputs().items()}
    names = [o.name for o in ort.InferenceSession(str(inline)).get_outputs()]
    got_a = ort.InferenceSession(str(inline)).run(names, inputs)
    shutil.rmtree(raw_dir)  # nothing may still point into the exporter's files
    for other in (external, last):
        for x, y in zip(got_a, ort.InferenceSession(str(other)).run(names, inputs)):
            np.testing.assert_array_equal(x, y)


def test_constants_check_changes_zero_parameters_too(tmp_path):
    """An initializer folded from a zero-initialized parameter (adaLN-Zero, a zero convolution) must not pass for
    a constant: flipping a mantissa bit of zeros gives subnormals that `gate + 1` absorbs, so such parameters are
    changed by value (and put back from a copy). A buffer-only fold stays a constant; every parameter is restored
    bit for bit."""
    from dcaccel.graphs.onnx import export_onnx
    from dcaccel.graphs.spec import GraphSpec, TensorSpec
    from dcaccel.graphs.weights import weight_map

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Parameter(torch.zeros(8, 8))
            self.w = torch.nn.Parameter(torch.randn(8, 8))
            self.register_buffer("pos", torch.arange(64.0).reshape(8, 8))

        def forward(self, x):
            noise = x @ (self.gate + 1.0) + x @ (self.pos * 2) + x @ self.w
            return noise, noise

    graph = Toy().eval()
    before = {n: p.detach().clone() for n, p in graph.named_parameters()}
    spec = GraphSpec("full", (TensorSpec("x", (2, 8), "float32"),), (TensorSpec("noise", (2, 8), "float32"),))
    path = tmp_path / "toy.onnx"
    export_onnx(graph, spec, path)
    wmap = weight_map(path, graph, spec)
    assert len(wmap["constants"]) == 1, wmap  # pos * 2
    assert len(wmap["unmatched"]) == 1, wmap  # gate + 1: depends on gate, so no refit may keep it
    for n, p in graph.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_tensorrt_refuses_refittable_bf16_on_any_machine():
    from dcaccel.backends import tensorrt

    tensorrt.check_settings(tensorrt.Options(refittable=True), "float16")
    tensorrt.check_settings(tensorrt.Options(), "bfloat16")
    with pytest.raises(ValueError, match="refittable=True takes dtype float32 or float16"):
        tensorrt.check_settings(tensorrt.Options(refittable=True), "bfloat16")
    with pytest.raises(ValueError, match="tensorrt builds take dtype float32, float16, bfloat16, got 'int8'"):
        tensorrt.check_settings(tensorrt.Options(), "int8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_parameter_change_moves_every_value_and_is_undone_exactly(dtype):
    """The constants check's in-place change: every normal value moves by at least a quarter, zeros and
    subnormals to a normal value (whether few, most or all of a tensor), and the undo restores every bit."""
    from dcaccel.graphs.weights import _change, _restore

    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for case in ("random", "few zeros", "subnormals and zeros", "all zeros"):
        p = torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(dtype)
        if case == "few zeros":
            p[::300] = 0
        elif case == "subnormals and zeros":
            p[:5], p[5:700] = torch.finfo(dtype).tiny / 4, 0
        elif case == "all zeros":
            p.zero_()
        orig = p.clone()
        with torch.no_grad():
            undo = _change(p)
            moved = (p.float() - orig.float()).abs()
            small = orig.abs() < torch.finfo(dtype).tiny
            assert (moved[~small] >= 0.24 * orig.float().abs()[~small]).all() and (moved[small] >= 0.2).all(), case
            _restore(p, undo)
        assert torch.equal(p.view(bits), orig.view(bits)), case
