"""Pulumi entry point: load this stack's spec, declare the stack, export its endpoints and digests."""
import pulumi

from mlops.program import declare_stack, load_stack_spec
from mlops_spec.errors import SpecError

try:
    declare_stack(pulumi.get_stack(), load_stack_spec(pulumi.get_stack(), pulumi.Config("mlops")))
except SpecError as err:
    raise pulumi.RunError(str(err)) from None
