"""RealEdit Attention Map Recorder + RealEdit Word Attention Map: a prompt word's cross-attention as a MASK.

The recorder clones the MODEL with a hook that records the conditional rows' cross-attention
probabilities (head-averaged, running mean over the chosen layers and steps of the last sampling run)
and always declines, so sampling is unchanged bit for bit. After the sampler ran, the readout looks the
words up in the prompt (CLIP tokens, punctuation-safe, one 77-token chunk) and returns their map, the
way Prompt-to-Prompt reads a word's region: sum of the word's tokens, normalised, resized, optionally
thresholded. One MASK per latent of the sampled batch.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from ..attention.maps import CrossAttentionStore, MapRecorder, MapStoreError, word_mask
from ..attention.settings import P2PSettings
from ..attention.tokens import word_token_indices
from ..hosts.comfy import install_hook
from .common import LATENT_SCALE, check_map_downscale, clip_tokenizer, latent_samples, split_words

CATEGORY = "RealEdit/attention"
AttentionMaps = io.Custom("REALEDIT_ATTENTION_MAPS")
NORMALIZE = {"min-max": "minmax", "divide by max": "max", "none": "none"}


class AttentionMapRecorder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditAttentionMapRecorder",
            display_name="RealEdit Attention Map Recorder",
            category=CATEGORY,
            description=(
                "Records the positive prompt's cross-attention maps while any sampler runs on the returned "
                "MODEL (a clone; sampling output is unchanged). Feed ATTENTION_MAPS to 'RealEdit Word Attention "
                "Map' after the sampler to get a word's map as a MASK."
            ),
            inputs=[
                io.Model.Input("model", tooltip="Any SD1.x, SD2.x or SDXL model (other patches are kept)."),
                io.Int.Input("map_downscale", default=4, min=1, max=64,
                             tooltip="Record the layers whose token grid is the latent divided by this: 4 gives "
                                     "P2P's 16x16 maps at 512 px on SD1.x (32x32 at 1024 px on SDXL)."),
                io.Float.Input("step_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First sampling step recorded, as a fraction of the steps."),
                io.Float.Input("step_end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the recorded steps, as a fraction (exclusive)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The recording clone; the input model is untouched."),
                AttentionMaps.Output(display_name="attention_maps"),
            ],
        )

    @classmethod
    def execute(cls, model, map_downscale, step_start, step_end) -> io.NodeOutput:
        check_map_downscale(model, map_downscale)
        if step_end <= step_start:
            raise ValueError(f"RealEdit: step_end ({step_end}) must be above step_start ({step_start}).")
        store = CrossAttentionStore(downscales=(map_downscale,), kinds=("cond",), slots=None,
                                    steps=(step_start, step_end))
        return io.NodeOutput(install_hook(model, MapRecorder(store), self_attention=False), store)


class WordAttentionMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditWordAttentionMap",
            display_name="RealEdit Word Attention Map",
            category=CATEGORY,
            description=(
                "A word's cross-attention map from the last sampling run on a 'RealEdit Attention Map "
                "Recorder' MODEL, as a MASK (one per latent of the batch): the sum of the word's token maps, "
                "normalised, resized bilinearly, optionally thresholded."
            ),
            inputs=[
                AttentionMaps.Input("attention_maps"),
                io.Clip.Input("clip", tooltip="Looks the words up in the prompt (the same CLIP that encoded it)."),
                io.String.Input("text", multiline=True, default="a photo of a cat",
                                tooltip="The positive prompt the sampler used."),
                io.String.Input("words", default="cat",
                                tooltip="Word(s) of the prompt, comma separated; their maps are summed."),
                io.Latent.Input("after", tooltip="Connect the sampler's output so this runs after sampling "
                                "(its size sets the mask size)."),
                io.Combo.Input("size", options=["image", "latent"], default="image",
                               tooltip="Mask size: the image's (latent x 8) or the latent's."),
                io.Combo.Input("normalize", options=list(NORMALIZE), default="min-max",
                               tooltip="min-max: to [0, 1] (SpecRef's M_t); divide by max: P2P's LocalBlend; none: "
                                       "raw attention probabilities."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="0: the soft map. Above 0: 1 where the map exceeds it, else 0 (P2P's "
                                       f"LocalBlend uses {P2PSettings().blend_threshold} after 'divide by max')."),
            ],
            outputs=[io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> float:
        return float("nan")  # the maps change with every sampling run; never serve a cached mask

    @classmethod
    def execute(cls, attention_maps: CrossAttentionStore, clip, text, words, after, size, normalize,
                threshold) -> io.NodeOutput:
        tokenize = clip_tokenizer(clip)
        positions = word_token_indices(text, split_words(words), tokenize)
        try:
            maps = attention_maps.maps("cond")  # (latents, 77, h, w)
        except MapStoreError as error:
            raise ValueError("RealEdit: no attention maps were recorded: sample with the MODEL output of 'RealEdit "
                             "Attention Map Recorder' and connect that sampler's LATENT to 'after'.") from error
        hw = tuple(latent_samples(after, "after").shape[-2:])
        out_hw = (hw[0] * LATENT_SCALE, hw[1] * LATENT_SCALE) if size == "image" else hw
        mask = word_mask(maps, positions, out_hw, normalize=NORMALIZE[normalize],
                         threshold=threshold if threshold > 0 else None)
        grid, calls = attention_maps.grid, attention_maps.count("cond", attention_maps.recorded_slots()[0])
        text_out = (f"RealEdit word map: {split_words(words)} at tokens {positions}; {maps.shape[0]} latent(s), "
                    f"{grid[0]}x{grid[1]} maps averaged over {calls} layer calls")
        return io.NodeOutput(mask.cpu(), ui=ui.PreviewText(text_out))
