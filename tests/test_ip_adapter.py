"""IP-Adapter with DeepCache on the U-Net family: at interval 1 an enabled pipeline is the plain one (bit for bit on
eager), with caching it equals the reference DeepCacheSDHelper, engines equal eager within their tolerance, and
what the graphs cannot follow is refused before anything runs. Adapters are random weights written as IP-Adapter
files and loaded with diffusers' own pipe.load_ip_adapter from a local directory."""

import pytest
import torch

import dcaccel
from dcaccel import DeepCacheConfig
from dcaccel.errors import EngineError

from conftest import ip_embeds, run_latents, write_image_encoder, write_ip_adapter


def _fresh(arch="tiny", task="text2img", controlnets=0):
    """A pipeline of its own (loading adapters changes the U-Net, so the shared, cached ones of conftest and
    test_controlnet are not used)."""
    import diffusers

    from dcaccel.models import build_pipeline

    pipe = build_pipeline(arch, task, seed=0, **({"controlnets": controlnets} if controlnets else {}))
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _load(pipe, directory, adapters=1, image_encoder=False):
    names = [write_ip_adapter(pipe.unet, directory, seed=k, name=f"ip{k}.safetensors") for k in range(adapters)]
    pipe.load_ip_adapter([str(directory)] * adapters, subfolder=[""] * adapters, weight_name=names,
                         image_encoder_folder="image_encoder" if image_encoder else None)


def _masks(images=2):
    left = torch.zeros(1, 1, 32, 32)
    left[..., :16] = 1
    return [torch.cat([left, 1 - left][:images], 1), torch.cat([1 - left, left][:images], 1)]


class _Calls:
    """Counts the text encoder's calls: a refusal 'before anything runs' leaves it at zero."""

    def __init__(self, pipe):
        self.n = 0
        self.handle = pipe.text_encoder.register_forward_pre_hook(lambda *a: setattr(self, "n", self.n + 1))


@pytest.fixture(scope="module")
def ip_pipes(tmp_path_factory):
    out = {}
    for arch in ("tiny", "tiny-xl"):
        pipe = _fresh(arch)
        out[arch] = pipe, run_latents(pipe)
        _load(pipe, tmp_path_factory.mktemp(arch), adapters=2)
        pipe.set_ip_adapter_scale([0.7, 0.4])
    return out


@pytest.mark.parametrize("arch", ["tiny", "tiny-xl"])
def test_interval_one_is_the_plain_pipeline(ip_pipes, arch):
    pipe, without = ip_pipes[arch]
    emb = ip_embeds(pipe, adapters=2)
    plain = run_latents(pipe, ip_adapter_image_embeds=emb)
    assert (plain - without).abs().max() > 1e-2  # the adapters change the image
    dcaccel.enable(pipe, DeepCacheConfig(interval=1))
    try:
        torch.testing.assert_close(run_latents(pipe, ip_adapter_image_embeds=emb), plain, rtol=0, atol=0)
        # set_ip_adapter_scale on the enabled pipeline: the eager graphs follow, per block too (InstantStyle)
        pipe.set_ip_adapter_scale([{"down": 0.0, "up": {"block_0": [1.0]}}, 0.5])
        scaled = run_latents(pipe, ip_adapter_image_embeds=emb)
        dcaccel.disable(pipe)
        torch.testing.assert_close(scaled, run_latents(pipe, ip_adapter_image_embeds=emb), rtol=0, atol=0)
        assert (scaled - plain).abs().max() > 1e-3
    finally:
        pipe.set_ip_adapter_scale([0.7, 0.4])
        if dcaccel.is_enabled(pipe):
            dcaccel.disable(pipe)


