"""Typed configuration, named presets and `key=value` overrides."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .core.schedules import BETA_SCHEDULES, GRID_KINDS, PREDICTION_TYPES, GridSpec
from .methods.losses import GENERATOR_LOSSES, IS_MODES


@dataclass
class TeacherConfig:
    family: str = "toy"                    # which adapter loads the teacher
    path: str = ""                         # teacher folder (diffusers layout; 'digits' = the committed one)
    resolution: int = 512                  # diffusers teachers: image side in pixels
    frames: int = 49                       # video teachers: frames per sample
    width: int = 0                         # Wan: width in pixels (resolution is the height); 0 = square
    mixture: str = "ring8"                 # toy: embedded mixture name or a YAML/JSON file
    beta_schedule: str = "scaled_linear"   # VP betas of the toy teacher (§1)
    beta_start: float = 0.00085
    beta_end: float = 0.012
    guidance: float = 1.0                  # CFG scale w distilled into the student (§1); 1 = none


@dataclass
class NetConfig:
    prediction_type: str = "epsilon"       # parameterisation of student and fake score
    hidden: int = 256                      # MLP width
    depth: int = 3                         # residual blocks
    pretrain_steps: int = 3000             # ordinary diffusion training that initialises student and fake
    pretrain_batch: int = 1024
    pretrain_lr: float = 2e-3


@dataclass
class StudentConfig:
    steps: int = 4                         # K, the student's number of steps (§2)
    grid: str = "demo"                     # 'demo' (k*N/K - 1), 'trailing', 'shifted' (§2) or 'linear' (flow)
    grid_N: int = 900                      # N of the demo grid
    grid_shift: float = 2.0                # shift of the 'shifted' grid
    unify: list[int] = field(default_factory=list)  # TDM-unify: draw K from this set, K-conditioned (§6)
    guidance_embedding: float = 0.0       # FLUX.1-dev: the student's (and fake's) guidance input; 0 = teacher.guidance
    stochastic: bool = False               # re-noise with fresh noise between steps instead of eps_hat, in
                                           # training (TDM's rollout and next point) as in sampling (§2)

    def grid_spec(self) -> GridSpec:
        return GridSpec(self.grid, self.grid_N, self.grid_shift)


@dataclass
class DataConfig:
    prompts: str = ""                      # text file, JSONL or `datasets` folder (text teachers)
    max_prompt_chars: int = 1000           # longer prompts are truncated, with a warning


@dataclass
class LoRAConfig:
    enabled: bool = True                   # LoRA: one frozen base with 'student' and 'fake' adapters
    rank: int = 64
    alpha: float = 64.0
    targets: list[str] = field(default_factory=list)  # module names; empty = the family's default


@dataclass
class TDMConfig:
    interval: str = "separate"             # tau sampling: 'separate', 'shared' (the fake told the step k; toy
                                           # family only) or 'randmid' (§4 steps 2-3)
    matching: str = "noisy"                # diffused to tau: 'noisy' the next trajectory point (TDM, §3) or 'clean'
                                           # the step's x0_hat (paper Table 7's ablation, §7)
    importance_weight: str = "tempered"    # 'tempered' (demo) or 'none' (§4 step 4)
    min_snr_gamma: float = 5.0             # Min-SNR clamp of the fake-score loss weight
    generator_loss: str = "huber_demo"     # 'huber_demo', 'huber_paper' or 'mse' (§4 step 5)
    huber_c: typing.Optional[float] = None  # None: the kind's own c
    tau_min: int = 20                      # tau >= max(tau_min, t_m)
    tau_margin: int = 10                   # tau <= t_k - tau_margin (separate) or N - tau_margin (shared, N = t_K + 1)
    randmid_margin: int = 20               # randmid: t_m in [t_{k-1}, t_k - randmid_margin)
    fake_anchor: float = 0.0               # flow teachers: weight of the fake's anchor to the teacher (§5)


@dataclass
class DMD2Config:
    fake_updates: int = 5                  # two-time-scale update rule: fake-score updates per student update (DMD2: 5)
    tau_min: int = 20                      # tau uniform in [tau_min, tau_max] for the generator and the fake score
    tau_max: int = 980                     # (DMD2: 0.02 T and 0.98 T)
    min_snr_gamma: float = 5.0             # Min-SNR clamp of the fake-score loss weight, as tdm.min_snr_gamma


@dataclass
class ConsistencyConfig:
    skip: int = 20                         # k, the skipping step: t_n = t_{n+k} - k teacher timesteps (LCM §4.3)
    source: str = "student"                # data-free x_{t_{n+k}}: 'student' samples noised, or the 'teacher' ODE
    target: str = "student"                # f_theta^-: 'student' (stop-grad, LCM-LoRA) or 'ema' (optim.ema's EMA)
    loss: str = "huber"                    # 'huber' (pseudo-Huber, LCM) or 'l2'
    huber_c: float = 0.001                 # c of the pseudo-Huber loss (LCM)
    sigma_data: float = 0.5                # boundary scalings c_skip, c_out (LCM)
    timestep_scaling: float = 10.0         # c_skip, c_out see t * timestep_scaling (LCM's value)


@dataclass
class OptimConfig:
    lr_student: float = 1e-4               # generator lr, 1/5 to 1/10 of the fake's (§4 step 6)
    lr_fake: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.0, 0.95])  # demo; paper (0, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 1.0                 # generator grad-norm clip; 0 = no clipping
    warmup: int = 0                        # linear LR warm-up iterations for both roles
    decay: str = "constant"                # after warm-up: 'constant' or 'cosine' (to 0 at train.iterations)
    ema: float = 0.0                       # EMA decay of the student; 0 = off
    adam_8bit: bool = False                # bitsandbytes' 8-bit AdamW (must be installed)


@dataclass
class TrainConfig:
    iterations: int = 600
    batch_size: int = 256
    seed: int = 0
    checkpoint_every: int = 200            # also checkpoints at the end and on SIGINT / SIGTERM
    keep_checkpoints: int = 2              # complete checkpoints kept (at least 1: the newest is never deleted)
    log_every: int = 10
    preview_every: int = 0                 # diffusers teachers: preview grid (K = 1, 2, 4) every N iterations
    mixed_precision: str = "no"            # 'no', 'fp16' or 'bf16': frozen networks in it, trainable weights fp32
    tf32: bool = True                      # CUDA: TF32 for the fp32 matmuls and convolutions
    gradient_checkpointing: bool = False   # diffusers networks: recompute activations in backward
    channels_last: bool = True             # diffusers UNets: channels-last memory layout
    compile: bool = False                  # diffusers networks: torch.compile the calls; fixed-shape rollout
    teacher_offload: bool = False          # full mode: keep the frozen teacher in CPU memory between calls
    eval_samples: int = 4000               # samples per metric in `tdm eval`; 0 = no evaluation after training
    max_nonfinite_skips: int = 0           # non-finite updates skipped before the run stops; 0 = stop at the first
    progress: bool = True
    report_to: str = "tensorboard"         # tracker of the metrics and previews: 'tensorboard', 'wandb' or 'none'
    validation_prompts: list[str] = field(default_factory=list)  # diffusers teachers: the preview grid's prompts
                                                                  # (empty: the first training prompts)


@dataclass
class EvalConfig:
    """How `tdm eval` measures a diffusers run, with local models only (nothing is downloaded)."""

    clip: str = ""                         # CLIP folder (transformers CLIPModel): CLIP score of sample and prompt
    features: str = ""                     # image encoder folder (CLIP or DINOv2): FID and KID in its features
    real_images: str = ""                  # folder of images: FID and KID against them too (needs eval.features)
    teacher_steps: list[int] = field(default_factory=lambda: [4, 25])  # the teacher's DDIM steps with CFG;
                                           # the most steps is the yardstick every sample set is measured against
    batch_size: int = 16                   # samples per sampler, decoder and encoder call


@dataclass
class Config:
    preset: str = "toy-gmm"
    method: str = "tdm"                    # the distillation method: a module of tdm/methods, its own section below
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    net: NetConfig = field(default_factory=NetConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    tdm: TDMConfig = field(default_factory=TDMConfig)
    dmd2: DMD2Config = field(default_factory=DMD2Config)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = cls()
        for section, values in d.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    set_field(cfg, f"{section}.{key}", value)
            else:
                set_field(cfg, section, values)
        return cfg


# What every diffusers preset shares: bf16, checkpoints and previews every so often, no evaluation after training
# (it needs local models named in the eval section; then set train.eval_samples).
_DIFFUSERS_TRAIN = {"mixed_precision": "bf16", "checkpoint_every": 100, "eval_samples": 0, "preview_every": 50}

# Named presets: overrides of the defaults above.
# The toy presets turn the demo's tempered importance weight off: in 2-D/4-D it is a per-sample factor far
# from 1, not a gentle correction; single-seed runs disagree on its cost (README, "The importance weight").
PRESETS: dict[str, dict] = {
    "toy-gmm": {
        "teacher": {"mixture": "ring8"},
        "tdm": {"importance_weight": "none"},
    },
    "toy-gmm-cond": {
        "teacher": {"mixture": "cond4d", "guidance": 2.0},   # CFG 2: guidance matters, classes stay apart
        "tdm": {"importance_weight": "none"},
    },
    # The main job: the committed 8x8 digits UNet, CFG 2, distilled data-free into 4 steps in minutes on CPU.
    "digits": {
        "teacher": {"family": "digits", "path": "digits", "guidance": 2.0},
        "optim": {"lr_student": 2e-5, "lr_fake": 2e-4},
        "train": {"iterations": 500, "batch_size": 64, "checkpoint_every": 100, "eval_samples": 450},
    },
    # Stable Diffusion 1.5 / 2.x, LoRA (demo hyper-parameters where known, TDM-METHOD §4).
    "sd15": {
        "teacher": {"family": "sd15", "guidance": 4.5, "resolution": 512},
        "optim": {"lr_student": 5e-6, "lr_fake": 5e-5},
        "train": {"iterations": 500, "batch_size": 8, **_DIFFUSERS_TRAIN},
    },
    # SDXL, LoRA. CFG and lrs are not given in TDM-METHOD; these follow the PixArt ratios (1/10).
    "sdxl": {
        "teacher": {"family": "sdxl", "guidance": 5.0, "resolution": 1024},
        "optim": {"lr_student": 2e-6, "lr_fake": 2e-5},
        "train": {"iterations": 1000, "batch_size": 4, **_DIFFUSERS_TRAIN},
    },
    # PixArt-alpha: the demo's recipe (TDM-METHOD §4): lr 2e-6 / 2e-5, 500 iterations, batch 32, CFG 4.5.
    "pixart-512": {
        "teacher": {"family": "pixart", "guidance": 4.5, "resolution": 512},
        "optim": {"lr_student": 2e-6, "lr_fake": 2e-5},
        "train": {"iterations": 500, "batch_size": 32, **_DIFFUSERS_TRAIN},
    },
    "pixart-1024": {
        "teacher": {"family": "pixart", "guidance": 4.5, "resolution": 1024},
        "optim": {"lr_student": 2e-6, "lr_fake": 2e-5},
        "train": {"iterations": 500, "batch_size": 32, **_DIFFUSERS_TRAIN},
    },
    # SD3 / SD3.5: rectified flow, shifted student grid, no importance weight (authors' flow code, §5).
    "sd3": {
        "teacher": {"family": "sd3", "guidance": 7.0, "resolution": 1024},
        "student": {"grid": "shifted", "grid_shift": 3.0},
        "tdm": {"importance_weight": "none", "fake_anchor": 0.02},
        "optim": {"lr_student": 2e-6, "lr_fake": 2e-5},
        "train": {"iterations": 500, "batch_size": 4, **_DIFFUSERS_TRAIN},
    },
    # digits-sd: the committed tiny text-to-image SD pipeline on the digits (16x16 px, 4x8x8 latents) through
    # the sd15 code path, LoRA, data-free (its prompts only), measured by the digit classifier. A CPU job: fp32.
    # LoRA targets: diffusers' LCM-LoRA distillation recipe (attention, feed-forward, resnet convs, samplers).
    "digits-sd": {
        "teacher": {"family": "digits-sd", "path": "digits-sd", "guidance": 2.0, "resolution": 16},
        "lora": {"rank": 16, "alpha": 16.0, "targets": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                        "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                                                        "conv_shortcut", "downsamplers.0.conv",
                                                        "upsamplers.0.conv", "time_emb_proj"]},
        "optim": {"lr_student": 1e-4, "lr_fake": 1e-3},
        "train": {"iterations": 500, "batch_size": 64, "checkpoint_every": 100, "eval_samples": 450,
                  "mixed_precision": "no"},
    },
    # CogVideoX-2B: v-prediction, zero-SNR; the video LoRA's grid [999, 856, 665, 399] (§2) = shifted, s = 2.
    "cogvideox-2b": {
        "teacher": {"family": "cogvideox", "guidance": 6.0, "resolution": 480, "frames": 49},
        "student": {"grid": "shifted", "grid_shift": 2.0},
        "optim": {"lr_student": 2e-6, "lr_fake": 2e-5},
        "train": {"iterations": 500, "batch_size": 1, **_DIFFUSERS_TRAIN, "checkpoint_every": 50},
    },
    # FLUX.1: the paper and TDM-METHOD give no recipe; these carry SD3's (flow, §5): no importance weight, fake
    # anchor 0.02, lrs 2e-6 / 2e-5, 500 iterations, with batch 2 for a 12B network. dev: its guidance embedding at
    # diffusers' default 3.5 (one call, no CFG pass), grid shift 3 ~ e^1.15, the teacher's own shift at 1024 px.
    "flux-dev": {
        "teacher": {"family": "flux", "guidance": 3.5, "resolution": 1024},
        "student": {"grid": "shifted", "grid_shift": 3.0},
        "tdm": {"importance_weight": "none", "fake_anchor": 0.02},
        "optim": {"lr_student": 2e-6, "lr_fake": 2e-5},
        "train": {"iterations": 500, "batch_size": 2, **_DIFFUSERS_TRAIN},
    },
    # schnell: no guidance embedding and timestep-distilled to sample without CFG (guidance 1); it samples unshifted
    # uniform sigmas, hence the trailing grid (its own 4-step grid).
    "flux-schnell": {
        "teacher": {"family": "flux", "guidance": 1.0, "resolution": 1024},
        "student": {"grid": "trailing"},
        "tdm": {"importance_weight": "none", "fake_anchor": 0.02},
        "optim": {"lr_student": 2e-6, "lr_fake": 2e-5},
        "train": {"iterations": 500, "batch_size": 2, **_DIFFUSERS_TRAIN},
    },
    # Wan 2.1 T2V. The paper gives no Wan recipe: these are the sd3 preset's flow choices (no importance weight,
    # the fake anchor, lrs 2e-6 / 2e-5, §5), CFG 5 (Wan's own sampling default), the teachers' native size and 81
    # frames, batch 1 as cogvideox-2b. Grid 'linear' (t_k = T k / K): WanPipeline passes no sigmas, and it is the
    # one grid a stock flow-match scheduler makes from K (tdm.export.scheduler).
    "wan-1.3b": {
        "teacher": {"family": "wan", "guidance": 5.0, "resolution": 480, "width": 832, "frames": 81},
        "student": {"grid": "linear"},
        "tdm": {"importance_weight": "none", "fake_anchor": 0.02},
        "optim": {"lr_student": 2e-6, "lr_fake": 2e-5},
        "train": {"iterations": 500, "batch_size": 1, **_DIFFUSERS_TRAIN, "checkpoint_every": 50},
    },
    "wan-14b": {
        "teacher": {"family": "wan", "guidance": 5.0, "resolution": 720, "width": 1280, "frames": 81},
        "student": {"grid": "linear"},
        "tdm": {"importance_weight": "none", "fake_anchor": 0.02},
        "optim": {"lr_student": 2e-6, "lr_fake": 2e-5},
        "train": {"iterations": 500, "batch_size": 1, **_DIFFUSERS_TRAIN, "checkpoint_every": 50},
    },
}


def _coerce(value, tp, key: str):
    """Check/convert a YAML-parsed value to a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} expects a list, e.g. {key}=[1,2,4]")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, key) for v in value]
    if tp is float and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads '3e-4' as a string
        except (TypeError, ValueError):
            pass
    if tp is bool and isinstance(value, bool) or tp in (int, str) and type(value) is tp:
        return value
    raise ValueError(f"{key} expects {getattr(tp, '__name__', tp)}, got {value!r}")


