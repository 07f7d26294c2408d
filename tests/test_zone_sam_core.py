"""SAM checkpoints in transformers' SamModel layout (Meta's facebook/sam-vit-* ``model.safetensors``) load into
segment-anything's ``Sam`` and compute the same thing (masks/sam_auto.py). Plain PyTorch: no ComfyUI, no
download; the equivalence runs on tiny random-weight models of both libraries built with the same sizes."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from realedit.masks import sam_auto  # noqa: E402
from realedit.testbed.sam import make_tiny_sam  # noqa: E402

# Tiny sizes, shared by both builders (make_tiny_sam: mlp_ratio 2, 2 heads, window 14, the last block global,
# mask_in_chans 8, a 2-block decoder with mlp 2 * dim, IoU head depth 3 of width dim).
IMAGE, PATCH, WIDTH, DEPTH, DIM = 256, 16, 32, 2, 32
# Relative tolerance of the equivalence (fp32; the two libraries order some sums differently).
RTOL = 1e-5

# transformers' configs of the three real kinds (models/sam/convert_sam_to_hf.py get_config; vit_b = defaults).
HF_VISION = {"vit_b": {}, "vit_l": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                    "global_attn_indexes": [5, 11, 17, 23]},
             "vit_h": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
                       "global_attn_indexes": [7, 15, 23, 31]}}


def tiny_hf_config() -> transformers.SamConfig:
    """The transformers twin of ``make_tiny_sam(image_size=IMAGE, embed_dim=WIDTH, depth=DEPTH,
    prompt_embed_dim=DIM)``. The decoder's LayerNorm eps is set to segment-anything's 1e-5 (nn.LayerNorm's
    default there); transformers' SamMaskDecoderConfig says 1e-6, a difference of the transformers port (and
    of every facebook/sam-vit-* config.json), not of the weights: loaded here, they run segment-anything's."""
    return transformers.SamConfig(
        vision_config={"hidden_size": WIDTH, "output_channels": DIM, "num_hidden_layers": DEPTH,
                       "num_attention_heads": 2, "image_size": IMAGE, "patch_size": PATCH, "mlp_dim": 2 * WIDTH,
                       "window_size": 14, "global_attn_indexes": [DEPTH - 1], "num_pos_feats": DIM // 2},
        prompt_encoder_config={"hidden_size": DIM, "image_size": IMAGE, "patch_size": PATCH,
                               "mask_input_channels": 8},
        mask_decoder_config={"hidden_size": DIM, "mlp_dim": 2 * DIM, "num_hidden_layers": 2, "num_attention_heads": 2,
                             "iou_head_depth": 3, "iou_head_hidden_dim": DIM, "layer_norm_eps": 1e-5},
    )


def tiny_hf_sam(seed: int = 0) -> torch.nn.Module:
    """A seeded random-weight transformers SamModel (every tensor drawn, zero-initialised ones included)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.SamModel(tiny_hf_config()).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() > 1 or "pos_embed" in name:
                    scale = 0.1 if "rel_pos" in name or "pos_embed" in name else param[0].numel() ** -0.5
                    param.copy_(torch.randn_like(param) * scale)
                else:
                    param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name and "weight" in name else 0))
    return model


@pytest.fixture
def tiny_kinds(monkeypatch):
    """The loader's kind table and registry pointed at the tiny size (as vit_b), so ``load_sam`` builds the tiny
    segment-anything twin for a tiny file."""
    import segment_anything

    monkeypatch.setattr(sam_auto, "SAM_ENCODERS", {**sam_auto.SAM_ENCODERS, "vit_b": (WIDTH, DEPTH)})
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b",
                        lambda checkpoint=None: make_tiny_sam(seed=123, image_size=IMAGE, patch_size=PATCH,
                                                              embed_dim=WIDTH, depth=DEPTH, prompt_embed_dim=DIM))


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    scale = theirs.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=RTOL * scale)


# ---------------------------------------------------------------- the key mapping


def _key_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["vit_b", "vit_l", "vit_h"])
def test_key_mapping_is_a_bijection_onto_segment_anything_keys(kind):
    """Every SamModel key of the real configs maps to a distinct Sam key of the same shape and every Sam key is hit
    (built on the meta device: no weights)."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        ours = _key_shapes(sam_model_registry[kind](checkpoint=None))
        config = transformers.SamConfig(vision_config=HF_VISION[kind])
        theirs = _key_shapes(transformers.SamModel(config))
    assert "shared_image_embedding.positional_embedding" in theirs  # dropped: a copy of the prompt encoder's
    assert len(theirs) == len(ours) + 1
    state = {key: torch.empty(shape, device="meta") for key, shape in theirs.items()}
    assert sam_auto.encoder_kind(state, sam_auto.TRANSFORMERS, "model.safetensors") == kind
    middle = {"mask_decoder.iou_prediction_head": 1, **{f"mask_decoder.output_hypernetworks_mlps.{i}": 1
                                                        for i in range(4)}}
    renamed = {key: sam_auto.transformers_key_to_sam(key, middle) for key in theirs
               if key != "shared_image_embedding.positional_embedding"}
    assert len(set(renamed.values())) == len(renamed)  # injective
    assert set(renamed.values()) == set(ours)  # onto
    assert all(theirs[key] == ours[target] for key, target in renamed.items())
    state.pop("shared_image_embedding.positional_embedding")  # (meta tensors cannot be compared)
    converted = sam_auto.transformers_to_segment_anything(state)
    assert {key: tuple(v.shape) for key, v in converted.items()} == ours


# ---------------------------------------------------------------- the same model in both libraries


def test_transformers_file_loads_and_matches_samodel_outputs(tmp_path, tiny_kinds):
    """A SamModel saved as Hugging Face does (save_pretrained -> model.safetensors, no kind in the name) loads
    through ``load_sam`` and gives SamModel's image embeddings, masks and IoU predictions for point, box and
    point + box prompts, to 1e-5 relative."""
    hf = tiny_hf_sam(seed=3)
    hf.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    assert path.is_file()
    sam = sam_auto.load_sam(str(path))
    assert not torch.equal(sam.image_encoder.pos_embed, make_tiny_sam(seed=123, image_size=IMAGE,
                                                                    embed_dim=WIDTH).image_encoder.pos_embed)
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, IMAGE, IMAGE)  # normalised pixels, as both models' encoders take them
    points = torch.tensor([[[40.0, 200.0], [180.0, 60.0], [128.0, 128.0]]])  # (1, 3, 2) in the input frame
    labels = torch.tensor([[1, 0, 1]])
    box = torch.tensor([[30.0, 20.0, 190.0, 230.0]])  # (1, 4) x0 y0 x1 y1
    with torch.no_grad():
        embedding = sam.image_encoder(pixels)  # (1, DIM, IMAGE / PATCH, IMAGE / PATCH)
        _close(embedding, hf.get_image_embeddings(pixels))
        for prompt in ("points", "box", "points+box"):
            sa_points = (points, labels) if "points" in prompt else None
            sa_box = box if "box" in prompt else None
            sparse, dense = sam.prompt_encoder(points=sa_points, boxes=sa_box, masks=None)
            for multimask in (True, False):
                masks, iou = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                              multimask_output=multimask)  # (1, 3 or 1, 4h, 4w), (1, 3 or 1)
                out = hf(image_embeddings=embedding,
                         input_points=points[:, None] if sa_points else None,  # (1, point batch 1, 3, 2)
                         input_labels=labels[:, None] if sa_points else None,
                         input_boxes=box[:, None] if sa_box is not None else None,  # (1, 1, 4)
                         multimask_output=multimask)
                _close(masks, out.pred_masks[:, 0])
                _close(iou, out.iou_scores[:, 0])


