"""One trainer for every stage: state, step (accumulation, non-finite skipping), checkpoints,
metrics and the loop. What differs per stage comes in through the `Stage` protocol."""
