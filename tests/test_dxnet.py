"""DX-Net (3D) and Omnia-Net (2D): size, variants, inflation, dimensional transfer, errors, and gandlf_run."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from gandlf_dimlift.models import dxnet
from gandlf_dimlift.models.dxnet import DXNET, OMNIANET
from gandlf_dimlift.models.norms import BatchRenorm, BatchRenorm3d, BatchRenormAct3d
from gandlf_dimlift.options import ConfigError
from gandlf_dimlift.weights import WeightsError


def parameters(
    architecture: str = "dimlift_dxnet",
    problem_type: str = "segmentation",
    patch_size=(32, 32, 32),
    n_classes: int = 2,
    in_channels: int = 1,
    **options,
) -> dict:
    """A GaNDLF parameters dictionary as GaNDLF hands it to a model builder."""
    dimension = len(patch_size)
    return {
        "model": {
            "architecture": architecture,
            "dimension": dimension,
            "num_channels": in_channels,
            "class_list": list(range(n_classes)),
            "final_layer": "softmax" if problem_type != "regression" else "none",
            "norm_type": "batch",
            "pretrained": False,
            **options,
        },
        "problem_type": problem_type,
        "patch_size": list(patch_size) + [1] * (3 - dimension),
    }


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Gives every norm layer non-trivial statistics and affine parameters, so eval-mode comparisons mean something."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            module.weight.data.copy_(1 + 0.1 * torch.randn(n, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(n, generator=generator))


def conv_weights(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k: v for k, v in state.items() if k.startswith(prefix) and k.endswith("weight") and v.dim() >= 4}


def assert_inflated(w3: torch.Tensor, w2: torch.Tensor, key: str) -> None:
    """`inflate`: a conv kernel repeated along the slice axis and divided by its extent; a transposed conv whose
    kernel equals its stride (one tap per output plane) repeated undivided."""
    assert w3.dim() == w2.dim() + 1, key
    if key.endswith(".up.weight"):
        for plane in range(w3.shape[-1]):
            torch.testing.assert_close(w3[..., plane], w2, rtol=1e-5, atol=1e-6, msg=key)
    else:
        torch.testing.assert_close(w3.sum(-1), w2, rtol=1e-5, atol=1e-6, msg=key)


def save_gandlf_checkpoint(model: nn.Module, run_dir: Path, architecture: str, dimension: int) -> Path:
    """Writes what a GaNDLF run leaves: `<arch>_best.pth.tar` with `model_state_dict`, and `parameters.pkl`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"{architecture}_best.pth.tar"
    torch.save({"epoch": 0, "model_state_dict": model.state_dict()}, path)
    with open(run_dir / "parameters.pkl", "wb") as handle:
        pickle.dump({"model": {"architecture": architecture, "dimension": dimension}}, handle)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Size and variants


