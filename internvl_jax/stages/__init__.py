"""What differs per training stage: model, loss, sharding rules, FLOPs (see `train.stage.Stage`)."""
