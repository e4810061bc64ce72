"""The toy teacher: an exact Gaussian mixture (its diffusion in closed form) and the MLP students."""
