"""Shared experiment helpers: judging priors of older tokenizers as the pipeline judges now."""


def with_training_quantiles(tokenizer, path_to_data):
    """A VQ-VAE tokenizer trained before tone matching recorded no training pixel quantiles:
    take them from its training split of `path_to_data`, as it records them now (every image
    of a split under tone.MAX_IMAGES), so its priors are judged as the pipeline now judges."""
    if not tokenizer.model.fitted and tokenizer.pixel_quantiles is None:
        from pipeline.run import load_split_images
        from pipeline.tone import pixel_quantiles
        tokenizer.pixel_quantiles = pixel_quantiles(
            load_split_images(tokenizer.run_id, path_to_data)[0])
    return tokenizer