def test_b0_segmentation_parameter_count_is_below_20m():
    model = DXNET(parameters=parameters())
    count = n_parameters(model)
    encoder = n_parameters(model.encoder)
    print(f"dimlift_dxnet b0 segmentation (1 channel, 2 classes): {count:,} parameters ({encoder:,} in the encoder)")
    assert count < 20_000_000
    # Depthwise convs stay depthwise: a dense 3D depthwise layer would put the encoder far above 100 M.
    depthwise = [m for m in model.encoder.modules() if isinstance(m, nn.Conv3d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)


@pytest.mark.parametrize(
    "variant", [v if v < "b4" else pytest.param(v, marks=pytest.mark.slow) for v in dxnet.VARIANTS]
)
def test_every_variant_builds(variant):
    model = DXNET(parameters=parameters(variant=variant))
    name = dxnet.encoder_name("efficientnet", variant)
    import segmentation_models_pytorch as smp

    expected = smp.encoders.encoders[name]["params"]["out_channels"]
    assert tuple(model.encoder.out_channels[1:]) == tuple(expected[1:])
    if variant in ("b0", "b1", "b2", "b3"):
        model.eval()
        with torch.no_grad():
            out = model(torch.randn(1, 1, 32, 32, 32))
        assert out.shape == (1, 2, 32, 32, 32)
        assert torch.isfinite(out).all()


def test_timm_family_builds_in_3d_and_runs():
    model = DXNET(parameters=parameters(encoder_family="timm-efficientnet", problem_type="classification"))
    model.train()
    out = model(torch.randn(2, 1, 32, 32, 32))
    assert out.shape == (2, 2)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("norm_type,norm_class", [("instance", nn.InstanceNorm3d), ("none", None)])
def test_decoder_norm_follows_gandlf_norm_type(norm_type, norm_class):
    params = parameters(patch_size=(64, 32, 32))
    params["model"]["norm_type"] = norm_type
    model = DXNET(parameters=params)
    norms = [type(m) for m in model.decoder.modules() if isinstance(m, (nn.modules.batchnorm._NormBase,))]
    assert norms == ([norm_class] * 10 if norm_class else [])
    out = model(torch.randn(1, 1, 64, 32, 32))
    assert out.shape == (1, 2, 64, 32, 32) and torch.isfinite(out).all()


def test_decoder_and_head_start_from_the_efficientnet_reference_init_and_the_encoder_from_smps():
    """The 1x1 head's initial logits set how fast a softmax + Dice U-Net learns (docs/conformance.md)."""
    torch.manual_seed(0)
    model = OMNIANET(parameters=parameters("dimlift_omnianet", patch_size=(64, 64)))
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) and module.weight.numel() >= 1000:
            fan_out = module.out_channels // module.groups * module.weight[0, 0].numel()
            ratio = module.weight.std().item() / (2 / fan_out) ** 0.5
            if name.startswith(("decoder", "full_resolution")):
                assert 0.9 < ratio < 1.1, (name, ratio)
            elif name.startswith("encoder") and module.groups == 1 and module.out_channels <= module.in_channels:
                assert ratio < 0.75, f"{name}: the encoder's init was replaced ({ratio:.2f})"
    head = model.segmentation_head
    assert head.weight.abs().max() > 0.5 and not head.bias.any()


# ---------------------------------------------------------------------------------------------------------------
# Inflation


def _twins(converter_type: str, problem_type: str = "segmentation", **options):
    """A random 2D Omnia-Net with non-trivial norm statistics, and its lift to 3D."""
    spec = dxnet.ModelSpec.from_parameters(parameters(problem_type=problem_type, **options))
    resolved = DXNET.resolve({"converter_type": converter_type, "pretrained": False, **options}, 3, problem_type)
    model_2d = DXNET.make(spec.planar(), resolved, None)
    randomise_batchnorm(model_2d)
    model_3d = copy.deepcopy(model_2d)
    model_3d.dimension = 3  # as the builder sets it before the lift
    model_3d = DXNET.lift(model_3d, spec, resolved)
    return model_2d.eval(), model_3d.eval()


