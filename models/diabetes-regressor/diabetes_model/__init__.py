"""The diabetes regressor's code: its training entrypoint and the transformer its pipeline holds."""
