"""What the three scripts are made of, one module per job: the objective (objective.py), the
sampler spec and the one sampling loop (sampling.py), checkpoint files (checkpoint.py) and any
checkpoint as a ready model (loading.py), FID sample sets (sample_set.py), the training run
(train_config.py, trainer.py, step.py, ema.py), and precision, devices, images and logs."""
