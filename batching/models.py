"""Models for batch editing: a named loader registry, diffusers folders and single-file checkpoints.

``load_model(spec)`` returns an :class:`EditModel` (UNet, VAE, DDIM scheduler, a tokenizer giving word
positions and a prompt encoder). ``spec`` is

* a registered name (:data:`LOADERS`; ``tiny`` is built in: random-weight tiny UNet, VAE and CLIP text
  encoder with a word-level tokenizer, for dry runs and tests; ``shapes-world`` and ``shapes-world-ip2p``
  are the shapes world's trained checkpoints, for texts in the world's vocabulary). :data:`DEFAULT_MODEL`
  is what ``--model`` defaults to;
* a diffusers folder (``model_index.json``; Stable Diffusion or InstructPix2Pix):
  ``DiffusionPipeline.from_pretrained``, local files only;
* a single-file checkpoint (``.safetensors`` / ``.ckpt``): ``from_single_file`` with ``local_files_only``.
  diffusers reads the model's configuration (and the CLIP tokenizer) from the Hugging Face hub for a single
  file; offline it needs ``config=`` a local diffusers folder of the same architecture (``--model-config``),
  e.g. a saved ``stable-diffusion-v1-5`` folder without its weights.

Plug in another loader with ``register_loader("name", fn)`` where ``fn(device, dtype) -> EditModel``.
"""

from __future__ import annotations

import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attention.settings import CLIP_CHUNK
from ..attention.tokens import Token, Tokenizer

Encoder = Callable[[str], torch.Tensor]  # prompt -> (1, 77, width) embedding


@dataclass
class EditModel:
    """What a batch worker keeps loaded: the diffusers components and text handling."""

    name: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    tokenize: Tokenizer
    encode: Encoder
    load_seconds: float = 0.0

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


Loader = Callable[[torch.device, torch.dtype], EditModel]
LOADERS: dict[str, Loader] = {}
# The default stays the tiny model: the shapes world's models (``shapes-world``, below) know only the world's
# closed vocabulary, so they refuse the words of an arbitrary manifest.
DEFAULT_MODEL = "tiny"


def register_loader(name: str, loader: Loader) -> None:
    """Make ``--model NAME`` load with ``loader(device, dtype)``."""
    LOADERS[name] = loader


# -- the built-in tiny model -----------------------------------------------------------------------------------
TINY_VOCAB = 1000
_BOS, _EOS = 0, 1


def place(*modules: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move fp32 ``modules`` to ``device``, casting only to another dtype (diffusers warns on a cast to the
    dtype a model already has)."""
    for module in modules:
        module.to(device=device) if dtype == torch.float32 else module.to(device=device, dtype=dtype)


def word_tokenizer(text: str) -> list[Token]:
    """A word-level stand-in for CLIP's BPE: one token per word (lower-cased, punctuation split off),
    id from crc32 (stable across processes and machines), text marked with CLIP's ``</w>``."""
    import re

    words = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())
    return [(2 + zlib.crc32(w.encode()) % (TINY_VOCAB - 2), w + "</w>") for w in words]


def _clip_ids(tokens: list[Token]) -> torch.Tensor:
    ids = [_BOS, *(t for t, _ in tokens[: CLIP_CHUNK - 2]), _EOS]
    return torch.tensor([ids + [_EOS] * (CLIP_CHUNK - len(ids))])  # (1, 77)


