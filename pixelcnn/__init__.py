"""Convolutional priors over token grids (pixels or VQ codes): PixelCNN, Gated PixelCNN,
PixelCNN++ and PixelSNAIL, one model file each, registered in priors/__init__.py."""