@pytest.mark.parametrize("arch,branch", [("tiny", 0), ("tiny", 4), ("tiny-xl", 2)])
def test_caching_matches_the_reference(ip_pipes, arch, branch):
    from DeepCache import DeepCacheSDHelper

    pipe, _ = ip_pipes[arch]
    emb = ip_embeds(pipe, adapters=2, images=2)  # two images per adapter
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    helper.enable()
    try:
        ref = run_latents(pipe, steps=8, ip_adapter_image_embeds=emb)
    finally:
        helper.disable()
    dcaccel.enable(pipe, DeepCacheConfig(interval=3, branch=branch))
    try:
        ours = run_latents(pipe, steps=8, ip_adapter_image_embeds=emb)
        assert dcaccel.last_stats(pipe).shallow_steps
    finally:
        dcaccel.disable(pipe)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (run_latents(pipe, steps=8, ip_adapter_image_embeds=emb) - ref).abs().max() > 1e-3  # caching did cache


def test_masks(ip_pipes):
    pipe, _ = ip_pipes["tiny"]
    emb = ip_embeds(pipe, adapters=2, images=2)
    masked = dict(ip_adapter_image_embeds=emb, cross_attention_kwargs={"ip_adapter_masks": _masks()})
    plain = run_latents(pipe, **masked)
    assert (plain - run_latents(pipe, ip_adapter_image_embeds=emb)).abs().max() > 1e-2

    calls = _Calls(pipe)
    dcaccel.enable(pipe, DeepCacheConfig(interval=1))  # graphs without mask inputs: masks are refused up front
    try:
        with pytest.raises(ValueError, match="made without mask inputs.*ip_adapter_masks=True"):
            run_latents(pipe, **masked)
        assert calls.n == 0
    finally:
        dcaccel.disable(pipe)
    dcaccel.enable(pipe, DeepCacheConfig(interval=1), ip_adapter_masks=True)
    try:
        torch.testing.assert_close(run_latents(pipe, **masked), plain, rtol=0, atol=0)
        calls.n = 0
        with pytest.raises(ValueError, match="made for masked IP-Adapters"):
            run_latents(pipe, ip_adapter_image_embeds=emb)
        assert calls.n == 0
        with pytest.raises(ValueError, match="2 tensor\\(s\\) \\(one per IP-Adapter"):
            run_latents(pipe, ip_adapter_image_embeds=emb,
                        cross_attention_kwargs={"ip_adapter_masks": [_masks()[0], None]})
        with pytest.raises(ValueError, match="only 'ip_adapter_masks'"):
            run_latents(pipe, ip_adapter_image_embeds=emb,
                        cross_attention_kwargs={"ip_adapter_masks": _masks(), "scale": 0.5})
    finally:
        dcaccel.disable(pipe)
        calls.handle.remove()

    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        ref = run_latents(pipe, steps=8, **masked)
    finally:
        helper.disable()
    dcaccel.enable(pipe, DeepCacheConfig(interval=3), ip_adapter_masks=True)
    try:
        torch.testing.assert_close(run_latents(pipe, steps=8, **masked), ref, rtol=1e-5, atol=1e-5)
    finally:
        dcaccel.disable(pipe)


