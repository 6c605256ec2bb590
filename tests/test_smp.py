"""dimlift_smp: dimensional transfer from a real 2D GaNDLF run, offline pretrained weights, bad configs."""

from __future__ import annotations

import pytest
import torch
from conftest import run_gandlf

from gandlf_dimlift.options import ConfigError
from gandlf_dimlift.synthetic import make_config, write_dataset
from gandlf_dimlift.weights import WeightsError

SMALL = {"encoder_name": "resnet18", "encoder_depth": 3, "pretrained": False}


def build(dimension=3, problem_type="segmentation", patch=(32, 32, 32), **options):
    from GANDLF.models import get_model

    model = {"architecture": "dimlift_smp", "dimension": dimension, "num_channels": 1, "class_list": [0, 1],
             "final_layer": "none", "norm_type": "batch", **SMALL, **options}
    return get_model({"model": model, "patch_size": list(patch[:dimension]), "problem_type": problem_type})


@pytest.mark.slow
def test_2d_gandlf_checkpoint_is_inflated_into_the_3d_model(tmp_path):
    csv = write_dataset(tmp_path / "data", "segmentation", n_subjects=4, shape=(32, 32))
    config = make_config("dimlift_smp", "segmentation", patch_size=(32, 32), dimension=2, model_options=SMALL)
    model_dir = tmp_path / "run2d"
    run_gandlf(config, csv, model_dir)
    checkpoint = model_dir / "dimlift_smp_best.pth.tar"

    model_2d = build(2, pretrained=str(checkpoint)).eval()
    saved = torch.load(checkpoint, weights_only=False)["model_state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model_2d.state_dict().items())

    # A long slice axis leaves interior slices beyond the reach of the zero padding at both ends.
    model_3d = build(3, patch=(32, 32, 224), pretrained=str(checkpoint), converter_type="inflate").eval()
    assert type(model_3d.net.encoder.bn1) is torch.nn.BatchNorm3d  # a file's trained statistics: plain norms
    image = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        expected = model_2d(image)
        volume = model_3d(image[..., None].expand(-1, -1, -1, -1, 224).contiguous())
    interior = volume[..., 64:160]
    # float32 rounding grows with the output's scale (a trained checkpoint's logits reach ~30): relative bound
    assert (interior - expected[..., None]).abs().max() < 1e-5 * max(1.0, expected.abs().max().item())
    random_3d = build(3, patch=(32, 32, 224), converter_type="inflate").eval()
    with torch.no_grad():
        unrelated = random_3d(image[..., None].expand(-1, -1, -1, -1, 224).contiguous())[..., 64:160]
    assert (unrelated - expected[..., None]).abs().max() > 1e-2


def test_3d_checkpoint_is_refused_by_a_2d_model(tmp_path):
    import pickle

    run = tmp_path / "run3d"
    run.mkdir()
    model_3d = build(3)
    torch.save({"model_state_dict": model_3d.state_dict()}, run / "dimlift_smp_best.pth.tar")
    parameters = {"model": {"architecture": "dimlift_smp", "dimension": 3}}
    (run / "parameters.pkl").write_bytes(pickle.dumps(parameters))
    with pytest.raises(ConfigError, match="is a 3D checkpoint; a 2D model cannot load it"):
        build(2, pretrained=str(run / "dimlift_smp_best.pth.tar"))
    reloaded = build(3, pretrained=str(run / "dimlift_smp_best.pth.tar"))  # 3D into 3D loads as is
    assert all(torch.equal(v, model_3d.state_dict()[k]) for k, v in reloaded.state_dict().items())


def test_imagenet_tag_loads_a_file_placed_in_smps_cache(tmp_path, monkeypatch):
    import segmentation_models_pytorch as smp
    import torchvision

    url = smp.encoders.encoders["resnet18"]["pretrained_settings"]["imagenet"]["url"]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(3)
    reference = torchvision.models.resnet18().state_dict()
    torch.save(reference, cache / url.rsplit("/", 1)[1])
    model = build(3, "classification", pretrained="imagenet", converter_type="inflate")
    assert type(model.net.encoder.bn1) is torch.nn.BatchNorm3d  # trained statistics: plain batch norms
    # One input channel: smp sums the RGB kernels of the first convolution; inflate divides by the kernel depth.
    first = model.net.encoder.conv1.weight
    expected = reference["conv1.weight"].sum(1, keepdim=True)
    assert torch.allclose(first.sum(-1), expected, atol=1e-6)
    inner = model.net.encoder.layer1[0].conv1.weight.sum(-1)
    assert torch.allclose(inner, reference["layer1.0.conv1.weight"], atol=1e-6)


def test_imagenet_tag_without_network_or_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")  # nothing listens there: no network, whatever the host
    with pytest.raises(WeightsError) as error:
        build(3, "classification", pretrained="imagenet")
    message = str(error.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-5c106cde.pth") in message
    assert "pretrained:" in message and "resnet18" in message


@pytest.mark.parametrize(
    "options,patch,message",
    [
        ({}, (32, 30, 32), "patch_size axis y (index 1) is 30, which is not divisible by 8 (the encoder's total "
                           "stride 2^3) for dimlift_smp; the nearest valid sizes are 24 and 32"),
        ({"encoder_name": "resnet81"}, (32, 32, 32), "unknown smp encoder; nearest: ['resnet18'"),
        ({"pretrained": "noisy-student"}, (32, 32, 32), "is not a weight tag of resnet18; it offers ['imagenet'"),
        ({"pretrained": "/no/such/weights.pth"}, (32, 32, 32), "does not exist"),
        ({"decoder_channels": [16, 8]}, (32, 32, 32), "needs one width per encoder stage (3 integers"),
        ({"decoder_name": "fpn", "decoder_attention_type": "scse"}, (32, 32, 32), "decoder_attention_type is "
                                                                                  "supported by ['unet'"),
        ({"decoder_name": "pan"}, (128, 128, 128), "smp's pan uses all 5 encoder stages; set 5"),
        ({"decoder_name": "pan", "encoder_depth": 5}, (128, 128, 64), "too small for smp's pan"),
        ({"converter_type": "ACS3"}, (32, 32, 32), "choose one of ['acs', 'soft'"),
    ],
)
def test_bad_configs_name_the_value_and_the_fix(options, patch, message):
    with pytest.raises(ConfigError) as error:
        build(3, patch=patch, **options)
    assert message in str(error.value)


@pytest.mark.parametrize("final_layer", ["sigmoid", "softmax", "logsoftmax", "tanh", "identity", "logits", "none"])
def test_every_gandlf_final_layer(final_layer):
    model = build(3, "classification", final_layer=final_layer, converter_type="2.5d").eval()
    with torch.no_grad():
        y = model(torch.randn(2, 1, 32, 32, 32))
    raw = model.final.name
    assert raw == final_layer and y.shape == (2, 2)
    if final_layer == "softmax":
        assert torch.allclose(y.sum(1), torch.ones(2))
    if final_layer == "sigmoid":
        assert ((y > 0) & (y < 1)).all()


def test_wrong_input_dimensions_are_a_clear_error():
    model = build(3, "classification")
    with pytest.raises(ValueError, match=r"expects input \(B, C, X, Y, Z\); got shape \(1, 1, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32))


def test_classification_needs_no_divisible_patch():
    model = build(3, "classification", patch=(48, 64, 40), encoder_depth=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 48, 64, 40)).shape == (2, 2)
