"""The lean edge runtime: bundle loading, preprocessing, inference backends, frame sources. Never imports torch."""
