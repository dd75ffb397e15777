"""What a timm user does to a model works on vitkit's, with timm's results on the same weights (issue 21):
PEFT LoRA, dynamic quantization, double backward and torch.func, timm's model API and its model checks."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.optim import create_optimizer_v2
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchvision.io import decode_image
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from vitkit.bench.reference import reference_twin
from vitkit.data.transforms import eval_transform
from vitkit.models import build_registered
from vitkit.models.registry import _ARCHITECTURES, get_model_entry

peft = pytest.importorskip("peft")

MINI = dict(depth=2)  # vit_mini_patch4_32 (D 128, 2 heads) cut to two blocks: every check stays cheap


def cifar_batch(data_root, n: int = 4) -> torch.Tensor:
    with np.load(data_root / "cifar10" / "test.npz") as f:
        images = torch.from_numpy(f["images"][:n]).permute(0, 3, 1, 2).float() / 255
    return (images - 0.5) / 0.5


@pytest.fixture
def mini():
    return build_registered("vit_mini_patch4_32", **MINI).eval()


# ------------------------------------------------------------------------------------------- PEFT
@pytest.mark.parametrize(("targets", "wrapped"), [
    (["qkv", "proj", "fc1", "fc2"], 9),  # 4 per block, and patch_embed.proj (a Conv2d, as in timm)
    ("all-linear", 9),  # every Linear, the head included (peft spares only a transformers model's output layer)
    (["fc1"], 2),
])
def test_lora_adapters_are_all_used_and_merge_exactly(mini, targets, wrapped, data_root, one_thread):
    """Every LoRA tensor gets a gradient, and the adapter model computes what its merged weights compute."""
    images = cifar_batch(data_root)
    model = peft.get_peft_model(mini, peft.LoraConfig(target_modules=targets, r=4, init_lora_weights=False))
    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert len(lora) == 2 * wrapped  # A and B per wrapped layer
    model.train()
    model(images).logsumexp(-1).sum().backward()
    starved = [name for name, p in lora.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert starved == []
    model.eval()
    with torch.no_grad():
        adapted = model(images)
        merged = model.merge_and_unload()(images)
    torch.testing.assert_close(adapted, merged, rtol=0, atol=1e-5)


def test_lora_model_equals_timm_lora_on_the_same_weights(mini, data_root, one_thread):
    images = cifar_batch(data_root)
    reference = reference_twin(mini).eval()
    config = peft.LoraConfig(target_modules=["qkv", "proj", "fc1", "fc2"], r=4, init_lora_weights=False)
    torch.manual_seed(1)
    ours = peft.get_peft_model(mini, copy.deepcopy(config))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(reference, copy.deepcopy(config))
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ quantization
def _quantize(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice (its successor is torchao)
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def _serialised_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _quantized_linears(model: nn.Module) -> int:
    return sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())


def test_quantize_dynamic_quantizes_every_linear_like_timm(mini, data_root, one_thread):
    images = cifar_batch(data_root)
    reference = reference_twin(mini).eval()
    linears = sum(type(m) is nn.Linear for m in mini.modules())
    assert linears == 2 * 4 + 1  # qkv, proj, fc1, fc2 per block, and the head
    ours, theirs = _quantize(mini), _quantize(reference)
    assert _quantized_linears(ours) == _quantized_linears(theirs) == linears
    assert not any(type(m) is nn.Linear for m in ours.modules())
    assert abs(_serialised_bytes(ours) - _serialised_bytes(theirs)) < 0.02 * _serialised_bytes(theirs)
    assert _serialised_bytes(ours) < 0.5 * _serialised_bytes(mini)
    with torch.no_grad():
        logits, reference_logits, float_logits = ours(images), theirs(images), mini(images)
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=1e-4)
    assert not torch.equal(logits, float_logits)  # the quantized layers really run


# --------------------------------------------------------------------------- higher-order autograd
def test_double_backward_equals_timm(mini, data_root, one_thread):
    """A gradient penalty (create_graph=True) runs through vitkit's fast linear path and equals timm's. The
    default CPU attention kernel has no double backward in PyTorch (timm stops there too), so both run
    under the math kernel."""
    images = cifar_batch(data_root)
    reference = reference_twin(mini)
    grads = []
    for model in (mini, reference):
        x = images.clone().requires_grad_()
        with sdpa_kernel(SDPBackend.MATH):
            g, = torch.autograd.grad(model(x).logsumexp(-1).sum(), x, create_graph=True)
            g.pow(2).sum().backward()
        grads.append((x.grad, model.blocks[0].mlp.fc1.weight.grad))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_per_sample_gradients_with_torch_func_equal_timm(mini, data_root, one_thread):
    images = cifar_batch(data_root, n=3)
    reference = reference_twin(mini)
    results = []
    for model in (mini, reference):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, image, model=model):
            return torch.func.functional_call(model, p, (image[None],)).logsumexp(-1).sum()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no batching rule" notices for the attention kernels
            results.append(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, images))
    for name in ("blocks.0.mlp.fc1.weight", "blocks.1.attn.qkv.weight", "head.weight"):
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------- timm's model checks
# One small model per registered family (and per way of turning images into tokens). timm's own test suite
# (tests/test_models.py) runs these checks over its models: forward, backward, default config and classifier
# reset, forward_intermediates and features_only, TorchScript, FX, channels-last, dynamic size.
CLASSIFIERS = {
    "vit": ("vit_mini_patch4_32", dict(depth=2)),
    "vit hybrid (BiT stem)": ("vit_hybrid_cifar_32", dict(depth=2)),
    "vit conv stem": ("vit_convstem_cifar_d4_32", dict(depth=2)),
    "t2t performer": ("t2t_vit_mini_32", dict(depth=2)),
    "t2t transformer": ("t2t_vit_t_mini_32", dict(depth=2)),
}
ALL_FAMILIES = {**CLASSIFIERS, "mae": ("mae_vit_mini_patch4_32", dict(depth=2)), "resnet": ("resnet20_cifar", {})}


def test_the_checks_cover_every_registered_architecture():
    covered = {get_model_entry(name).architecture for name, _ in ALL_FAMILIES.values()}
    assert covered == set(_ARCHITECTURES)


def _build(family: str) -> nn.Module:
    name, overrides = ALL_FAMILIES[family]
    return build_registered(name, **overrides).eval()


def _images(model: nn.Module, data_root, n: int = 2) -> torch.Tensor:
    images = cifar_batch(data_root, n)
    return images[:, :1] if model.config.in_chans == 1 else images


def _out(model: nn.Module, images: torch.Tensor, **kwargs) -> torch.Tensor:
    """The model's output tensor (an MAE's forward returns (loss, pred, mask): its predictions)."""
    out = model(images, **kwargs)
    return out[1] if isinstance(out, tuple) else out


def _noise(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    return torch.rand(images.shape[0], model.grid_size[0] * model.grid_size[1])


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_forward_backward(family, data_root, one_thread):
    model = _build(family).train()
    images = _images(model, data_root)
    out = model(images, noise=_noise(images, model)) if family == "mae" else model(images)
    loss = out[0] if family == "mae" else out.logsumexp(-1).sum()
    if family != "mae":
        assert out.shape == (2, model.config.num_classes)
    assert torch.isfinite(loss)
    loss.backward()
    # every trained tensor is reached (a zero-initialised residual norm may leave its branch's gradient at 0)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize("family", CLASSIFIERS)
def test_default_cfg_classifier_reset_and_features(family, data_root, one_thread):
    model = _build(family)
    images = _images(model, data_root)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (model.config.in_chans, *model.config.image_hw)
    assert cfg["num_classes"] == model.num_classes == model.config.num_classes
    assert model.get_classifier() is model.head and cfg["classifier"] == "head"
    assert model.default_cfg == cfg
    first_conv = model.get_submodule(cfg["first_conv"])
    assert isinstance(first_conv, (nn.Conv2d, nn.Linear))
    with torch.no_grad():
        tokens = model.forward_features(images)
        assert tokens.shape[-1] == model.num_features
        model.reset_classifier(0)
        assert model(images).shape == (2, model.head_hidden_size)
        model.reset_classifier(7)
        assert model(images).shape == (2, 7) and model.num_classes == 7
        model.reset_classifier(3, global_pool="avg")
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 1:].mean(1))
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="map")  # attention pooling is built, not added later


@pytest.mark.parametrize("family", CLASSIFIERS)
def test_forward_intermediates_and_features_only(family, data_root, one_thread):
    model = _build(family)
    images = _images(model, data_root)
    info = model.feature_info
    assert len(info) == len(model.blocks)
    with torch.no_grad():
        final, maps = model.forward_intermediates(images)  # timm's defaults: every block, NCHW
        torch.testing.assert_close(final, model.forward_features(images))
        for m, channels, reduction in zip(maps, info.channels(), info.reduction(), strict=True):
            assert m.shape == (2, channels, 32 // reduction, 32 // reduction)
        features = build_registered(ALL_FAMILIES[family][0], **ALL_FAMILIES[family][1], features_only=True,
                                out_indices=(0, 1)).eval()
        features.model.load_state_dict(model.state_dict(), strict=False)  # the pruned model: blocks 0-1, no head
        got = features(images)
    assert [f.shape for f in got] == [m.shape for m in maps]
    for a, b in zip(got, maps):
        torch.testing.assert_close(a, b)
    assert features.feature_info.module_name() == ["blocks.0", "blocks.1"]
    assert not hasattr(features.model, "head") or isinstance(features.model.head, nn.Identity)


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f != "resnet"])
def test_torchscript(family, data_root, one_thread):
    model = _build(family)
    images = _images(model, data_root)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        if family == "mae":
            noise = _noise(images, model)
            torch.testing.assert_close(scripted(images, None, noise)[1], model(images, noise=noise)[1])
        else:
            torch.testing.assert_close(scripted(images), model(images))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fx_feature_extraction(family, data_root, one_thread):
    model = _build(family)
    images = _images(model, data_root)
    _, nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(model, return_nodes={nodes[-1]: "out"})
    if family == "mae":
        noise = _noise(images, model)
        with torch.no_grad():  # FX turns every argument into an input: the mask ratio is given, not defaulted
            torch.testing.assert_close(extractor(images, 0.75, noise)["out"], model(images, noise=noise)[0])
        return
    with torch.no_grad():
        torch.testing.assert_close(extractor(images)["out"], model(images))
    if family in CLASSIFIERS:
        blocks = create_feature_extractor(model, return_nodes={"blocks.0": "first"})
        with torch.no_grad():
            torch.testing.assert_close(blocks(images)["first"], model.blocks[0](model.embed(images)))
    extractor.train()
    extractor(images)["out"].sum().backward()  # and it trains
    assert all(p.grad is not None for p in extractor.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_channels_last_input(family, data_root, one_thread):
    model = _build(family)
    images = _images(model, data_root)
    kwargs = {"noise": _noise(images, model)} if family == "mae" else {}
    with torch.no_grad():
        torch.testing.assert_close(_out(model, images.contiguous(memory_format=torch.channels_last), **kwargs),
                                   _out(model, images, **kwargs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", [f for f in CLASSIFIERS if "stem" not in f])
def test_dynamic_img_size(family, data_root, one_thread):
    name, overrides = CLASSIFIERS[family]
    fixed = build_registered(name, **overrides).eval()
    dynamic = build_registered(name, **overrides, dynamic_img_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())
    images = _images(fixed, data_root)
    larger = nn.functional.interpolate(images, size=(48, 40), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(images), fixed(images))
        assert dynamic(larger).shape == (2, fixed.config.num_classes)
        with pytest.raises(ValueError, match="size"):
            fixed(larger)
        # at 48x40, the dynamic model computes what a model rebuilt for that size computes
        fixed.set_input_size((48, 40))
        torch.testing.assert_close(dynamic(larger), fixed(larger), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ timm's helpers on the model
def _photo(data_root):
    """A real photo of another size and aspect ratio than the model's input."""
    folder = data_root / "imagenette_subset" / "val"
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))[0]