def tiny_text_encoder(width: int, seed: int = 0, vocab_size: int = TINY_VOCAB) -> torch.nn.Module:
    """A random-weight two-layer CLIP text encoder of ``width`` channels (seeded; the global RNG is untouched)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=CLIP_CHUNK, bos_token_id=_BOS,
                            eos_token_id=_EOS, pad_token_id=_EOS)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CLIPTextModel(config).eval()


def load_tiny(device: torch.device, dtype: torch.dtype, family: str = "sd1") -> EditModel:
    """Random-weight tiny SD1-shaped UNet, VAE and CLIP text encoder (testbed); edits are not meaningful.
    ``family="ip2p"``: the InstructPix2Pix-shaped UNet (8 input channels) with the same VAE and text encoder."""
    from ..testbed.diffusers_models import make_ddim_scheduler, make_tiny_diffusers_unet, make_tiny_diffusers_vae

    unet, vae = make_tiny_diffusers_unet(family, weight_scale=0.5), make_tiny_diffusers_vae()
    place(unet, vae, device=device, dtype=dtype)
    text = tiny_text_encoder(unet.config.cross_attention_dim).to(device)

    @torch.no_grad()
    def encode(prompt: str) -> torch.Tensor:
        return text(_clip_ids(word_tokenizer(prompt)).to(device)).last_hidden_state.to(dtype)

    return EditModel("tiny" if family == "sd1" else f"tiny-{family}", unet, vae, make_ddim_scheduler(),
                     word_tokenizer, encode)


register_loader("tiny", load_tiny)
register_loader("tiny-ip2p", lambda device, dtype: load_tiny(device, dtype, "ip2p"))


def _world_loader(name: str, file: str) -> Loader:
    def load(device: torch.device, dtype: torch.dtype) -> EditModel:
        from ..testbed.shapes_world.diffusers_loader import edit_model

        return edit_model(name, file, device, dtype)

    return load


# The shapes world's committed checkpoints (testbed/shapes_world_models/), for world manifests.
for _name, _file in (("shapes-world", "shapes_world_t2i.safetensors"),
                     ("shapes-world-ip2p", "shapes_world_ip2p.safetensors")):
    register_loader(_name, _world_loader(_name, _file))
DEFAULT_IP2P = {"tiny": "tiny-ip2p", "shapes-world": "shapes-world-ip2p"}  # --ip2p-model when not given, per --model


# -- diffusers pipelines -----------------------------------------------------------------------------------------
def from_pipeline(name: str, pipe: object, device: torch.device, dtype: torch.dtype) -> EditModel:
    """An :class:`EditModel` from a loaded ``StableDiffusionPipeline`` (its DDIM schedule, its CLIP)."""
    from diffusers import DDIMScheduler

    from ..attention.tokens import from_hf_tokenizer

    pipe.to(device)  # loaded in ``dtype`` already
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)  # 77 for SD's CLIP

    @torch.no_grad()
    def encode(prompt: str) -> torch.Tensor:
        ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids
        return text_encoder(ids.to(device))[0].to(dtype)

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return EditModel(name, pipe.unet.eval(), pipe.vae.eval(), scheduler, from_hf_tokenizer(tokenizer), encode)


def load_diffusers_folder(path: Path, device: torch.device, dtype: torch.dtype) -> EditModel:
    """A Stable Diffusion or InstructPix2Pix folder (the pipeline class its model_index.json names)."""
    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype to dtype; 0.30 knows only torch_dtype
        warnings.simplefilter("ignore", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True, safety_checker=None,
                                                 requires_safety_checker=False)
    return from_pipeline(str(path), pipe, device, dtype)


def load_single_file(path: Path, device: torch.device, dtype: torch.dtype, config: Path | None) -> EditModel:
    from diffusers import StableDiffusionPipeline

    kwargs = {"config": str(config)} if config is not None else {}
    try:
        with warnings.catch_warnings():  # torch_dtype, as above
            warnings.simplefilter("ignore", FutureWarning)
            pipe = StableDiffusionPipeline.from_single_file(str(path), torch_dtype=dtype, local_files_only=True,
                                                            safety_checker=None, requires_safety_checker=False,
                                                            **kwargs)
    except Exception as e:  # diffusers raises OSError, ValueError or its own SingleFileComponentError
        hint = "" if config is not None else (
            " diffusers needs the model's configuration for a single file and cannot fetch it offline: pass "
            "--model-config with a local diffusers folder of the same architecture (its model_index.json, "
            "component configs and tokenizer; weights not needed), or convert the checkpoint to a diffusers folder.")
        raise RuntimeError(f"RealEdit: cannot load the checkpoint {path}: {e}.{hint}") from e
    return from_pipeline(str(path), pipe, device, dtype)


def load_model(spec: str, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
               config: Path | None = None) -> EditModel:
    """Load ``spec`` (a registered name, a diffusers folder or a single-file checkpoint); times the load."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    path = Path(spec).expanduser()
    if spec in LOADERS:
        model = LOADERS[spec](device, dtype)
    elif path.is_dir() and (path / "model_index.json").is_file():
        model = load_diffusers_folder(path, device, dtype)
    elif path.is_file() and path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin"):
        model = load_single_file(path, device, dtype, config)
    else:
        raise ValueError(f"RealEdit: --model {spec!r} is neither a registered model ({', '.join(LOADERS)}), a "
                         "diffusers folder (with model_index.json) nor a .safetensors/.ckpt checkpoint.")
    model.load_seconds = time.perf_counter() - start
    return model


def check_model_spec(spec: str) -> None:
    """Refuse a ``--model`` that cannot load, before validation output and before any worker starts."""
    path = Path(spec).expanduser()
    if spec in LOADERS or (path.is_dir() and (path / "model_index.json").is_file()) or path.is_file():
        return
    raise ValueError(f"RealEdit: --model {spec!r} is neither a registered model ({', '.join(LOADERS)}), a "
                     "diffusers folder (with model_index.json) nor a checkpoint file.")
