"""The per-dataset settings file `datasets/<name>/dataset.yaml`: one section per stage, validated.

Why sections: each section is observed as its own asset whose data version is the hash of that section
with defaults applied, so editing the caption threshold makes only `tag_table` unsynced, and editing a
comment or an unrelated section changes nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from assets.settings_errors import validation_error_message, yaml_error_message
from common.hashing import json_sha256
from tagging.captions import KAOMOJI

SETTINGS_FILE = "dataset.yaml"


class SettingsError(ValueError):
    """A dataset.yaml that cannot be used; the message names the file and the offending field."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo such as `general_treshold` must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class PreprocessSettings(_Section):
    size: int = Field(512, ge=8, le=4096, description="output side in pixels (webui: width/height); bucket max area")
    crop: Literal["centre", "focal", "split", "auto", "buckets"] = Field(
        "centre", description="centre square | focal (webui auto focal point crop) | split (webui split oversized "
        "images) | auto (webui auto-sized crop) | buckets (kohya aspect-ratio buckets, no square crop)")
    flip: bool = Field(False, description="also write horizontally flipped copies (webui: create flipped copies)")
    greyscale: bool = Field(False, description="also write greyscale copies (the DreamArtist trick)")
    resample: Literal["lanczos", "bicubic", "bilinear", "nearest", "box", "hamming"] = "lanczos"
    background: tuple[int, int, int] = Field((255, 255, 255), description="RGB that transparency is composited on")
    min_side: int = Field(1, ge=1, description="images with a smaller side are skipped")
    max_pixels: int = Field(89_478_485, ge=1, description="decompression-bomb limit, width x height")
    focal_crop_face_weight: float = Field(0.9, ge=0, le=1, description="webui: focal point face weight")
    focal_crop_entropy_weight: float = Field(0.15, ge=0, le=1, description="webui: focal point entropy weight")
    focal_crop_edges_weight: float = Field(0.5, ge=0, le=1, description="webui: focal point edges weight")
    split_threshold: float = Field(0.5, ge=0, le=10, description="webui: split image threshold")
    overlap_ratio: float = Field(0.2, ge=0, lt=1, description="webui: split image overlap ratio")
    multicrop_mindim: int = Field(384, ge=64, le=4096, description="webui: auto-sized crop dimension lower bound")
    multicrop_maxdim: int = Field(768, ge=64, le=4096, description="webui: auto-sized crop dimension upper bound")
    multicrop_minarea: int = Field(64 * 64, ge=1, description="webui: auto-sized crop area lower bound")
    multicrop_maxarea: int = Field(640 * 640, ge=1, description="webui: auto-sized crop area upper bound")
    multicrop_objective: Literal["area", "error"] = Field("area", description="webui: maximize area | minimize error")
    multicrop_threshold: float = Field(0.1, ge=0, le=1, description="webui: auto-sized crop error threshold")
    min_bucket_reso: int = Field(256, ge=64, description="kohya: smallest bucket side")
    max_bucket_reso: int = Field(1024, ge=64, description="kohya: largest bucket side")
    bucket_reso_steps: int = Field(64, ge=8, description="kohya: bucket side step")
    bucket_no_upscale: bool = Field(True, description="kohya: buckets follow each image, never enlarging it")
    near_duplicate_distance: int = Field(4, ge=0, le=64, description="perceptual-hash bits; 0: no near-dup check")
    drop_near_duplicates: bool = Field(False, description="skip near duplicates, keeping the largest of a group")
    filename_word_regex: str = Field("", description="webui: filename word regex, for [filewords]")
    filename_join_string: str = Field(" ", description="webui: filename join string")
    min_images: int = Field(30, ge=0, description="fewer prepared images than this warns (the seeds: 30+)")
    max_skipped_fraction: float = Field(0.5, ge=0, le=1, description="a larger skipped fraction fails the check")
    workers: int = Field(0, ge=0, le=256, description="decode/resize processes; 0: one per CPU core")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="share of sources held out for the validation "
                                       "loss, chosen by content (never all; at least one of two or more); 0: none")

    @field_validator("filename_word_regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"not a valid regular expression: {error}") from error
        return value


class TaggingSettings(_Section):
    tagger: Literal["wd14", "deepdanbooru"] = Field("wd14", description="tagger backend (deepdanbooru: Keras "
                                                    "or ONNX project folder; Keras needs requirements-deepdanbooru.txt)")
    model: str | None = Field(None, description="tagger model folder; default: the tagger resource's folder")
    batch_size: int = Field(8, ge=1, le=1024, description="images per model call (fixed-batch models use theirs)")
    score_floor: float = Field(0.01, ge=0, lt=1, description="scores at or below this are not stored")
    workers: int = Field(0, ge=0, le=64, description="decoding processes beside the model; 0: cores - 1")
    blip_model: str | None = Field(None, description="a local BLIP captioning folder (BlipForConditionalGeneration); "
                                   "null: no BLIP captions")
    blip_prompt: str = Field("", description="BLIP: text the caption continues (e.g. 'a picture of'); kept in it")
    num_beams: int = Field(1, ge=1, le=16, description="BLIP: beam search width (webui: num_beams)")
    min_length: int = Field(24, ge=0, le=512, description="BLIP: minimum caption length in tokens (webui: 24)")
    max_length: int = Field(48, ge=1, le=512, description="BLIP: maximum caption length in tokens (webui: 48)")

    @model_validator(mode="after")
    def _lengths_ordered(self) -> TaggingSettings:
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) is above max_length ({self.max_length})")
        return self