def test_inflate_depth_constant_volume_gives_the_2d_encoder_features():
    """Default (zero) slice padding: interior slices match the 2D encoder at every level.

    The volume is deep (192 slices) so that even at /32 the middle slice is far from the zero-padded borders;
    squeeze-excitation averages over all slices, borders included, which leaves a ~1e-5 difference.
    """
    torch.manual_seed(0)
    model_2d, model_3d = _twins("inflate")
    image = torch.randn(1, 1, 32, 32)
    volume = image[..., None].expand(1, 1, 32, 32, 192).contiguous()
    with torch.no_grad():
        features_2d = model_2d.encoder(image)
        features_3d = model_3d.encoder(volume)
    assert [f.shape[-1] for f in features_3d[1:]] == [96, 48, 24, 12, 6]
    for level, (f2, f3) in enumerate(zip(features_2d[1:], features_3d[1:], strict=True), start=1):
        interior = f3[..., f3.shape[-1] // 2]
        error = (interior - f2).abs().max().item()
        assert error <= 1e-4, f"level {level}: max error {error:.2e} (feature scale {f2.abs().max().item():.2e})"


def assert_matches_2d_on_every_slice(model_2d, model_3d, slices: int) -> list[torch.Tensor]:
    """A volume constant along the slice axis gives the 2D encoder features and output on every slice."""
    image = torch.randn(1, 1, 64, 64)
    volume = image[..., None].expand(1, 1, 64, 64, slices).contiguous()
    with torch.no_grad():
        features_2d, features_3d = model_2d.encoder(image), model_3d.encoder(volume)
        out_2d, out_3d = model_2d(image), model_3d(volume)
    for f2, f3 in zip(features_2d[1:], features_3d[1:], strict=True):
        torch.testing.assert_close(f3, f2[..., None].expand_as(f3), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_3d, out_2d[..., None].expand_as(out_3d), rtol=1e-4, atol=1e-4)
    return features_3d


def test_replicate_slice_padding_gives_the_2d_encoder_features_on_every_slice():
    torch.manual_seed(1)
    model_2d, model_3d = _twins("inflate", slice_padding="replicate")
    # The decoder is inflated too: the whole network reproduces the 2D network on every slice.
    assert_matches_2d_on_every_slice(model_2d, model_3d, slices=32)


def test_inflate_center_puts_the_2d_kernel_in_the_middle_plane():
    model_2d, model_3d = _twins("inflate_center")
    for key, w2 in conv_weights(model_2d, "").items():
        w3 = model_3d.state_dict()[key]
        if key.endswith(".up.weight"):
            # a stride-2 transposed conv has no centre form (every other plane would get no input): inflated
            assert_inflated(w3, w2, key)
            continue
        middle = w3.shape[-1] // 2
        torch.testing.assert_close(w3[..., middle], w2, msg=key)
        assert w3.abs().sum() == pytest.approx(w2.abs().sum().item(), rel=1e-5), key


def test_inflated_kernels_sum_to_the_2d_kernels_along_the_slice_axis():
    model_2d, model_3d = _twins("inflate")
    state_3d = model_3d.state_dict()
    for prefix in ("encoder.", "decoder.", "full_resolution."):
        for key, w2 in conv_weights(model_2d, prefix).items():
            assert_inflated(state_3d[key], w2, key)


# ---------------------------------------------------------------------------------------------------------------
# Anisotropic inflation


def test_anisotropic_inflation_keeps_the_slice_axis_until_the_chosen_stage():
    model = DXNET(parameters=parameters(patch_size=(64, 64, 8), slice_stride_from_stage=3)).eval()
    with torch.no_grad():
        features = model.encoder(torch.randn(1, 1, 64, 64, 8))
        out = model(torch.randn(1, 1, 64, 64, 8))
    assert [tuple(f.shape[2:]) for f in features[1:]] == [(32, 32, 8), (16, 16, 8), (8, 8, 4), (4, 4, 2), (2, 2, 1)]
    assert out.shape == (1, 2, 64, 64, 8)


@pytest.mark.parametrize("family", dxnet.ENCODER_FAMILIES)
def test_anisotropic_inflation_with_depth_constant_volume_still_matches_2d(family):
    torch.manual_seed(1)
    model_2d, model_3d = _twins("inflate", slice_stride_from_stage=4, slice_padding="replicate", encoder_family=family)
    features_3d = assert_matches_2d_on_every_slice(model_2d, model_3d, slices=8)
    assert [f.shape[-1] for f in features_3d[1:]] == [8, 8, 8, 4, 2]


# ---------------------------------------------------------------------------------------------------------------
# Dimensional transfer from weights files


def test_omnianet_checkpoint_initialises_dxnet_encoder_and_decoder(tmp_path):
    torch.manual_seed(2)
    omnianet = OMNIANET(parameters=parameters("dimlift_omnianet", patch_size=(32, 32)))
    randomise_batchnorm(omnianet)
    checkpoint = save_gandlf_checkpoint(omnianet, tmp_path / "run2d", "dimlift_omnianet", 2)
    model = DXNET(parameters=parameters(pretrained=str(checkpoint)))
    state_3d = model.state_dict()
    transferred = 0
    for prefix in ("encoder.", "full_resolution.", "decoder.", "segmentation_head."):
        for key, w2 in conv_weights(omnianet, prefix).items():
            assert_inflated(state_3d[key], w2, key)
            transferred += 1
    assert transferred == len(conv_weights(omnianet, "")) > 90  # every kernel of the 2D network
    for key, value in omnianet.state_dict().items():
        if "running_mean" in key or "running_var" in key:
            torch.testing.assert_close(state_3d[key], value)


def test_classification_checkpoint_transfers_the_encoder_only(tmp_path):
    omnianet = OMNIANET(parameters=parameters("dimlift_omnianet", "classification", patch_size=(32, 32)))
    checkpoint = save_gandlf_checkpoint(omnianet, tmp_path / "run2d", "dimlift_omnianet", 2)
    model = DXNET(parameters=parameters(pretrained=str(checkpoint)))
    for key, w2 in conv_weights(omnianet, "encoder.").items():
        assert_inflated(model.state_dict()[key], w2, key)


def test_dxnet_checkpoint_reloads_into_dxnet(tmp_path):
    source = DXNET(parameters=parameters())
    randomise_batchnorm(source)
    checkpoint = save_gandlf_checkpoint(source, tmp_path / "run3d", "dimlift_dxnet", 3)
    model = DXNET(parameters=parameters(pretrained=str(checkpoint)))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_omnianet_checkpoint_reloads_into_omnianet_with_other_classes(tmp_path):
    source = OMNIANET(parameters=parameters("dimlift_omnianet", patch_size=(32, 32)))
    randomise_batchnorm(source)
    checkpoint = save_gandlf_checkpoint(source, tmp_path / "run2d", "dimlift_omnianet", 2)
    model = OMNIANET(parameters=parameters("dimlift_omnianet", patch_size=(32, 32), n_classes=3,
                                           pretrained=str(checkpoint)))
    state = model.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith("segmentation_head."):
            assert state[key].shape != value.shape  # 3 classes: the output layer starts random
        else:
            torch.testing.assert_close(state[key], value, msg=key)


def test_encoder_state_dict_file_initialises_the_encoder(tmp_path):
    import segmentation_models_pytorch as smp

    encoder = smp.encoders.get_encoder("efficientnet-b0", in_channels=3, depth=5, weights=None)
    state = dict(encoder.state_dict())
    state["_fc.weight"] = torch.zeros(1000, 1280)  # a classifier checkpoint also holds its head
    path = tmp_path / "efficientnet_b0_2d.pth"
    torch.save(state, path)
    model = DXNET(parameters=parameters(pretrained=str(path), problem_type="classification"))
    stem_3d = model.state_dict()["encoder._conv_stem.weight"]
    torch.testing.assert_close(stem_3d.sum(-1), state["_conv_stem.weight"].sum(1, keepdim=True))
    key = "encoder._blocks.3._depthwise_conv.weight"
    torch.testing.assert_close(model.state_dict()[key].sum(-1), state[key[len("encoder."):]])


def test_imagenet_tag_loads_through_smp_cache(tmp_path, monkeypatch):
    """The real smp/torch.hub path: a file pre-placed where torch.hub caches the ImageNet checkpoint is used."""
    import os

    import segmentation_models_pytorch as smp

    url = smp.encoders.encoders["efficientnet-b0"]["pretrained_settings"]["imagenet"]["url"]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(url)
    cache.parent.mkdir(parents=True)
    torch.manual_seed(3)
    reference = smp.encoders.get_encoder("efficientnet-b0", in_channels=3, depth=5, weights=None)
    torch.save(reference.state_dict(), cache)
    model = OMNIANET(parameters=parameters("dimlift_omnianet", patch_size=(32, 32), pretrained="imagenet"))
    stem = reference.state_dict()["_conv_stem.weight"]
    torch.testing.assert_close(model.state_dict()["encoder._conv_stem.weight"], stem.sum(1, keepdim=True))
    key = "_blocks.5._project_conv.weight"
    torch.testing.assert_close(model.state_dict()[f"encoder.{key}"], reference.state_dict()[key])


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"b9.*b0.*b7"):
        DXNET(parameters=parameters(variant="b9"))


