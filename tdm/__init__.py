"""tdm: distil diffusion teachers into few-step students by Trajectory Distribution Matching."""

__version__ = "0.1.0"


def load_pipeline(*args, **kwargs):
    """A stock diffusers pipeline running an exported student; see `tdm.export.load_pipeline`."""
    from .export.pipeline import load_pipeline as _load

    return _load(*args, **kwargs)