def test_segment_anything_layout_safetensors_loads_by_name_or_weights(tmp_path, tiny_kinds):
    state = make_tiny_sam(seed=4, image_size=IMAGE, embed_dim=WIDTH).state_dict()
    for name in ("sam_vit_b_converted.safetensors", "weights.safetensors"):
        safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / name))
        sam = sam_auto.load_sam(str(tmp_path / name))
        assert all(torch.equal(v, state[k]) for k, v in sam.state_dict().items())


def test_positional_encoding_under_either_key_or_both(tmp_path, tiny_kinds):
    """save_pretrained keeps one of SamModel's two tied positional encodings: either name loads, and both only when
    equal."""
    state = {k: v.clone().contiguous() for k, v in tiny_hf_sam(seed=5).state_dict().items()}
    pe_prompt, pe_image = sam_auto._PE_KEYS
    matrix = state[pe_prompt]
    state[pe_image] = matrix.clone()
    variants = {"both": state, "prompt_only": {k: v for k, v in state.items() if k != pe_image},
                "image_only": {k: v for k, v in state.items() if k != pe_prompt}}
    for label, tensors in variants.items():
        safetensors_torch.save_file(tensors, str(tmp_path / f"{label}.safetensors"))
        sam = sam_auto.load_sam(str(tmp_path / f"{label}.safetensors"))
        assert torch.equal(sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix, matrix), label
    state[pe_image] = matrix + 1
    safetensors_torch.save_file(state, str(tmp_path / "differ.safetensors"))
    with pytest.raises(sam_auto.SamCheckpointError, match="two different positional encodings"):
        sam_auto.load_sam(str(tmp_path / "differ.safetensors"))


