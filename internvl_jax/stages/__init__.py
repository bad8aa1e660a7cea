"""What differs per training stage: model, loss, FLOPs (see `train.stage.Stage`)."""