def test_patch_not_divisible_by_32_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"48.*not divisible by 32.*32 and 64"):
        DXNET(parameters=parameters(patch_size=(64, 48, 32)))
    with pytest.raises(ConfigError, match=r"40.*not divisible by 32"):
        OMNIANET(parameters=parameters("dimlift_omnianet", patch_size=(40, 64)))


def test_patch_not_divisible_by_the_anisotropic_stride_is_a_clear_error():
    # Stages 3, 4 and 5 halve the slice axis: it must be a multiple of 8.
    with pytest.raises(ConfigError, match=r"axis z.*12.*not divisible by 8.*stage 3"):
        DXNET(parameters=parameters(patch_size=(64, 64, 12), slice_stride_from_stage=3))
    DXNET(parameters=parameters(patch_size=(64, 64, 8), slice_stride_from_stage=3))


def test_noisy_student_on_the_efficientnet_family_names_the_timm_family():
    with pytest.raises(ConfigError, match=r"noisy-student.*timm-efficientnet-b0.*encoder_family"):
        DXNET(parameters=parameters(pretrained="noisy-student"))


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    from GANDLF.models import global_models_dict

    gandlf_parameters = parameters("resunet")
    gandlf_parameters["model"].update({"base_filters": 4, "amp": False})
    gandlf_parameters["batch_size"] = 1
    resunet = global_models_dict["resunet"](parameters=gandlf_parameters)
    checkpoint = save_gandlf_checkpoint(resunet, tmp_path / "resunet_run", "resunet", 3)
    with pytest.raises(ConfigError, match=r"architecture 'resunet'.*dimlift_omnianet.*dimlift_dxnet"):
        DXNET(parameters=parameters(pretrained=str(checkpoint)))