class CaptionSettings(_Section):
    """Names follow the webui, kohya's tagger script (`--undesired_tags`, `--always_first_tags`, ...) and
    SmilingWolf's MCut options; see tagging.captions.CaptionOptions for what each does."""

    general_threshold: float | None = Field(None, ge=0, le=1, description="default: the tagger backend's")
    character_threshold: float | None = Field(None, ge=0, le=1, description="default: the tagger backend's")
    rating_threshold: float = Field(0.0, ge=0, le=1, description="the best rating is used only above this")
    general_mcut: bool = Field(False, description="automatic per-image general threshold (MCut)")
    character_mcut: bool = Field(False, description="automatic per-image character threshold (MCut, >= 0.15)")
    max_tags: int = Field(0, ge=0, description="most confident general/character tags kept per image; 0: all")
    include_rating: bool = False
    rating_position: Literal["first", "last"] = "first"
    character_first: bool = Field(False, description="kohya: character tags first")
    replace_underscores: bool = Field(True, description="webui: use spaces for tags")
    keep_underscore_tags: tuple[str, ...] = Field(KAOMOJI, description="tags whose underscores stay (kaomoji)")
    escape_brackets: bool = Field(True, description="webui: escape (\\) brackets")
    sort_alphabetically: bool = Field(False, description="webui: sort alphabetically; else by confidence")
    separator: str = ", "
    exclude_tags: tuple[str, ...] = Field((), description="kohya: undesired tags (any spelling)")
    exclude_regex: tuple[str, ...] = Field((), description="undesired tags matching these full patterns")
    replace_tags: dict[str, str] = Field(default_factory=dict, description="kohya: tag replacement; '' removes")
    always_first: tuple[str, ...] = Field((), description="kohya: always first tags, when present")
    keep_tokens: int = Field(0, ge=0, description="kohya: keep tokens (leading tags a shuffle keeps in place)")
    existing_caption: Literal["ignore", "prepend", "append", "replace"] = Field(
        "ignore", description="a <image>.txt caption that came with the dataset")
    drop_frequent_above: float | None = Field(None, ge=0, le=1, description="drop tags in more than this "
                                              "fraction of images (subject features)")
    subject_tags: tuple[str, ...] = Field((), description="subject features to drop, listed by hand")
    filewords_source: Literal["tags", "blip", "blip_and_tags"] = Field(
        "tags", description="what the caption ([filewords], .txt sidecar) is made of: the tags, the BLIP caption, "
        "or the BLIP caption followed by the tags")


