import pytest
import torch
from torch import nn

import dcaccel
from dcaccel.families.unet import feature_shape, num_branches, split_unet

from conftest import unet_inputs

ARCHS = ["tiny", "tiny-xl"]


def _branches(arch):
    return range(12 if arch == "tiny" else 9)


def _reference_skipped(unet, branch):
    """The reference's rule, written out independently: module name -> skipped on a cached step?"""
    cb, cl = divmod(branch, 3)
    skipped = {"mid_block": True}
    for bi, block in enumerate(unet.down_blocks):
        n = len(block.resnets)
        for li in range(n):
            skipped[f"down_blocks.{bi}.resnets.{li}"] = bi > cb or (bi == cb and li >= cl)
        if block.downsamplers is not None:
            skipped[f"down_blocks.{bi}.downsamplers.0"] = bi > cb or (bi == cb and n >= cl)
    nb = len(unet.up_blocks)
    for ui, block in enumerate(unet.up_blocks):
        bi, n = nb - 1 - ui, len(block.resnets)
        for j in range(n):
            li = n - 1 - j
            skipped[f"up_blocks.{ui}.resnets.{j}"] = bi > cb or (bi == cb and li > cl)
        if block.upsamplers is not None:
            skipped[f"up_blocks.{ui}.upsamplers.0"] = bi > cb
    return skipped


@pytest.fixture(scope="module")
def unets():
    from dcaccel.models import build_components

    return {arch: build_components(arch)["unet"] for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_branch_reproduces_the_unet(unets, arch):
    unet = unets[arch]
    inputs = unet_inputs(unet)
    added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}
    assert num_branches(unet) == len(_branches(arch))
    with torch.no_grad():
        ref = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                   added_cond_kwargs=added or None).sample
        for branch in _branches(arch):
            full, shallow = split_unet(unet, branch)
            noise, feature = full(**inputs)
            torch.testing.assert_close(noise, ref, rtol=0, atol=1e-6)
            torch.testing.assert_close(shallow(**inputs, feature=feature), noise, rtol=0, atol=1e-6)
            assert tuple(feature.shape) == feature_shape(unet, branch, 2, 16, 16)


@pytest.mark.parametrize("arch", ARCHS)
def test_shallow_runs_exactly_the_modules_the_reference_runs(unets, arch):
    unet = unets[arch]
    inputs = unet_inputs(unet)
    counts = {}
    modules = dict(unet.named_modules())
    names = set(_reference_skipped(unet, 0))
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: counts.__setitem__(n, counts.get(n, 0) + 1))
               for n in names]
    try:
        with torch.no_grad():
            for branch in _branches(arch):
                full, shallow = split_unet(unet, branch)
                _, feature = full(**inputs)
                assert all(counts.get(n, 0) == 1 for n in names), "the full graph runs every module once"
                counts.clear()
                shallow(**inputs, feature=feature)
                expected = _reference_skipped(unet, branch)
                ran = {n for n in names if counts.get(n, 0)}
                assert ran == {n for n, skip in expected.items() if not skip}, f"branch {branch}"
                assert "mid_block" not in ran
                counts.clear()
    finally:
        for h in handles:
            h.remove()


def test_graphs_share_weights_and_hold_no_state(unets):
    unet = unets["tiny"]
    full, shallow = split_unet(unet, 3)
    unet_ptrs = {p.data_ptr() for p in unet.parameters()}
    assert {p.data_ptr() for p in full.parameters()} == unet_ptrs
    shallow_ptrs = {p.data_ptr() for p in shallow.parameters()}
    assert shallow_ptrs < unet_ptrs, "the shallow graph holds only the shallow modules' weights"
    assert not unet._forward_hooks and not unet._forward_pre_hooks


def test_branch_out_of_range(unets):
    with pytest.raises(ValueError, match=r"branch must be an integer in 0\.\.11 .*got 12"):
        split_unet(unets["tiny"], 12)
    with pytest.raises(ValueError, match=r"0\.\.8"):
        split_unet(unets["tiny-xl"], 9)
    with pytest.raises(ValueError, match="got -1"):
        split_unet(unets["tiny"], -1)


def test_unsupported_models():
    from diffusers import UNet2DConditionModel, UNet2DModel

    with pytest.raises(TypeError, match="unsupported model Linear: dcaccel splits diffusers' UNet2DConditionModel"):
        split_unet(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="unsupported model UNet2DModel"):
        split_unet(UNet2DModel(block_out_channels=(8, 8), norm_num_groups=8, sample_size=8,
                                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2))
    odd = UNet2DConditionModel(block_out_channels=(8, 8), norm_num_groups=8, layers_per_block=1,
                               cross_attention_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
    with pytest.raises(ValueError, match="layers_per_block=2"):
        split_unet(odd)


def test_public_api():
    assert dcaccel.split_unet is split_unet
    assert callable(dcaccel.enable) and callable(dcaccel.disable)