def test_3d_checkpoint_given_to_the_2d_model_is_a_clear_error(tmp_path):
    source = DXNET(parameters=parameters())
    checkpoint = save_gandlf_checkpoint(source, tmp_path / "run3d", "dimlift_dxnet", 3)
    with pytest.raises(ConfigError, match=r"3D weights.*2D model.*from 2D to 3D"):
        OMNIANET(parameters=parameters("dimlift_omnianet", patch_size=(32, 32), pretrained=str(checkpoint)))


def test_checkpoint_of_another_variant_names_the_options_to_check(tmp_path):
    omnianet = OMNIANET(parameters=parameters("dimlift_omnianet", patch_size=(32, 32), variant="b1"))
    checkpoint = save_gandlf_checkpoint(omnianet, tmp_path / "run2d", "dimlift_omnianet", 2)
    with pytest.raises(WeightsError, match=r"do not fit.*model.variant"):
        DXNET(parameters=parameters(pretrained=str(checkpoint)))


def test_one_value_per_channel_at_the_bottleneck_is_refused_with_batch_size_one():
    message = r"cannot train with patch_size \[32, 32\].*one value per channel.*\[64, 32\].*batch_size >= 2"
    with pytest.raises(ConfigError, match=message):
        OMNIANET(parameters={**parameters("dimlift_omnianet", patch_size=(32, 32)), "batch_size": 1})
    model = OMNIANET(parameters={**parameters("dimlift_omnianet", patch_size=(64, 32)), "batch_size": 1}).train()
    assert model(torch.randn(1, 1, 64, 32)).shape == (1, 2, 64, 32)
    # Anisotropic: a 16-slice patch halved only 3 times keeps 2 values along the slice axis.
    anisotropic = {**parameters(patch_size=(32, 32, 16), slice_stride_from_stage=3), "batch_size": 1}
    assert DXNET(parameters=anisotropic).train()(torch.randn(1, 1, 32, 32, 16)).shape == (1, 2, 32, 32, 16)
    with pytest.raises(ConfigError, match="one value per channel"):
        DXNET(parameters={**parameters(patch_size=(32, 32, 8), slice_stride_from_stage=3), "batch_size": 1})


def _head_inputs_of_two_inputs(model, batch: int) -> list[torch.Tensor]:
    pooled = []
    model.head.linear.register_forward_pre_hook(lambda module, args: pooled.append(args[0]))
    torch.manual_seed(0)
    model(torch.randn(batch, 1, 32, 32, 32))
    torch.manual_seed(0)
    model(3 * torch.randn(batch, 1, 32, 32, 32) + 1)
    return pooled


def _trained_statistics(tmp_path: Path, encoder_depth: int, problem_type: str = "classification", **options) -> dict:
    """DX-Net's parameters started from a 2D Omnia-Net checkpoint: trained running statistics, so the encoder keeps
    plain batch norms (a random start renormalises them)."""
    run = tmp_path / f"omnianet_{problem_type}_{encoder_depth}"
    if not run.exists():
        omnianet = OMNIANET(parameters=parameters("dimlift_omnianet", problem_type=problem_type, patch_size=(32, 32),
                                                  encoder_depth=encoder_depth, **options))
        save_gandlf_checkpoint(omnianet, run, "dimlift_omnianet", 2)
    return parameters(problem_type=problem_type, encoder_depth=encoder_depth,
                      pretrained=str(run / "dimlift_omnianet_best.pth.tar"), **options)


