"""Image data and evaluation: scikit-learn's 8x8 handwritten digits, a digit classifier, and the
metrics computed in its feature space (Fréchet distance, conditional accuracy, precision/recall)."""