@pytest.mark.parametrize(("name", "preprocess"), [
    ("vit_mini_patch4_32", None),  # no record: vitkit's default ([-1, 1], no crop, bilinear)
    ("vit_mini_patch4_32", dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], crop_pct=0.875,
                                interpolation="bicubic")),
    ("t2t_vit_mini_32", dict(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], crop_pct=0.9)),
    ("vit_mini_patch4_32", dict(crop_pct=0.9, crop_mode="squash")),  # transformers' resize of both sides
])
def test_timm_data_config_and_transform_reproduce_the_record(name, preprocess, data_root):

    overrides = {"img_size": 48} if preprocess is None else {"img_size": 48, "preprocess": preprocess}
    model = build_registered(name, **overrides)
    record = model.config.preprocessing()
    config = resolve_data_config({}, model=model)
    assert config == {"input_size": (3, 48, 48), "interpolation": record.interpolation, "mean": record.mean,
                      "std": record.std, "crop_pct": record.crop_pct, "crop_mode": record.crop_mode}
    photo = _photo(data_root)
    theirs = create_transform(**config)(Image.open(photo).convert("RGB"))
    ours = eval_transform(model.config)(decode_image(str(photo)))  # the same decoded pixels
    assert theirs.shape == ours.shape == (3, 48, 48)
    # PIL's and torchvision's antialiased resizes agree to about a grey level (0.02 here is 1-2 levels of 255)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0.02)


