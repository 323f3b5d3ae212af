"""The model: loading through TransformerBridge (``load``), padding (``batch``), generation."""