# ---------------------------------------------------------------- bad files


def test_bad_files_get_realedit_sam_errors(tmp_path, tiny_kinds):
    state = {k: v.clone().contiguous() for k, v in tiny_hf_sam(seed=6).state_dict().items()}
    state.pop(sam_auto._PE_KEYS[1])

    def save(name: str, tensors: dict[str, torch.Tensor]) -> str:
        safetensors_torch.save_file(tensors, str(tmp_path / name))
        return str(tmp_path / name)

    cases = {
        save("sd15.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}):
            r"'sd15.safetensors' is not a SAM checkpoint: it has neither .* \(its top-level keys: model\)",
        save("missing.safetensors", {k: v for k, v in state.items() if k != "mask_decoder.iou_token.weight"}):
            r"'missing.safetensors' does not hold vit_b SAM weights \(the kind comes from its weights; transformers "
            r"SamModel layout\): Missing key\(s\) in state_dict: \"mask_decoder.iou_token.weight\"",
        save("extra.safetensors", {**state, "mask_decoder.hq_token.weight": torch.zeros(1, DIM)}):
            r"does not hold vit_b SAM weights .*Unexpected key\(s\) .*hq_token.*SAM 2, HQ-SAM",
        save("sam_vit_l_hf.safetensors", {**state, "vision_encoder.patch_embed.projection.weight":
                                          torch.zeros(48, 3, PATCH, PATCH)}):
            r"'sam_vit_l_hf.safetensors' \(transformers SamModel layout\) has an image encoder 48 wide with 2 "
            r"blocks, which is none of segment-anything's vit_h \(1280 wide, 32 blocks\)",
        save("noname.safetensors", {k.replace("vision_encoder", "image_encoder"): v for k, v in state.items()
                                    if k.startswith("vision_encoder.layers")}):
            r"'noname.safetensors' \(segment-anything layout\) has no 'image_encoder.patch_embed.proj.weight'",
    }
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    cases[str(tmp_path / "broken.safetensors")] = r"'broken.safetensors' is not a SAM checkpoint, or it is corrupt"
    for path, pattern in cases.items():
        with pytest.raises(sam_auto.SamCheckpointError, match=pattern) as info:
            sam_auto.load_sam(path)
        message = str(info.value)
        assert message.startswith("RealEdit SAM: ")
        assert "facebook/sam-vit-huge" in message and "sam_vit_h_4b8939.pth" in message  # the fix


def test_hf_addresses_are_meta_repos():
    assert sam_auto.hf_sam_url("vit_l") == "https://huggingface.co/facebook/sam-vit-large/resolve/main/model.safetensors"
    assert set(sam_auto.HF_SAM_REPOS) == set(sam_auto.SAM_KINDS) == set(sam_auto.SAM_ENCODERS)