@pytest.mark.parametrize("overrides", [{}, {"global_pool": "avg", "fc_norm": True}])
def test_layer_decay_groups_equal_timm(overrides):
    model = build_registered("vit_mini_patch4_32", depth=3, **overrides)
    reference = reference_twin(model)

    def groups(m: nn.Module) -> dict[str, tuple[float, float]]:
        names = {id(p): n for n, p in m.named_parameters()}
        optimizer = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
        return {names[id(p)]: (round(g["lr_scale"], 9), g["weight_decay"])
                for g in optimizer.param_groups for p in g["params"]}

    ours = groups(model)
    assert ours == groups(reference)
    scales = sorted({scale for scale, _ in ours.values()})
    assert len(scales) == 3 + 2 and scales[-1] == 1.0  # embedding, 3 blocks, head: decayed layer by layer
    assert ours["pos_embed"][1] == 0.0 and ours["blocks.0.attn.qkv.weight"][1] == 0.05


@pytest.mark.parametrize("pool", ["", "token", "avg", "max", "avgmax", "map"])
def test_global_pool_equals_timm(pool, data_root, one_thread):
    model = build_registered("vit_mini_patch4_32", depth=2, global_pool=pool).eval()
    reference = reference_twin(model).eval()
    images = cifar_batch(data_root)
    with torch.no_grad():
        out = model(images)
        torch.testing.assert_close(out, reference(images), rtol=0, atol=1e-5)
    assert out.shape == ((4, 65, 10) if pool == "" else (4, 10))