def test_a_classifier_whose_head_gets_only_norm_biases_is_refused_with_batch_size_one(tmp_path):
    """Past EfficientNet's stem every stage ends in batch norms with nothing after them: averaged over space, a
    batch of one sample gives the head those norms' biases whatever the input; their maximum (the default) varies."""
    deep_avg = _trained_statistics(tmp_path, 3, dropout=0.0, pooling="avg")
    averaged = _head_inputs_of_two_inputs(DXNET(parameters={**deep_avg, "batch_size": 2}).train(), 1)
    assert torch.allclose(*averaged, atol=1e-5), "the head's input depends on a batch-of-one input"
    fix = r"model.pooling: max over deepest features of more than one voxel.*batch_size >= 2"
    with pytest.raises(ConfigError, match=r"cannot learn classification with batch_size: 1.*" + fix):
        DXNET(parameters={**deep_avg, "batch_size": 1})
    with pytest.raises(ConfigError, match="cannot learn regression"):
        DXNET(parameters={**_trained_statistics(tmp_path, 3, "regression", n_classes=1, pooling="avg"),
                          "batch_size": 1})
    deep = _trained_statistics(tmp_path, 3, dropout=0.0)
    maximum = _head_inputs_of_two_inputs(DXNET(parameters={**deep, "batch_size": 1}).train(), 1)
    assert not torch.allclose(*maximum, atol=1e-3), "max pooling gave the head the same input for two inputs"
    # at a 1-voxel bottleneck (depth 5 at 32^3) the maximum is the average: refused as before
    with pytest.raises(ConfigError, match="one value per channel"):
        DXNET(parameters={**parameters(problem_type="classification"), "batch_size": 1})
    # the stem ends in a swish: one stage reaches the head with the input's own features
    stem = DXNET(parameters={**parameters(problem_type="classification", encoder_depth=1), "batch_size": 1}).train()
    assert stem(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2)


def test_a_classifier_whose_pair_reaches_the_head_mirrored_is_warned_about_at_batch_size_two(tmp_path, caplog):
    # depth 5 at 32^3: a 1-voxel bottleneck, where max pooling is the average
    paper = _trained_statistics(tmp_path, 5, dropout=0.0)
    pooled = _head_inputs_of_two_inputs(DXNET(parameters=paper).train(), 2)
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-3)
    assert torch.allclose(pooled[0].sum(0), pooled[1].sum(0), atol=1e-4), "the pair's head inputs are no mirror"
    with caplog.at_level("WARNING"):
        DXNET(parameters={**paper, "batch_size": 2})
    assert "with batch_size: 2 this classification model tells the two samples" in caplog.text
    assert "model.pooling: max over deepest features of more than one voxel" in caplog.text
    caplog.clear()
    deeper = _trained_statistics(tmp_path, 3, dropout=0.0)
    maximum = _head_inputs_of_two_inputs(DXNET(parameters=deeper).train(), 2)
    assert not torch.allclose(maximum[0].sum(0), maximum[1].sum(0), atol=1e-3), "max pooling left a mirror"
    with caplog.at_level("WARNING"):
        DXNET(parameters={**paper, "batch_size": 4})
        DXNET(parameters={**_trained_statistics(tmp_path, 1), "batch_size": 2})
        DXNET(parameters={**deeper, "batch_size": 2})
    assert "batch_size: 2" not in caplog.text
    with caplog.at_level("WARNING"):
        DXNET(parameters={**_trained_statistics(tmp_path, 3, pooling="avg"), "batch_size": 2})
    assert "with batch_size: 2 this classification model" in caplog.text