def test_loading_or_unloading_after_enable_is_refused_then_enable_again_works(tmp_path):
    pipe = _fresh()
    without = run_latents(pipe)
    dcaccel.enable(pipe, DeepCacheConfig(interval=1))
    _load(pipe, tmp_path)  # diffusers' loader runs on the original U-Net while enabled
    emb = ip_embeds(pipe)
    with pytest.raises(EngineError, match=r"IP-Adapters \[\] -> \['ImageProjection'\].*disable"):
        run_latents(pipe, ip_adapter_image_embeds=emb)
    dcaccel.disable(pipe)
    plain = run_latents(pipe, ip_adapter_image_embeds=emb)
    dcaccel.enable(pipe, DeepCacheConfig(interval=1))
    torch.testing.assert_close(run_latents(pipe, ip_adapter_image_embeds=emb), plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs their image embeddings"):
        run_latents(pipe)
    pipe.unload_ip_adapter()
    with pytest.raises(EngineError, match=r"IP-Adapters \['ImageProjection'\] -> \[\]"):
        run_latents(pipe)
    dcaccel.disable(pipe)
    dcaccel.enable(pipe, DeepCacheConfig(interval=1))
    torch.testing.assert_close(run_latents(pipe), without, rtol=0, atol=0)
    dcaccel.disable(pipe)


@pytest.mark.slow  # kept out of the default run for its time (2026-12-08: the default run was 11.9 min)
def test_image_encoder_path_and_other_projections(tmp_path):
    """ip_adapter_image through the pipeline's own CLIP image encoder; IP-Adapter Plus (a sequence of image states,
    its length from the image encoder's config), Full-face and FaceID projections."""
    from PIL import Image
    from diffusers.models.embeddings import (IPAdapterFaceIDImageProjection, IPAdapterFaceIDPlusImageProjection,
                                             IPAdapterFullImageProjection, IPAdapterPlusImageProjection)

    from dcaccel.families import ip_adapter

    pipe = _fresh()
    write_image_encoder(tmp_path)
    _load(pipe, tmp_path, image_encoder=True)
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    plain = run_latents(pipe, ip_adapter_image=image)
    dcaccel.enable(pipe, DeepCacheConfig(interval=1))
    torch.testing.assert_close(run_latents(pipe, ip_adapter_image=image), plain, rtol=0, atol=0)
    dcaccel.disable(pipe)

    cross = pipe.unet.config.cross_attention_dim
    layers = pipe.unet.encoder_hid_proj.image_projection_layers
    torch.manual_seed(0)
    for layer, tail in [
        (IPAdapterPlusImageProjection(embed_dims=32, output_dims=cross, hidden_dims=32, depth=1, dim_head=8, heads=2,
                                      num_queries=4), (17, 32)),  # (32 / 8) ** 2 patches + the class token
        (IPAdapterFullImageProjection(image_embed_dim=32, cross_attention_dim=cross), (17, 32)),
        (IPAdapterFaceIDImageProjection(image_embed_dim=24, cross_attention_dim=cross, mult=1, num_tokens=4), (24,)),
    ]:
        layers[0] = layer
        assert ip_adapter.embed_tail(layer, pipe.image_encoder) == tail
        emb = [torch.randn(2, 1, *tail)]
        plain = run_latents(pipe, ip_adapter_image_embeds=emb)
        dcaccel.enable(pipe, DeepCacheConfig(interval=1))
        try:
            torch.testing.assert_close(run_latents(pipe, ip_adapter_image_embeds=emb), plain, rtol=0, atol=0,
                                       msg=type(layer).__name__)
        finally:
            dcaccel.disable(pipe)

    # FaceID Plus: the CLIP image states are set on its projection before each call (diffusers' example); they
    # become a graph input, and its v2 shortcut a graph setting
    layers[0] = face = IPAdapterFaceIDPlusImageProjection(embed_dims=32, output_dims=cross, hidden_dims=32,
                                                          id_embeddings_dim=24, depth=1, dim_head=8, heads=2,
                                                          num_tokens=4, num_queries=4, ffn_ratio=2, ffproj_ratio=2)
    assert ip_adapter.embed_tail(face) == (24,) and ip_adapter.clip_tail(face, pipe.image_encoder) == (17, 32)
    emb = [torch.randn(2, 1, 24)]
    outputs = {}
    for clip_seed, shortcut in [(1, False), (2, False), (2, True)]:
        face.clip_embeds = torch.randn(2, 1, 17, 32, generator=torch.Generator().manual_seed(clip_seed))
        face.shortcut, face.shortcut_scale = shortcut, 0.5
        plain = run_latents(pipe, ip_adapter_image_embeds=emb)
        dcaccel.enable(pipe, DeepCacheConfig(interval=1))
        try:
            torch.testing.assert_close(run_latents(pipe, ip_adapter_image_embeds=emb), plain, rtol=0, atol=0)
        finally:
            dcaccel.disable(pipe)
        outputs[clip_seed, shortcut] = plain
    assert (outputs[1, False] - outputs[2, False]).abs().max() > 1e-4  # the CLIP states reach the image
    assert (outputs[2, False] - outputs[2, True]).abs().max() > 1e-4   # and so does the shortcut
    face.clip_embeds = None
    dcaccel.enable(pipe, DeepCacheConfig(interval=1))
    try:
        with pytest.raises(ValueError, match="FaceID Plus and its projection has no clip_embeds"):
            run_latents(pipe, ip_adapter_image_embeds=emb)
    finally:
        dcaccel.disable(pipe)


def test_unsupported_projection_is_refused_with_the_supported_ones(tmp_path):
    pipe = _fresh()
    _load(pipe, tmp_path)
    pipe.unet.encoder_hid_proj.image_projection_layers[0] = torch.nn.Linear(32, 32)
    with pytest.raises(ValueError, match=r"IP-Adapter image projections \['Linear'\] \(supported: "):
        dcaccel.enable(pipe, DeepCacheConfig(interval=1))
    assert not dcaccel.is_enabled(pipe)


def test_onnxruntime_engine_with_masks_equals_eager_and_records_the_adapter(tmp_path):
    pytest.importorskip("onnxruntime")
    from dcaccel.config import BuildConfig
    from dcaccel.engines import build_engines

    pipe = _fresh()
    _load(pipe, tmp_path / "ip", adapters=2)
    pipe.set_ip_adapter_scale([0.7, 0.4])
    emb = ip_embeds(pipe, adapters=2, images=2)
    masked = dict(ip_adapter_image_embeds=emb, cross_attention_kwargs={"ip_adapter_masks": _masks()})
    dcaccel.enable(pipe, DeepCacheConfig(interval=3), ip_adapter_masks=True)
    eager = run_latents(pipe, **masked)
    dcaccel.disable(pipe)

    build = BuildConfig(height=32, width=32, backend="onnxruntime", ip_adapter_images=2, ip_adapter_masks=True)
    directory, _ = build_engines(pipe, build, out_dir=tmp_path / "engines", model_name="tiny-ip")
    dcaccel.enable(pipe, DeepCacheConfig(interval=3), backend="onnxruntime", engine_dir=directory)
    try:
        torch.testing.assert_close(run_latents(pipe, **masked), eager, rtol=1e-4, atol=1e-4)
        pipe.set_ip_adapter_scale([0.2, 0.9])  # a constant of the engine: refused, never ignored
        with pytest.raises(EngineError, match="settings changed after dcaccel.enable \\(ip_adapter"):
            run_latents(pipe, **masked)
        pipe.set_ip_adapter_scale([0.7, 0.4])
        with pytest.raises(ValueError, match="ip_image_embeds_0: got \\(2, 1, 32\\), built for \\(2, 2, 32\\)"):
            run_latents(pipe, ip_adapter_image_embeds=ip_embeds(pipe, adapters=2, images=1),
                        cross_attention_kwargs={"ip_adapter_masks": _masks(images=1)})
    finally:
        dcaccel.disable(pipe)
    # the engine records the adapters: the scales and the weights
    pipe.set_ip_adapter_scale([0.5, 0.4])
    with pytest.raises(EngineError, match="model_config.ip_adapter"):
        dcaccel.enable(pipe, DeepCacheConfig(interval=3), backend="onnxruntime", engine_dir=directory)
    pipe.set_ip_adapter_scale([0.7, 0.4])
    with torch.no_grad():
        pipe.unet.encoder_hid_proj.image_projection_layers[1].image_embeds.weight.mul_(1.01)
    with pytest.raises(EngineError, match="weights_hash"):
        dcaccel.enable(pipe, DeepCacheConfig(interval=3), backend="onnxruntime", engine_dir=directory)
    assert not dcaccel.is_enabled(pipe)


@pytest.mark.parametrize("arch,branch", [("tiny", 0), pytest.param("tiny-xl", 2, marks=pytest.mark.slow)])
def test_controlnet_pipeline(tmp_path, arch, branch):
    """IP-Adapter on the U-Net of a ControlNet pipeline (the ControlNet reads no image states): plain at interval 1,
    the reference helper with caching, and masks."""
    from DeepCache import DeepCacheSDHelper

    from test_controlnet import run

    from dcaccel.families.controlnet import ControlledUNet, controlnets_of, split_controlled

    pipe = _fresh(arch, controlnets=1)
    _load(pipe, tmp_path, adapters=2)
    emb = ip_embeds(pipe, adapters=2, images=2)
    kw = dict(ip_adapter_image_embeds=emb)
    plain = run(pipe, **kw)
    assert (plain - run(pipe, ip_adapter_image_embeds=[e * 0 for e in emb])).abs().max() > 1e-3
    # the graphs' settings (what torch_compile's refit compares) carry the adapters' scales
    model = ControlledUNet(pipe.unet, controlnets_of(pipe.controlnet))
    before = [g.graph_settings for g in split_controlled(model, branch)]
    pipe.set_ip_adapter_scale([0.3, 0.8])
    after = [g.graph_settings for g in split_controlled(model, branch)]
    pipe.set_ip_adapter_scale([1.0, 1.0])
    assert before[0]["ip_adapter"]["scales"] == [1.0, 1.0] and after[0]["ip_adapter"]["scales"] == [0.3, 0.8]
    assert before == [before[0]] * 2 and after == [after[0]] * 2
    dcaccel.enable(pipe, DeepCacheConfig(interval=1))
    try:
        torch.testing.assert_close(run(pipe, **kw), plain, rtol=0, atol=0)
    finally:
        dcaccel.disable(pipe)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    helper.enable()
    try:
        ref = run(pipe, steps=8, **kw)
    finally:
        helper.disable()
    dcaccel.enable(pipe, DeepCacheConfig(interval=3, branch=branch))
    try:
        torch.testing.assert_close(run(pipe, steps=8, **kw), ref, rtol=1e-5, atol=1e-5)
        assert dcaccel.last_stats(pipe).shallow_steps
    finally:
        dcaccel.disable(pipe)
    masked = dict(kw, cross_attention_kwargs={"ip_adapter_masks": _masks()})
    plain = run(pipe, **masked)
    assert (plain - run(pipe, **kw)).abs().max() > 1e-3  # the masks matter here too
    dcaccel.enable(pipe, DeepCacheConfig(interval=1), ip_adapter_masks=True)
    try:
        torch.testing.assert_close(run(pipe, **masked), plain, rtol=0, atol=0)
    finally:
        dcaccel.disable(pipe)


@pytest.mark.slow  # about a minute of compiling
def test_torch_compile_equals_eager_and_follows_a_scale_change(tmp_path):
    from dcaccel.backends.torch_compile import TOLERANCE

    pipe = _fresh()
    _load(pipe, tmp_path, adapters=2)
    pipe.set_ip_adapter_scale([0.7, 0.4])
    emb = ip_embeds(pipe, adapters=2)
    dcaccel.enable(pipe, DeepCacheConfig(interval=3))
    eager = run_latents(pipe, ip_adapter_image_embeds=emb)
    pipe.set_ip_adapter_scale([0.2, 0.9])
    eager_scaled = run_latents(pipe, ip_adapter_image_embeds=emb)
    pipe.set_ip_adapter_scale([0.7, 0.4])
    dcaccel.disable(pipe)
    rtol, atol = TOLERANCE["float32"]
    dcaccel.enable(pipe, DeepCacheConfig(interval=3), backend="torch_compile", height=32, width=32)
    try:
        torch.testing.assert_close(run_latents(pipe, ip_adapter_image_embeds=emb), eager, rtol=rtol, atol=atol)
        pipe.set_ip_adapter_scale([0.2, 0.9])  # compiled again with the new scales
        torch.testing.assert_close(run_latents(pipe, ip_adapter_image_embeds=emb), eager_scaled, rtol=rtol,
                                   atol=atol)
    finally:
        pipe.set_ip_adapter_scale([0.7, 0.4])
        dcaccel.disable(pipe)


def _cli(*args, cwd):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    command = ([str(root / "build_scripts" / "build.py"), *args[1:]] if args[0] == "build.py"
               else ["-m", "dcaccel.cli", *args])
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(root)})