def set_field(cfg: Config, key: str, value, raw: str | None = None) -> None:
    """Set a dotted field such as `student.steps` with type checking. A text field takes the override's `raw`
    text as written: YAML would read `train.mixed_precision=no` as False, `teacher.path=2024` as a number."""
    obj, *path = cfg, *key.split(".")
    for name in path[:-1]:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, name):
            raise KeyError(f"unknown config section {name!r} in {key!r}")
        obj = getattr(obj, name)
    name = path[-1]
    fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
    if name not in fields or dataclasses.is_dataclass(getattr(obj, name)):
        raise KeyError(f"unknown config field {key!r}; `tdm presets --show NAME` lists the fields")
    hints = typing.get_type_hints(type(obj))
    if hints[name] is str and raw is not None and not isinstance(value, str):
        value = raw.strip()
    setattr(obj, name, _coerce(value, hints[name], key))


def read_config_file(path: str | Path) -> list[tuple[str, object, str | None, int]]:
    """A `--config` YAML file as `(dotted key, value, raw text, line)` entries, in file order: nested sections
    (`train: {iterations: 800}`), top-level fields (`preset`, `method`) or dotted keys (`student.steps: 2`). A
    scalar keeps its text as written, so that a text field reads it as an override would (`mixed_precision: no`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--config {path}: it does not exist; give a YAML file of config sections") from None
    except IsADirectoryError:
        raise ValueError(f"--config {path}: it is a folder; give a YAML file of config sections") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"--config {path}: not UTF-8 text (byte {err.start}); give a YAML file") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if not isinstance(root, yaml.MappingNode):
            raise ValueError(f"--config {path} holds no mapping of config sections; write e.g. 'train: "
                             "{iterations: 800}' and 'student: {steps: 2}', one key a line")
        entries = []
        for key_node, node in root.value:
            key = str(key_node.value)
            section = getattr(Config(), key, None)
            if dataclasses.is_dataclass(section):
                if not isinstance(node, yaml.MappingNode):
                    first = dataclasses.fields(section)[0].name
                    raise ValueError(f"{path}:{node.start_mark.line + 1}: {key} is a config section: give its "
                                     f"fields, e.g. '{key}: {{{first}: ...}}'")
                pairs = [(f"{key}.{k.value}", v) for k, v in node.value]
            else:
                pairs = [(key, node)]
            for name, value_node in pairs:
                raw = value_node.value if isinstance(value_node, yaml.ScalarNode) else None
                entries.append((name, loader.construct_object(value_node, deep=True), raw,
                                value_node.start_mark.line + 1))
        return entries
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML ({problem}); --config takes a YAML file of config "
                         "sections") from None
    finally:
        loader.dispose()


def resolve(preset: str | None, overrides: list[str] | None = None, config_file: str | Path | None = None) -> Config:
    """Defaults, then the preset, then the `config_file`'s fields, then `key=value` overrides (values parsed as
    YAML): the command line wins. The preset may come from the file (`preset: NAME`) instead."""
    entries = read_config_file(config_file) if config_file is not None else []
    where = ""  # where the preset was named, if in the file
    for key, value, _, line in entries:
        if key == "preset":
            if preset is not None and value != preset:
                raise ValueError(f"{config_file}:{line}: preset: {value} but --preset {preset}; keep one")
            preset, where = value, f"{config_file}:{line}: "
    if preset is None:
        raise ValueError("no preset: give --preset NAME (`tdm presets` lists them), or 'preset: NAME' in the "
                         "--config file")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise KeyError(f"{where}unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
    cfg = Config.from_dict({"preset": preset, **PRESETS[preset]})
    from_file = {}
    for key, value, raw, line in entries:
        if key == "preset":
            continue
        try:
            set_field(cfg, key, value, raw)
        except KeyError as err:
            raise KeyError(f"{config_file}:{line}: {err.args[0]}") from None
        except ValueError as err:
            raise ValueError(f"{config_file}:{line}: {err}") from None
        from_file[key] = f"{config_file}:{line}"
    for item in overrides or []:  # a later override of the same key wins
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = (part.strip() for part in item.split("=", 1))
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"override {item!r}: the value is not valid YAML ({problem}); e.g. {key}=[1,2,4] "
                             "for a list, quotes around text") from None
        set_field(cfg, key, value, raw)
        from_file.pop(key, None)
    try:
        validate(cfg)
    except ValueError as err:  # a value the file set (and the command line left) is named with its file and line
        key = str(err).split("=", 1)[0]
        if key in from_file:
            raise ValueError(f"{from_file[key]}: {err}") from None
        raise
    from .methods.base import method_names

    given = [(key, f"{config_file}:{line}: {key!r}") for key, _, _, line in entries] + [
        (item.split("=", 1)[0].strip(), f"override {item.split('=', 1)[0].strip()!r}") for item in overrides or []]
    for key, what in given:  # a section of a method that does not run would be silently ignored
        section = key.split(".")[0]
        if section in method_names() and section != cfg.method:
            raise ValueError(f"{what} belongs to method {section!r}, but method={cfg.method!r} runs; set "
                             f"method={section} or remove it")
    return cfg


FAMILIES = ("toy", "digits", "sd15", "sdxl", "pixart", "sd3", "cogvideox", "digits-sd", "flux", "wan")
CHOICES = {
    "teacher.family": FAMILIES,
    "teacher.beta_schedule": BETA_SCHEDULES,
    "net.prediction_type": tuple(p for p in PREDICTION_TYPES if p != "flow"),  # the toy MLP's VP teacher
    "student.grid": GRID_KINDS,
    "tdm.interval": ("separate", "shared", "randmid"),
    "tdm.matching": ("noisy", "clean"),
    "tdm.importance_weight": IS_MODES,
    "tdm.generator_loss": GENERATOR_LOSSES,
    "consistency.source": ("student", "teacher"),
    "consistency.target": ("student", "ema"),
    "consistency.loss": ("huber", "l2"),
    "optim.decay": ("constant", "cosine"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.report_to": ("tensorboard", "wandb", "none"),
}
# (lowest, highest) allowed; None: unbounded; an open bound is written as a predicate. Every number is also finite.
RANGES = {
    "teacher.resolution": (1, None), "teacher.frames": (1, None), "teacher.width": (0, None),
    "teacher.guidance": (1, None),
    "net.hidden": (2, None), "net.depth": (0, None), "net.pretrain_steps": (1, None), "net.pretrain_batch": (1, None),
    "student.steps": (1, None), "student.grid_N": (1, None), "data.max_prompt_chars": (1, None),
    "lora.rank": (1, None), "tdm.tau_min": (0, None), "tdm.tau_margin": (0, None), "tdm.randmid_margin": (0, None),
    "tdm.fake_anchor": (0, None), "dmd2.fake_updates": (1, None), "dmd2.tau_min": (0, 499),
    "dmd2.tau_max": (500, 999), "optim.weight_decay": (0, None), "optim.grad_clip": (0, None),
    "optim.warmup": (0, None), "train.iterations": (0, None), "train.batch_size": (1, None),
    "train.seed": (0, 2**32 - 1), "train.checkpoint_every": (1, None), "train.keep_checkpoints": (1, None),
    "train.log_every": (1, None), "train.preview_every": (0, None), "train.eval_samples": (0, None),
    "train.max_nonfinite_skips": (0, None), "eval.batch_size": (1, None),
    "consistency.skip": (1, None), "student.guidance_embedding": (0, None),
}
HINTS = {"teacher.guidance": " (the CFG scale w; 1 = no guidance)", "student.steps": " (K, the student's steps)",
         "train.keep_checkpoints": " (the newest complete checkpoint is always kept)",
         "train.seed": " (numpy's seed range)", "train.iterations": " (0: only build and save the start)"}
POSITIVE = ("teacher.beta_start", "teacher.beta_end", "net.pretrain_lr", "student.grid_shift", "lora.alpha",
            "tdm.min_snr_gamma", "tdm.huber_c", "dmd2.min_snr_gamma", "consistency.huber_c", "consistency.sigma_data",
            "consistency.timestep_scaling", "optim.lr_student", "optim.lr_fake")  # > 0


def _fields(cfg: Config):
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                yield f"{section.name}.{f.name}", getattr(obj, f.name)


def validate(cfg: Config) -> None:
    """Every field's type, range and choices, and settings that cannot work together; each message names the
    field and what it takes. Files (teacher folders, prompts, mixtures) are checked by `families.check_inputs`."""
    from .methods.base import method_names

    if cfg.method not in method_names():
        raise ValueError(f"method={cfg.method!r} is not one of {', '.join(method_names())}")
    values = dict(_fields(cfg))
    for key, value in values.items():
        hint = typing.get_type_hints(type(getattr(cfg, key.split(".")[0])))[key.split(".")[1]]
        _coerce(value, hint, key)  # a Config built in code, or read from a file, gets the override's type check
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{key}={value!r} must be a finite number")
    for key, allowed in CHOICES.items():
        if values[key] not in allowed:
            raise ValueError(f"{key}={values[key]!r} is not one of {', '.join(allowed)}")
    for key, (lo, hi) in RANGES.items():
        v = values[key]
        if lo is not None and v < lo or hi is not None and v > hi:
            rule = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ValueError(f"{key}={v!r} must be {rule}{HINTS.get(key, '')}")
    for key in POSITIVE:
        if values[key] is not None and values[key] <= 0:
            raise ValueError(f"{key}={values[key]!r} must be > 0")
    t, s, o = cfg.teacher, cfg.student, cfg.optim
    if cfg.net.hidden % 2:
        raise ValueError(f"net.hidden={cfg.net.hidden} must be even (the time embedding has a sine and a cosine half)")
    if not t.beta_start < t.beta_end < 1:
        raise ValueError(f"teacher.beta_start={t.beta_start} and teacher.beta_end={t.beta_end} need "
                         "0 < beta_start < beta_end < 1")
    if any(k < 1 for k in s.unify) or len(set(s.unify)) != len(s.unify):
        raise ValueError(f"student.unify={s.unify} must list distinct step counts K >= 1, e.g. [1,2,4]")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ValueError(f"optim.betas={o.betas} must be two numbers in [0, 1), e.g. [0.0, 0.95]")
    if not 0 <= o.ema < 1:
        raise ValueError(f"optim.ema={o.ema} is a decay in [0, 1) (0 = no EMA), e.g. 0.999")
    if cfg.method == "consistency" and not s.stochastic:  # the LCM sampler, read by `tdm eval` / `tdm sample`
        raise ValueError("method=consistency samples the LCM way (predict x0, re-noise with fresh noise): set "
                         "student.stochastic=true")
    if cfg.method == "consistency" and cfg.consistency.target == "ema" and o.ema == 0:
        raise ValueError("consistency.target=ema uses the trainer's EMA of the student: set optim.ema, e.g. 0.95")
    if not cfg.eval.teacher_steps or any(k < 1 for k in cfg.eval.teacher_steps) or \
            len(set(cfg.eval.teacher_steps)) != len(cfg.eval.teacher_steps):
        raise ValueError(f"eval.teacher_steps={cfg.eval.teacher_steps} must list distinct step counts >= 1, e.g. "
                         "[4,25] (the most steps is the yardstick)")
    if any(not p.strip() for p in cfg.train.validation_prompts):
        raise ValueError(f"train.validation_prompts={cfg.train.validation_prompts} holds an empty prompt")
    if any(not target for target in cfg.lora.targets):
        raise ValueError(f"lora.targets={cfg.lora.targets} holds an empty module name")


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
