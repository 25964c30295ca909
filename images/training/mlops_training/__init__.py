"""Training code of the training image: `python -m mlops_training --help`."""
