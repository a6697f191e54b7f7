"""Ray trainables: the train loop (one code path) run as a Tune function trainable or in a TorchTrainer."""
