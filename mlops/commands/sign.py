"""`mlops sign --stage S --model M --version N`: vouch for a model version registered before models were signed.

Replicas load only signed versions (docs/security.md, "Signed models"), so a stage upgraded to this rule would
refuse the versions it already serves. This signs one such version where it is, in S's MLflow, with the key of the
stage that trains for S (the first stage of S's promotion chain), once its files match its sha256 tag and, where S
pins that version, S's reviewed pin; it adds the `manifest_sha256` tag such versions lack. Run it once per version
a stage pins (or, for a stage that follows its newest, the version it should serve) before its next `pulumi up`.
"""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from mlops import credentials
from mlops.commands.specs import ENVIRONMENTS_OPTION, reads_specs
from mlops.modelstore import StoreError
from mlops.reach import StageReach, Unreachable
from mlops.signing import SigningError, private_key, public_keys, sign_version
from mlops_spec.contract import MODEL_SIGNING_KEY, PROMOTER, TRUSTED_MODEL_KEYS
from mlops_spec.errors import excerpt, one_line
from mlops_spec.loading import load_all_stages
from mlops_spec.rules import promotion_chain


def _fail(message: str, code: int = 1) -> typer.Exit:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]error:[/red] {escape(one_line(message))}")
    return typer.Exit(code)


@reads_specs
def sign(stage: str = typer.Option(..., "--stage", help="the stage whose MLflow holds the version"),
         model: str = typer.Option(..., "--model", help="the model, one the stage declares"),
         version: int = typer.Option(..., "--version", min=1, help="the version to sign"),
         environments: Path = ENVIRONMENTS_OPTION) -> None:
    """Sign version N of model M in STAGE's MLflow with the key of the stage that trains for STAGE, after checking its
    files against its sha256 tag and STAGE's pin: for versions registered before models were signed."""
    every = load_all_stages(environments)
    if stage not in every:
        raise _fail(f"no stage '{excerpt(stage)}' in {environments}: one of {', '.join(sorted(every))}", 2)
    spec = every[stage]
    if model not in spec.models:
        raise _fail(f"{stage} declares no model '{excerpt(model)}', only {', '.join(sorted(spec.models))}", 2)
    signer = promotion_chain(every, stage)[0]
    release = spec.models[model].release
    pinned = release.sha256 if release is not None and release.version == version else None
    try:
        key = private_key(credentials.model_signing_key(signer), f"{signer}'s mlops:{MODEL_SIGNING_KEY}")
        trusted = public_keys(credentials.trusted_model_keys(stage), f"{stage}'s mlops:{TRUSTED_MODEL_KEYS}")
        if not any(public.public_bytes_raw() == key.public_key().public_bytes_raw() for public in trusted):
            raise SigningError(f"{stage}'s mlops:{TRUSTED_MODEL_KEYS} does not hold {signer}'s public key, so its "
                               "replicas would refuse what this signs; add it first")
        with StageReach(spec) as reach:
            store = reach.model_store(PROMOTER)
            signed = sign_version(store, model, version, key, expected_sha256=pinned,
                                  expected_by=f"{stage}'s pin says")
    except (credentials.MissingSecret, SigningError, StoreError, Unreachable) as err:
        raise _fail(str(err)) from None
    console = Console(highlight=False, soft_wrap=True)
    if signed:
        console.print(f"signed {model} v{version} in {stage} with {signer}'s key")
    else:
        console.print(f"{model} v{version} in {stage} is already signed with {signer}'s key; nothing changed")