@pytest.mark.parametrize("family", dxnet.ENCODER_FAMILIES)
def test_a_random_start_trains_its_encoder_with_the_running_statistics_it_evaluates_with(family, tmp_path):
    """From random weights the encoder's batch norms (timm's norm-and-activation layers too) are renormalised
    (momentum 0.1): in training a volume's features do not depend on the other volume of its batch and equal the
    evaluation features, so even an averaged head is not refused at batch_size 1. A checkpoint's trained
    statistics keep plain batch norms."""
    options = {"problem_type": "classification", "encoder_depth": 3, "pooling": "avg", "encoder_family": family}
    model = DXNET(parameters={**parameters(**options), "batch_size": 1}).eval()
    norms = [m for m in model.encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    renorms = (BatchRenorm3d,) if family == "efficientnet" else (BatchRenorm3d, BatchRenormAct3d)
    assert norms and all(type(m) in renorms and m.momentum == 0.1 for m in norms)
    if family != "efficientnet":  # the activations timm's layers carry stay in place
        assert any(type(m) is BatchRenormAct3d and not isinstance(m.act, nn.Identity) for m in norms)
    x = torch.randn(2, 1, 32, 32, 32)
    x[0, :, 8:16, 8:16, 8:16] += 2.0
    for module in norms:  # only the norms in training mode (no drop connect): statistics away from 0 and 1
        module.train()
    with torch.no_grad():
        model(x)
        for module in norms:
            module.momentum = 0.0  # compare at fixed running statistics
        together, alone = model.encoder(x)[-1], torch.cat([model.encoder(x[i : i + 1])[-1] for i in range(2)])
        evaluated = model.eval().encoder(x)[-1]
    assert torch.allclose(together, alone, atol=1e-4) and torch.allclose(together, evaluated, atol=1e-4)
    trained = DXNET(parameters=_trained_statistics(tmp_path, 3))
    assert not [m for m in trained.modules() if isinstance(m, BatchRenorm)]


def test_encoder_depth_shrinks_the_u_net_with_the_papers_finest_decoder_widths():
    model = DXNET(parameters=parameters(encoder_depth=3)).train()
    assert len(model.decoder.stages) == 3 and model.segmentation_head.in_channels == 16
    assert model(torch.randn(2, 1, 32, 32, 32)).shape == (2, 2, 32, 32, 32)
    with pytest.raises(ConfigError, match=r"has 2 widths; the decoder needs one per encoder stage \(3.*\[64, 32, 16\]"):
        DXNET(parameters=parameters(encoder_depth=3, decoder_channels=[64, 32]))
    with pytest.raises(ConfigError, match=r"axis z .* is 36, which is not divisible by 8"):
        DXNET(parameters=parameters(encoder_depth=3, patch_size=(32, 32, 36)))


def test_a_last_batch_of_one_sample_normalises_with_the_running_statistics():
    """GaNDLF does not drop an epoch's last batch: with batch_size 2, a batch of one sample must still train."""
    model = OMNIANET(parameters={**parameters("dimlift_omnianet", patch_size=(32, 32)), "batch_size": 2}).train()
    deepest = [m for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    first = [m for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d)][0]
    before_deepest, before_first = deepest.running_mean.clone(), first.running_mean.clone()
    model(torch.randn(1, 1, 32, 32)).sum().backward()
    assert torch.equal(deepest.running_mean, before_deepest), "a 1x1 map updated the running statistics"
    assert not torch.equal(first.running_mean, before_first), "larger maps still normalise with the batch"
    assert deepest.training and model.training
    model(torch.randn(2, 1, 32, 32))
    assert not torch.equal(deepest.running_mean, before_deepest), "a batch of two normalises with its statistics"


def test_2d_input_to_the_3d_model_is_a_clear_error():
    model = DXNET(parameters=parameters(problem_type="classification"))
    with pytest.raises(ValueError, match=r"3D.*\(B, C, X, Y, Z\).*\(1, 1, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32))


# ---------------------------------------------------------------------------------------------------------------
# End to end through gandlf_run: 2D Omnia-Net, then DX-Net initialised from it, then inference


@pytest.mark.slow
def test_gandlf_run_trains_omnianet_then_transfers_it_into_dxnet_and_infers(workdir):
    from conftest import inference_outputs, run_gandlf

    from gandlf_dimlift.synthetic import make_config, write_dataset

    csv_2d = write_dataset(workdir / "slices", "segmentation", n_subjects=4, shape=(32, 32), seed=1)
    config_2d = make_config("dimlift_omnianet", "segmentation", patch_size=(32, 32), dimension=2,
                            model_options={"pretrained": False}, batch_size=2)
    output_2d = run_gandlf(config_2d, csv_2d, workdir / "omnianet_2d").stdout
    best_2d = workdir / "omnianet_2d" / "dimlift_omnianet_best.pth.tar"
    assert best_2d.is_file()
    prior = "dimlift_omnianet: the output layer's bias starts at the class shares of 2 training label maps (0: 0."
    assert prior in output_2d, output_2d[-3000:]

    csv_3d = write_dataset(workdir / "volumes", "segmentation", n_subjects=4, shape=(32, 32, 32), seed=2)
    # One training step (2 training subjects, batch 2) at a small learning rate: Adam moves each weight by at most
    # about the learning rate, so the trained 3D kernels still show where they started.
    config_3d = make_config("dimlift_dxnet", "segmentation", patch_size=(32, 32, 32),
                            model_options={"pretrained": str(best_2d)}, batch_size=2, learning_rate=1e-4)
    output = run_gandlf(config_3d, csv_3d, workdir / "dxnet_3d").stdout
    # the user sees what the 3D model starts from, in gandlf_run's own output
    told = (f"dimlift_dxnet: 3D segmentation model, initialised from {best_2d} (a dimlift_omnianet checkpoint, 2D): "
            "the whole model loaded, lifted 2D -> 3D by inflate.")
    assert told in output, output[-3000:]
    assert "bias starts at the class shares" not in output  # the checkpoint gave the output layer

    state_2d = torch.load(best_2d, map_location="cpu", weights_only=False)["model_state_dict"]
    best_3d = workdir / "dxnet_3d" / "dimlift_dxnet_best.pth.tar"
    state_3d = torch.load(best_3d, map_location="cpu", weights_only=False)["model_state_dict"]
    kernels = [k for k, v in state_2d.items() if k.endswith("weight") and v.dim() == 4]
    assert {k.split(".")[0] for k in kernels} == {"encoder", "full_resolution", "decoder", "segmentation_head"}
    moved = 0
    for key in kernels:
        w3 = state_3d[key]
        as_2d = w3[..., 0] if key.endswith(".up.weight") else w3.sum(-1)
        # a random 3D initialisation is 1e-2 to 1e-1 away from the 2D kernel; the transferred one ~1e-7 after a step
        torch.testing.assert_close(as_2d, state_2d[key], rtol=0, atol=1e-3, msg=key)
        moved += not torch.equal(as_2d, state_2d[key])
    assert moved, "the 3D run did not train"

    run_gandlf(config_3d, csv_3d, workdir / "dxnet_3d", train=False, output_dir=workdir / "dxnet_3d")
    outputs = inference_outputs(workdir / "dxnet_3d")
    assert outputs, "inference wrote nothing"
    import SimpleITK as sitk

    masks = [p for p in outputs if p.name.endswith(".nii.gz")]
    assert masks and sitk.GetArrayFromImage(sitk.ReadImage(str(masks[0]))).shape == (32, 32, 32)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["dimlift_omnianet", "dimlift_dxnet"])
def test_gandlf_exports_the_model_to_onnx(tmp_path, architecture):
    """GaNDLF exports the best model to ONNX after training (model.onnx_export defaults to true) and catches
    only RuntimeWarning there: any other export failure would end the training run."""
    import onnx
    from GANDLF.utils.modelio import optimize_and_save_model

    patch = (32, 32) if architecture == "dimlift_omnianet" else (32, 32, 32)
    options = {"slice_padding": "replicate"} if architecture == "dimlift_dxnet" else {}
    params = parameters(architecture, patch_size=patch, **options)
    model = (DXNET if len(patch) == 3 else OMNIANET)(parameters=params).eval()
    path = tmp_path / f"{architecture}_best.pth.tar"
    optimize_and_save_model(model, params, str(path))
    graph = onnx.load(str(tmp_path / f"{architecture}_best.onnx"))
    onnx.checker.check_model(graph)
    kernels = [a.ints for n in graph.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "kernel_shape"]
    assert kernels and all(len(k) == len(patch) for k in kernels)