def test_forward_intermediates_options_equal_timm(mini, data_root, one_thread):
    reference = reference_twin(mini).eval()
    images = cifar_batch(data_root)
    options = [dict(), dict(indices=1, output_fmt="NLC"), dict(indices=[0, -1], return_prefix_tokens=True),
               dict(indices=[0], norm=True, stop_early=True, intermediates_only=True),
               dict(indices=2, output_dict=True, return_prefix_tokens=True, output_fmt="NLC")]

    def flat(x):
        if isinstance(x, torch.Tensor):
            return [x]
        if isinstance(x, dict):
            return [t for k in sorted(x) for t in flat(x[k])]
        return [t for item in x for t in flat(item)]

    with torch.no_grad():
        for kwargs in options:
            ours, theirs = flat(mini.forward_intermediates(images, **kwargs)), flat(reference.forward_intermediates(
                images, **kwargs))
            assert [t.shape for t in ours] == [t.shape for t in theirs], kwargs
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_prune_intermediate_layers_equals_timm(data_root, one_thread):
    model = build_registered("vit_mini_patch4_32", depth=3).eval()
    reference = reference_twin(model).eval()
    assert model.prune_intermediate_layers([0, 1]) == reference.prune_intermediate_layers([0, 1]) == [0, 1]
    assert len(model.blocks) == len(reference.blocks) == 2
    images = cifar_batch(data_root)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=1e-5)
    assert model(images).shape == (4, 65, 128)  # no head, no pooling: timm's pruned model gives every token


