"""The iris classifier's code: its training entrypoint."""