def _number_as_text(value: object) -> object:
    """A learning rate written as a YAML number means the same as the webui's text schedule of one rate."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


TrainingMethodName = Literal["textual_inversion", "dreamartist", "hypernetwork", "lora", "dreambooth"]


class TrainingSettings(_Section):
    methods: tuple[TrainingMethodName, ...] = Field(
        ("textual_inversion",), description="the personalisation methods this dataset trains; the assets of the "
        "others skip this dataset")
    embedding_name: str | None = Field(None, description="[name] in prompts; default: the dataset name")
    vectors_per_token: int = Field(1, ge=1, le=75, description="webui: number of vectors per token")
    initialization_text: str = Field("*", description="webui: initialization text")
    learning_rate: str = Field("0.005", description="a rate or a webui schedule such as '0.005:100, 1e-3:1000, 1e-5'")
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int = Field(1000, ge=1)
    template: str = Field("subject_filewords", description="shipped template name or path to a template file")
    seed: int = 0
    clip_skip: int = Field(1, ge=1, le=12)
    save_embedding_every: int = Field(0, ge=0, description="save a copy every N steps (0: only the final)")
    shuffle_tags: bool = False
    tag_drop_out: float = Field(0.0, ge=0, le=1)
    keep_tokens: int = Field(0, ge=0, description="kohya: the first N caption tags are never shuffled or dropped")
    clip_grad_mode: Literal["disabled", "value", "norm"] = Field("disabled", description="webui: gradient clipping")
    clip_grad_value: str = Field("0.1", description="webui: clipping limit, a number or a schedule like the rate")
    latent_sampling_method: Literal["once", "deterministic", "random"] = Field("once", description="as in the webui")
    resume: bool = Field(True, description="continue an interrupted run with the same settings from its last state")
    initialization_embedding: str = Field("", description="an embedding file (webui .pt, diffusers .safetensors/.bin, "
                                          "kohya emb_params, PNG) used instead of initialization_text; relative to "
                                          "the dataset folder")
    overwrite_old_embedding: bool = Field(True, description="webui: overwrite old embedding; false continues "
                                          "the dataset's final embedding from its step up to max_steps, with its "
                                          ".pt.optim optimizer state")
    optimizer: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw8bit needs a usable bitsandbytes")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay, on the embedding's vectors only")
    create_image_every: int = Field(0, ge=0, description="webui: save an image to log directory every N steps, 0 "
                                    "to disable")
    preview_prompt: str = Field("", description="webui: preview prompt; empty: the training prompt of that step")
    preview_negative_prompt: str = Field("", description="webui: negative prompt of the preview")
    preview_seed: int = Field(0, ge=-1, description="webui: seed of the preview (fixed, so previews compare; -1: random)")
    preview_steps: int = Field(20, ge=1, le=500, description="webui: sampling steps of the preview")
    preview_cfg_scale: float = Field(7.0, ge=0, description="webui: CFG scale of the preview")
    preview_sampler: Literal["ddim", "dpm", "euler", "euler_a", "pndm"] = Field(
        "euler_a", description="webui: sampling method of the preview")
    save_image_with_stored_embedding: bool = Field(True, description="webui: save images with embedding in PNG "
                                                   "chunks (previews and <name>.png)")
    gradient_checkpointing: bool = Field(False, description="webui: gradient checkpointing (less memory, slower)")
    attention: Literal["sdpa", "classic"] = Field("sdpa", description="sdpa: torch scaled-dot-product attention; "
                                                  "classic: plain softmax attention")
    compile: bool = Field(False, description="torch.compile the UNet (slow first steps, faster after; CUDA)")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="autocast dtype; fp16 (with loss "
                                                           "scaling) needs CUDA, bf16 also runs on CPU")
    loss_warning_threshold: float = Field(0.3, gt=0, description="warn when the final smoothed loss is above this")
    loss_patience_rounds: int = Field(10, ge=1, description="warn when the loss has not fallen for this many rounds")
    early_stopping_patience: int = Field(0, ge=0, description="stop when the validation loss (the training loss "
                                         "without a validation split) has not improved for this many checkpoints; "
                                         "0: off; needs save_embedding_every")

    @field_validator("methods", mode="before")
    @classmethod
    def _methods_listed(cls, value: object) -> object:
        return _as_tuple(value)

    @field_validator("learning_rate", "clip_grad_value", mode="before")
    @classmethod
    def _rate_as_text(cls, value: object) -> object:
        return _number_as_text(value)


GridAxis = Literal["checkpoint", "prompt", "seed", "cfg_scale", "steps", "strength", "method"]


def _as_tuple(value: object) -> object:
    """A single value where a list is allowed: `steps: 20` means `steps: [20]`."""
    return (value,) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else value


class EvaluationSettings(_Section):
    """The webui X/Y/Z plot: each of checkpoint, prompt, seed, cfg_scale, steps, strength and method can be an
    axis; a parameter on no axis must have one value, printed in the grid's legend."""

    prompts: tuple[str, ...] = Field(
        (), description="[name] = the trained name; empty: a subject or style set chosen by the training template"
    )
    prompts_file: str = Field("", description="one prompt per line (# comments), relative to the dataset folder")
    negative_prompt: str = ""
    seeds: tuple[int, ...] = Field((1, 2, 3), min_length=1)
    steps: tuple[Annotated[int, Field(ge=1, le=500)], ...] = Field((20,), min_length=1)
    cfg_scale: tuple[Annotated[float, Field(ge=0)], ...] = Field((7.0,), min_length=1)
    strength: tuple[float, ...] = Field((1.0,), min_length=1, description="embedding emphasis / network multiplier")
    checkpoints: Literal["all", "final"] | tuple[Annotated[int, Field(ge=1)], ...] = Field(
        "all", description="all: every saved checkpoint and the final one; final; or a list of steps"
    )
    sampler: Literal["ddim", "dpm", "euler", "euler_a", "pndm"] = "dpm"
    x_axis: GridAxis = "checkpoint"
    y_axis: GridAxis = "prompt"
    z_axis: GridAxis | Literal["none"] = "seed"
    cell_size: int = Field(0, ge=0, le=2048, description="pixels per cell in the grid PNG; 0: the image size, at least 128")
    aesthetic: bool = Field(False, description="apply the dataset's aesthetic embedding (asset aesthetic_embedding) "
                            "to every cell, with the aesthetic section's options")
    clip_model: str = Field("", description="a local CLIP folder (openai/clip-vit-large-patch14 layout) for the "
                            "image-image and prompt-image CLIP scores; relative to the project root; empty: no scores")
    tagger_scores: bool = Field(False, description="score each checkpoint's [name] cells with the dataset's tagger "
                                "(tagging section): concept_tag_score = mean probability of the concept tags")
    concept_tag_fraction: float = Field(0.5, gt=0, le=1, description="concept tags: at or above the caption "
                                        "thresholds in at least this fraction of the training images (ratings "
                                        "never; captions.exclude_tags still count, the concept is often one)")
    patience_evaluations: int = Field(3, ge=1, description="seeds' rule: warn after this many checkpoints without improvement")
    overfitting_evaluations: int = Field(
        2, ge=1, description="warn when validation loss rose while training loss fell for this many checkpoints"
    )

    @field_validator("seeds", "steps", "cfg_scale", "strength", mode="before")
    @classmethod
    def _listed(cls, value: object) -> object:
        return _as_tuple(value)

    @model_validator(mode="after")
    def _axes_differ(self) -> EvaluationSettings:
        axes = [self.x_axis, self.y_axis] + ([] if self.z_axis == "none" else [self.z_axis])
        if len(set(axes)) != len(axes):
            raise ValueError(f"x_axis, y_axis and z_axis must differ, got {', '.join(axes)}")
        return self