def test_set_input_size_equals_timm(mini, data_root, one_thread):
    reference = reference_twin(mini).eval()
    mini.set_input_size((48, 40))
    reference.set_input_size((48, 40))
    torch.testing.assert_close(mini.pos_embed, reference.pos_embed, rtol=0, atol=1e-6)
    images = nn.functional.interpolate(cifar_batch(data_root), size=(48, 40), mode="bilinear")
    with torch.no_grad():
        torch.testing.assert_close(mini(images), reference(images), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="patch size"):
        mini.set_input_size(patch_size=8)


def test_grad_checkpointing_gives_the_same_gradients(data_root, one_thread):
    images = cifar_batch(data_root)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_registered("vit_mini_patch4_32", depth=2, drop_path_rate=0.0)
        model.set_grad_checkpointing(checkpointing)
        assert model.grad_checkpointing is checkpointing
        model(images).logsumexp(-1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


def test_timm_attributes(mini):
    assert (mini.num_classes, mini.num_features, mini.head_hidden_size, mini.global_pool) == (10, 128, 128, "token")
    with_rep = build_registered("vit_mini_patch4_32", depth=1, representation_size=64)
    assert (with_rep.num_features, with_rep.head_hidden_size) == (128, 64)  # timm: pre-logits width apart
    assert mini.no_weight_decay() == {"pos_embed", "cls_token"}
    assert mini.group_matcher()["blocks"] == reference_twin(mini).group_matcher()["blocks"]


def test_resnet_has_timms_api_and_features_equal_timms_resnet(data_root, one_thread):
    """The ResNet baseline (torchvision's keys, which timm's ResNet shares): classifier reset, feature_info and
    features_only equal timm's resnet18 holding the same weights."""
    model = build_registered("resnet18").eval()
    reference = timm.create_model("resnet18", num_classes=1000).eval()
    reference.load_state_dict(model.state_dict())
    images = nn.functional.interpolate(cifar_batch(data_root, 2), size=64, mode="bilinear")
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=1e-5)
    assert model.get_classifier() is model.fc and model.pretrained_cfg["first_conv"] == "conv1"
    assert resolve_data_config({}, model=model)["input_size"] == (3, 224, 224)
    ours = build_registered("resnet18", features_only=True, out_indices=(1, 2, 4)).eval()
    ours.model.load_state_dict(model.state_dict(), strict=False)
    theirs = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 4)).eval()
    theirs.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})
    assert ours.feature_info.channels() == theirs.feature_info.channels() == [64, 128, 512]
    assert ours.feature_info.reduction() == theirs.feature_info.reduction() == [4, 8, 32]
    with torch.no_grad():
        for a, b in zip(ours(images), theirs(images), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    model.reset_classifier(3)
    assert model(images).shape == (2, 3) and model.num_classes == 3
    with pytest.raises(ValueError, match="average"):
        model.reset_classifier(3, global_pool="max")


def test_fx_graph_keeps_the_input_check(mini, data_root):
    """FX records the input check as one call (torch.fx.wrap), so a traced graph still names a wrong size."""
    graph = torch.fx.symbolic_trace(mini)
    images = cifar_batch(data_root)
    with torch.no_grad():
        # Equal up to kernel rounding: on some hosts (2-core AMD EPYC) the traced graph's kernels differ
        # from eager's in the last bits (1.3e-6 measured).
        torch.testing.assert_close(graph(images), mini(images), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected images of size \(32, 32\), got \(40, 40\)"):
        graph(nn.functional.interpolate(images, size=40))
    assert "check_image_size" in {getattr(n.target, "__name__", "") for n in graph.graph.nodes}
