"""tdm: distil diffusion teachers into few-step students by Trajectory Distribution Matching."""

__version__ = "0.1.0"
