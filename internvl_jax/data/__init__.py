"""Data layer: TFDS/ArrayRecord sources, grain pipelines, tokenizer, transforms, chat templates."""
