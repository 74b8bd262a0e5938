"""Training and sampling machinery shared by the scripts: distributed setup, EMA, checkpoints,
the one sampling function, images and logs."""