@pytest.mark.slow  # four processes, an ONNX Runtime build: about 70 s
def test_build_script_and_generate_in_separate_processes(tmp_path):
    """As users run it: an IP-Adapter file with its image encoder beside it (h94/IP-Adapter's layout), engines built
    by build_scripts/build.py in one process, `dcaccel generate` with an image prompt loading them in others."""
    from PIL import Image

    from dcaccel.models import build_pipeline

    models = tmp_path / "models"
    name = write_ip_adapter(build_pipeline("tiny", seed=0).unet, models)
    write_image_encoder(models)
    Image.new("RGB", (48, 40), (30, 200, 60)).save(tmp_path / "style.png")
    adapter = f"{models / name}:0.6"
    built = _cli("build.py", "--model", "tiny", "--height", "32", "--width", "32", "--backend", "onnxruntime",
                 "--ip-adapter", adapter, "--out", "engines", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    engine = next((tmp_path / "engines" / "tiny").iterdir())
    import json

    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["geometry"]["ip_adapter_embeds"] == [[32]]
    assert manifest["model_config"]["ip_adapter"] == {"adapters": ["ImageProjection"], "scales": [0.6]}
    assert manifest["build"]["ip_adapter_images"] == 1 and manifest["build"]["ip_adapter_masks"] is False
    run = _cli("generate", "--model", "tiny", "--steps", "6", "--ip-adapter", adapter, "--ip-adapter-image",
               "style.png", "--backend", "onnxruntime", "--engine-dir", str(engine), "--baseline", "-o", "a.png",
               cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "2 full + 4 shallow U-Net evaluations" in run.stdout
    # the same engine, the same call without DeepCache's caching: the plain pipeline within ONNX Runtime's tolerance
    exact = _cli("generate", "--model", "tiny", "--steps", "6", "--interval", "1", "--ip-adapter", adapter,
                 "--ip-adapter-image", "style.png", "--backend", "onnxruntime", "--engine-dir", str(engine),
                 "--baseline", "-o", "b.png", cwd=tmp_path)
    assert exact.returncode == 0, exact.stderr
    import re

    assert int(re.search(r"max \|diff\| (\d+) of 255", exact.stdout).group(1)) <= 1, exact.stdout
    # another scale than the engine was built with: refused, naming the field, one line, exit 2
    other = _cli("generate", "--model", "tiny", "--steps", "6", "--ip-adapter", f"{models / name}:0.5",
                 "--ip-adapter-image", "style.png", "--backend", "onnxruntime", "--engine-dir", str(engine),
                 "-o", "c.png", cwd=tmp_path)
    assert other.returncode == 2 and "model_config.ip_adapter" in other.stderr, other.stderr
    assert not (tmp_path / "c.png").exists()


def test_cli_refuses_bad_ip_adapter_arguments_before_loading(tmp_path, capsys):
    from dcaccel.cli import main

    assert main(["generate", "--model", "tiny", "--ip-adapter", str(tmp_path / "none.safetensors")]) == 2
    assert "one --ip-adapter-image per --ip-adapter" in capsys.readouterr().err
    (tmp_path / "a.png").write_bytes(b"not an image")
    assert main(["generate", "--model", "tiny", "--ip-adapter", str(tmp_path / "none.safetensors"),
                 "--ip-adapter-image", str(tmp_path / "a.png")]) == 2
    assert "--ip-adapter-image" in capsys.readouterr().err
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    assert main(["generate", "--model", "tiny", "--ip-adapter", str(tmp_path / "none.safetensors"),
                 "--ip-adapter-image", str(tmp_path / "b.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["build", "--model", "tiny", "--ip-adapter-masks", "--out", str(tmp_path / "e")]) == 2
    assert "give --ip-adapter" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


@pytest.mark.slow  # an ONNX Runtime build: about 30 s
def test_faceid_plus_clip_states_are_an_engine_input(tmp_path):
    """FaceID Plus's CLIP states (set on its projection per call) reach an ONNX Runtime engine as an input, not as a
    constant baked at export: the engine equals eager, and new states change its output."""
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

    pipe = _fresh()
    _load(pipe, tmp_path)
    torch.manual_seed(0)
    face = IPAdapterFaceIDPlusImageProjection(embed_dims=32, output_dims=pipe.unet.config.cross_attention_dim,
                                              hidden_dims=32, id_embeddings_dim=24, depth=1, dim_head=8, heads=2,
                                              num_tokens=4, num_queries=4, ffn_ratio=2, ffproj_ratio=2)
    pipe.unet.encoder_hid_proj.image_projection_layers[0] = face
    emb = [torch.randn(2, 1, 24)]
    states = [torch.randn(2, 1, 257, 32) for _ in range(2)]  # no image encoder: CLIP ViT-H's 257 tokens
    eager = []
    dcaccel.enable(pipe, DeepCacheConfig(interval=3))
    for s in states:
        face.clip_embeds = s
        eager.append(run_latents(pipe, ip_adapter_image_embeds=emb))
    dcaccel.disable(pipe)
    assert (eager[0] - eager[1]).abs().max() > 1e-3
    dcaccel.enable(pipe, DeepCacheConfig(interval=3), backend="onnxruntime", height=32, width=32)
    try:
        for s, expected in zip(states, eager):
            face.clip_embeds = s
            torch.testing.assert_close(run_latents(pipe, ip_adapter_image_embeds=emb), expected, rtol=1e-4, atol=1e-4)
    finally:
        dcaccel.disable(pipe)


def test_controlnet_graphs_hand_faceid_plus_clip_states_to_the_unet(tmp_path):
    """The ControlNet graphs pass every IP-Adapter input on to the U-Net, FaceID Plus's CLIP states included (an
    export would otherwise bake the projection's attribute as a constant); a graph call without them is refused."""
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

    from dcaccel.families import ip_adapter
    from test_controlnet import run

    pipe = _fresh("tiny", controlnets=1)
    _load(pipe, tmp_path)
    torch.manual_seed(0)
    face = IPAdapterFaceIDPlusImageProjection(embed_dims=32, output_dims=pipe.unet.config.cross_attention_dim,
                                              hidden_dims=32, id_embeddings_dim=24, depth=1, dim_head=8, heads=2,
                                              num_tokens=4, num_queries=4, ffn_ratio=2, ffproj_ratio=2)
    pipe.unet.encoder_hid_proj.image_projection_layers[0] = face
    emb = [torch.randn(2, 1, 24)]
    face.clip_embeds = torch.randn(2, 1, 17, 32)
    plain = run(pipe, ip_adapter_image_embeds=emb)
    dcaccel.enable(pipe, DeepCacheConfig(interval=1))
    try:
        torch.testing.assert_close(run(pipe, ip_adapter_image_embeds=emb), plain, rtol=0, atol=0)
    finally:
        dcaccel.disable(pipe)
    cond = ip_adapter.ImageConditioning(pipe.unet)
    with pytest.raises(ValueError, match=r"lacks \['ip_clip_embeds_0'\]"):
        cond(torch.zeros(2, 7, 32), {"ip_image_embeds_0": emb[0]})
    inputs = {"ip_image_embeds_0": 1, "ip_clip_embeds_0": 2, "ip_adapter_mask_0": 3, "control_cond_0": 4}
    assert ip_adapter.ip_inputs(inputs) == {"ip_image_embeds_0": 1, "ip_clip_embeds_0": 2, "ip_adapter_mask_0": 3}
