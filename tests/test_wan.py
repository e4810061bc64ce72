"""Wan 2.1 (rectified flow, UMT5, (B, C, F, H, W) latents): the dry run on config-only folders of the real sizes
(its training, exports and resume: the shared family suites, tests/test_families.py and test_export_formats.py)."""

import json

import pytest

from tdm.config import resolve
from tdm.estimate import memory_estimate
from tdm.families import family_class

WAN = {  # the public Wan2.1-T2V-{1.3B,14B}: dim 1536 / 5120 = heads x 128
    "wan-1.3b": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "wan-14b": {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
}


def _config_folder(root, transformer: dict):
    """A WanPipeline folder of configs only (no weights): the dry run counts from configs."""
    files = {
        "model_index.json": {"_class_name": "WanPipeline", "scheduler": ["diffusers", "UniPCMultistepScheduler"],
                             "text_encoder": ["transformers", "UMT5EncoderModel"],
                             "tokenizer": ["transformers", "T5TokenizerFast"],
                             "transformer": ["diffusers", "WanTransformer3DModel"],
                             "vae": ["diffusers", "AutoencoderKLWan"]},
        "transformer/config.json": {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2],
                                    "attention_head_dim": 128, "in_channels": 16, "out_channels": 16,
                                    "text_dim": 4096, "freq_dim": 256, **transformer},
        "scheduler/scheduler_config.json": {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True,
                                            "flow_shift": 3.0, "prediction_type": "flow_prediction"},
        "vae/config.json": {"_class_name": "AutoencoderKLWan", "base_dim": 96, "z_dim": 16,
                            "temperal_downsample": [False, True, True]},
        "text_encoder/config.json": {"model_type": "umt5", "architectures": ["UMT5EncoderModel"], "d_model": 4096,
                                     "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
                                     "vocab_size": 256384, "feed_forward_proj": "gated-gelu"},
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content))
    return root


@pytest.mark.parametrize(("preset", "params_M"), [("wan-1.3b", (1400, 1450)), ("wan-14b", (14200, 14400))])
def test_dry_run_counts_the_public_models(preset, params_M, tmp_path):
    """The 1.3B and 14B transformers built from their configs hold their published sizes (1.42B, 14.3B
    parameters), at the preset's own 480 x 832 / 720 x 1280 px and 81 frames; the estimate runs on configs alone."""
    cfg = resolve(preset, [f"teacher.path={_config_folder(tmp_path, WAN[preset])}", "train.preview_every=0"])
    m = memory_estimate(cfg, family_class("wan"))
    assert m["network"] == "WanTransformer3DModel" and params_M[0] < m["base_params_M"] < params_M[1]
    assert m["peak_GiB"] > 0
    print(preset, m["base_params_M"], "M parameters, peak", m["peak_GiB"], "GiB")
