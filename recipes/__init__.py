"""Bundled YAML recipes (data only). `clipmill run --recipe NAME` looks here for NAME.yaml."""