class AestheticSettings(_Section):
    """The aesthetic-gradients extension: creation (clip_model, batch_size) and its generation options."""

    clip_model: str = Field("", description="a local CLIP folder whose text tower is the base model's text encoder "
                            "(SD 1.x: ViT-L/14); relative to the project root; empty: no aesthetic embedding")
    batch_size: int = Field(8, ge=1, le=1024, description="images per CLIP call while averaging")
    aesthetic_weight: float = Field(0.9, ge=0, le=1, description="extension: blend of the optimised conditioning")
    aesthetic_steps: int = Field(5, ge=0, le=50, description="extension: optimisation steps of the text encoder copy")
    aesthetic_lr: float = Field(0.0001, ge=0, description="extension: learning rate of those steps")
    aesthetic_slerp: bool = Field(False, description="extension: slerp instead of linear blending")
    aesthetic_imgs_text: str = Field("", description="extension: text that rotates the image embedding")
    aesthetic_slerp_angle: float = Field(0.1, ge=0, le=1, description="extension: how far towards that text")
    aesthetic_text_negative: bool = Field(False, description="extension: rotate away from the text instead")


def _number_list(value: object) -> object:
    """The webui writes layer and dropout structures as text, "1, 2, 1"; a YAML list is accepted too."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",") if part.strip()]
        return tuple(float(part) if re.fullmatch(r"[0-9.eE+-]+", part) else part for part in parts)
    return _as_tuple(value)


class HypernetworkSettings(_Section):
    """The webui's hypernetwork: "Create hypernetwork" options and its own learning rate; the rest of the
    training (template, steps, batch, checkpoints, previews) comes from the `training` section."""

    learning_rate: str = Field("0.00001", description="webui default for hypernetworks (1e-5); a schedule works too")
    template: str = Field("", description="prompt template; empty: the training section's template")
    layer_structure: tuple[float, ...] = Field((1.0, 2.0, 1.0), description="webui: e.g. '1, 2, 1'; starts and "
                                               "ends with 1")
    activation_func: str = Field("linear", description="webui: linear, relu, leakyrelu, elu, swish, tanh, sigmoid, ...")
    weight_initialization: Literal["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"] = (
        Field("Normal", description="webui: weight initialization"))
    add_layer_norm: bool = Field(False, description="webui: add layer normalization")
    use_dropout: bool = Field(False, description="webui: use dropout")
    dropout_structure: tuple[float, ...] = Field((), description="webui: e.g. '0, 0.05, 0'; empty: from use_dropout")
    activate_output: bool = Field(False, description="webui: activate the last layer too")
    last_layer_dropout: bool = Field(True, description="webui: dropout before the last layer (with use_dropout)")
    sizes: tuple[int, ...] = Field((), description="context widths to create; empty: the UNet's cross-attention "
                                   "widths (768 on SD 1.x); the webui's own list is 320, 640, 768, 1024, 1280")

    @field_validator("layer_structure", "dropout_structure", "sizes", mode="before")
    @classmethod
    def _structures(cls, value: object) -> object:
        return _number_list(value)

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _rate_as_text(cls, value: object) -> object:
        return _number_as_text(value)


class LoraSettings(_Section):
    """LoRA (asset lora): adapters on the UNet attention projections, optionally the text encoder's; every
    other training setting (batch, steps, template, seed, resume, memory options) comes from `training:`."""

    rank: int = Field(4, ge=1, le=1024, description="kohya network_dim: the adapters' rank")
    alpha: float = Field(4.0, gt=0, description="kohya network_alpha: updates are scaled by alpha / rank (4/4: 1)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input (peft lora_dropout)")
    learning_rate: str = Field("1e-4", description="the rate or webui schedule (replaces training.learning_rate, "
                               "whose 0.005 suits embeddings, not LoRA)")
    unet_lr: float | None = Field(None, gt=0, description="kohya unet_lr: the UNet adapters' rate in the schedule's "
                                  "first segment, later segments scaled alike; null: learning_rate")
    text_encoder_lr: float = Field(0.0, ge=0, description="kohya text_encoder_lr, scaled alike; 0: the text encoder "
                                   "is frozen (no adapters; its outputs are cached per prompt)")
    max_steps: int | None = Field(None, ge=1, description="replaces training.max_steps; null: training's")

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _rate_as_text(cls, value: object) -> object:
        return _number_as_text(value)


class DreamBoothSettings(_Section):
    """DreamBooth (full UNet fine-tune) with prior preservation; the common loop settings come from `training:`,
    except the learning rate and step count, whose DreamBooth defaults differ (diffusers' example: 5e-6, 400)."""

    instance_token: str | None = Field(None, description="[name] in the training prompts (a rare word such as "
                                       "'sks'); default: training.embedding_name, else the dataset name")
    class_prompt: str = Field("", description="what the subject is, e.g. 'a photo of a dog': the class images' "
                              "prompt and the prior-preservation prompt; needed when prior_preservation is on")
    class_negative_prompt: str = Field("", description="negative prompt of the class images")
    num_class_images: int = Field(50, ge=1, le=10_000, description="class images generated by the base model")
    class_seed: int = Field(0, ge=0, description="class image i is sampled with seed class_seed + i")
    class_steps: int = Field(25, ge=1, le=500, description="sampling steps of the class images")
    class_cfg_scale: float = Field(7.0, ge=0, description="CFG scale of the class images")
    class_sampler: Literal["ddim", "dpm", "euler", "euler_a", "pndm"] = Field("dpm", description="sampler of the "
                                                                                 "class images")
    prior_preservation: bool = Field(True, description="add the class images' loss, so the model keeps what the "
                                     "class looks like (diffusers: --with_prior_preservation)")
    prior_loss_weight: float = Field(1.0, ge=0, description="weight of the class images' loss")
    train_text_encoder: bool = Field(False, description="fine-tune the text encoder too (more memory)")
    text_encoder_lr: float | None = Field(None, gt=0, description="the text encoder's rate (scaled along the UNet's "
                                          "schedule); default: the UNet's")
    learning_rate: str = Field("5e-6", description="the UNet's rate or a webui schedule (overrides training's)")
    max_steps: int = Field(400, ge=1, description="optimizer steps (overrides training.max_steps)")
    optimizer: Literal["auto", "adamw", "adamw8bit"] = Field("auto", description="auto: 8-bit AdamW when "
                                                             "bitsandbytes works on the device, else AdamW")

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _rate_as_text(cls, value: object) -> object:
        return _number_as_text(value)


class DreamArtistSettings(_Section):
    """DreamArtist / APT (the webui extension's names in the descriptions); the common loop settings (batch,
    template, seed, checkpoints, resume, ...) come from `training:`, the initialization of the positive
    embedding too (initialization_text / initialization_embedding)."""

    positive_vectors: int = Field(3, ge=1, le=75, description="extension: number of vectors per token (the seeds: "
                                  "(3, 6) by default, up to (5, 8) or (10, 10) for complex characters)")
    negative_vectors: int = Field(6, ge=1, le=75, description="extension: number of negative vectors per token")
    negative_initialization_text: str = Field("*", description="extension: initialization text (negative)")
    learning_rate: str = Field("0.003", description="the seeds: 0.003 (0.0025 if unstable), 0.005 for styles; "
                               "a rate or a webui schedule")
    max_steps: int | None = Field(None, ge=1, description="default: training.max_steps (the seeds: 3000-8000 "
                                  "for characters, 1500-2000 for styles)")
    cfg_scale: str = Field("3", description="extension: CFG scale, a number or 'low-high[:linear|cos|cos2]' "
                           "following each sample's timestep (the seeds: 3 for characters, 5 for styles)")
    negative_lr_scale: float = Field(1.0, gt=0, le=10, description="extension: negative lr weight")
    ema: float = Field(0.97, ge=0, le=1, description="extension: EMA of both embeddings (the seeds: 0.95-0.97; "
                       "1 turns it off); the averages are the saved result")
    ema_replace_every: int = Field(25, ge=0, description="extension: EMA replace steps, the trained vectors are "
                                   "set to their average every N steps; 0: never")
    reconstruction_weight: float = Field(0.0, ge=0, description="extension: reconstruction loss weight (L1 of the "
                                         "VAE-decoded prediction to the image); 0: off (less memory, faster)")
    positive_only_filewords: bool = Field(False, description="extension: positive \"filewords\" only: the negative "
                                          "prompt is the template line without the caption")

    @field_validator("learning_rate", "cfg_scale", mode="before")
    @classmethod
    def _rate_as_text(cls, value: object) -> object:
        return _number_as_text(value)

    @field_validator("cfg_scale")
    @classmethod
    def _cfg_parses(cls, value: str) -> str:
        from training.dreamartist import parse_cfg_schedule

        parse_cfg_schedule(value)
        return value


class DatasetSettings(_Section):
    preprocess: PreprocessSettings = PreprocessSettings()
    tagging: TaggingSettings = TaggingSettings()
    captions: CaptionSettings = CaptionSettings()
    training: TrainingSettings = TrainingSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    aesthetic: AestheticSettings = AestheticSettings()
    hypernetwork: HypernetworkSettings = HypernetworkSettings()
    lora: LoraSettings = LoraSettings()
    dreambooth: DreamBoothSettings = DreamBoothSettings()
    dreamartist: DreamArtistSettings = DreamArtistSettings()


SECTIONS: tuple[str, ...] = tuple(DatasetSettings.model_fields)


def load_dataset_settings(dataset_dir: Path) -> DatasetSettings:
    """Read and validate `dataset.yaml`; a missing file means all defaults."""
    path = dataset_dir / SETTINGS_FILE
    if not path.exists():
        return DatasetSettings()
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise SettingsError(yaml_error_message(path, error)) from error
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}, line 1: expected a mapping of sections ({', '.join(SECTIONS)}), "
                            f"got {type(raw).__name__}")
    try:
        return DatasetSettings.model_validate(raw)
    except ValidationError as error:
        raise SettingsError(validation_error_message(path, text, DatasetSettings, error)) from error


def section_version(settings: DatasetSettings, section: str) -> str:
    return json_sha256(getattr(settings, section).model_dump(mode="json"))
