"""From a frame to a verdict: the bundle, the resize to its input, the backends that run it, the regions."""
