"""Local image and text encoders for `tdm eval`: transformers' CLIP and DINOv2 from folders the user names (nothing
is downloaded), their image preprocessing in torch, and a folder of real images.

Inception-v3 (the FID of papers) is not offered: its usable weights come with pytorch-fid / torch-fidelity, which
need torchvision, and torchvision does not install beside this torch. ImageReward and HPSv2 need torchvision too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

FEATURE_KINDS = ("clip", "clip_vision_model", "dinov2")   # config.json model_type of an eval.features folder
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
EXAMPLE = {"eval.clip": "openai/clip-vit-large-patch14",
           "eval.features": "openai/clip-vit-large-patch14 or facebook/dinov2-base"}


def check_model_folder(key: str, path: str, kinds: tuple[str, ...], text: bool = False) -> str:
    """The model_type of the transformers model folder `path` (config field `key`), after checking that it is one
    of `kinds` with its weights, image preprocessing and (`text`) tokenizer. Reads file names and JSON only."""
    fix = f"give a local folder written by save_pretrained (e.g. of {EXAMPLE[key]}, with its processor)"
    if path.lower() == "inception":
        raise ValueError(f"{key}=inception: Inception-v3 (pytorch-fid's weights) needs torchvision, which does not "
                         "install beside this torch; give a local CLIP or DINOv2 folder (README: judging a "
                         "diffusers run)")
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{key}={path} is not a folder; {fix}")
    try:
        kind = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except FileNotFoundError:
        raise ValueError(f"{key}={path} holds no config.json; {fix}") from None
    except (ValueError, AttributeError):
        raise ValueError(f"{key}={path}: config.json is not a readable model config; {fix}") from None
    if kind not in kinds:
        raise ValueError(f"{key}={path} holds a {kind!r} model; it takes {' or '.join(kinds)}; {fix}")
    needs = {"weights": WEIGHTS, "image preprocessing": ("preprocessor_config.json",)}
    if text:
        needs["tokenizer"] = ("tokenizer.json", "vocab.json")
    for what, names in needs.items():
        if not any((folder / name).is_file() for name in names):
            raise ValueError(f"{key}={path} has no {what} ({' or '.join(names)}); {fix}")
    return kind


def check_image_folder(key: str, path: str) -> list[Path]:
    """The image files directly in folder `path` (config field `key`), sorted; at least 2 (KID needs 2)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{key}={path} is not a folder; give a folder of images ({', '.join(IMAGE_SUFFIXES)})")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise ValueError(f"{key}={path} holds {len(files)} image files ({', '.join(IMAGE_SUFFIXES)}); FID and KID "
                         "need at least 2")
    return files


def check_eval_section(cfg) -> None:
    """The eval section's folders (names and JSON only, before anything loads), and train.eval_samples against it:
    evaluation after training needs a model to measure with."""
    e = cfg.eval
    if e.clip:
        check_model_folder("eval.clip", e.clip, ("clip",), text=True)
    if e.features:
        check_model_folder("eval.features", e.features, FEATURE_KINDS)
    if e.real_images and not e.features:
        raise ValueError(f"eval.real_images={e.real_images} needs eval.features=PATH, the image encoder FID and KID "
                         "against them are computed in")
    if e.real_images:
        check_image_folder("eval.real_images", e.real_images)
    if cfg.train.eval_samples and not (e.clip or e.features):
        raise ValueError(f"train.eval_samples={cfg.train.eval_samples}: a {cfg.teacher.family} run is measured with "
                         "local models; name them (eval.clip=PATH for the CLIP score, eval.features=PATH for FID "
                         "and KID) or set train.eval_samples=0")


class Preprocess:
    """The image processor of a model folder (`preprocessor_config.json`), in torch on images in [0, 1]: resize
    (shortest edge, or to a fixed size), centre crop, normalise. transformers' fast processors would need
    torchvision."""

    def __init__(self, folder: Path):
        path = folder / "preprocessor_config.json"
        spec = json.loads(path.read_text(encoding="utf-8"))
        size, crop = spec.get("size"), spec.get("crop_size")   # older processors write a number for each
        self.size = {"shortest_edge": size} if isinstance(size, int) else size
        self.crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
        if not spec.get("do_resize", True):
            self.size = None
        if not spec.get("do_center_crop", True):
            self.crop = None
        if self.size is not None and not ("shortest_edge" in self.size or {"height", "width"} <= set(self.size)):
            raise ValueError(f"{path}: size {size} names neither shortest_edge nor height and width")
        if self.crop is not None and not {"height", "width"} <= set(self.crop):
            raise ValueError(f"{path}: crop_size {crop} names no height and width")
        self.mean = torch.tensor(spec.get("image_mean", [0.5, 0.5, 0.5])).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.get("image_std", [0.5, 0.5, 0.5])).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the model's input."""
        h, w = x.shape[-2:]
        if self.size and "shortest_edge" in self.size:
            s = self.size["shortest_edge"]
            size = (s, max(s, round(w * s / h))) if h <= w else (max(s, round(h * s / w)), s)
        elif self.size:
            size = (self.size["height"], self.size["width"])
        else:
            size = (h, w)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        if self.crop:
            ch, cw = self.crop["height"], self.crop["width"]
            top, left = max(0, (x.shape[-2] - ch) // 2), max(0, (x.shape[-1] - cw) // 2)
            x = x[..., top:top + ch, left:left + cw]
        return (x - self.mean.to(x)) / self.std.to(x)


class Encoder:
    """A local CLIP (image and text embeddings, projected) or DINOv2 (its class token, `pooler_output`) in fp32."""

    def __init__(self, key: str, path: str, device: torch.device | str = "cpu", text: bool = False):
        import transformers

        folder = Path(path)
        self.kind = check_model_folder(key, path, ("clip",) if text else FEATURE_KINDS, text)
        cls = {"clip": "CLIPModel", "clip_vision_model": "CLIPVisionModelWithProjection", "dinov2": "Dinov2Model"}
        self.model = getattr(transformers, cls[self.kind]).from_pretrained(
            folder, local_files_only=True, dtype=torch.float32).to(device).eval()
        self.device = torch.device(device)
        self.preprocess = Preprocess(folder)
        self.tokenizer = None
        if self.kind == "clip":
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of images (B, 3, H, W) in [0, 1], on the CPU."""
        return self._embed(self.preprocess(x.float().to(self.device)))

    @torch.no_grad()
    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.kind == "clip":
            out = m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)
        elif self.kind == "clip_vision_model":
            out = m(pixel_values=pixels).image_embeds
        else:
            out = m(pixel_values=pixels).pooler_output
        return out.float().cpu()

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP's projected text embeddings of prompts (cut at its context length), on the CPU."""
        m = self.model
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                                max_length=m.config.text_config.max_position_embeddings).to(self.device)
        hidden = m.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return m.text_projection(hidden).float().cpu()

    def files(self, paths: list[Path], batch_size: int) -> torch.Tensor:
        """Embeddings of image files, `batch_size` at a time (each resized and cropped on its own: sizes differ)."""
        import numpy as np
        from PIL import Image

        out = []
        for i in range(0, len(paths), batch_size):
            batch = []
            for p in paths[i:i + batch_size]:
                with Image.open(p) as img:
                    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                batch.append(self.preprocess(x[None].to(self.device)))
            out.append(self._embed(torch.cat(batch)))
        return torch.cat(out)
